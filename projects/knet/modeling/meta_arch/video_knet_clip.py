"""Video K-Net for video instance segmentation (``KNetTrack``; lxtGH/Video-K-Net
``knet_vis/tracker/track.py``): image K-Net on every frame of a clip, then a clip-level head whose
kernels are the objects of the whole clip, so that no tracker is needed."""

from __future__ import annotations

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY

from ..kernel_head.clip_head import ClipKernelHead
from ..kernel_head.kernel_update_head import build_update_stages
from ..postprocessing.base import resize_to_output
from .knet import KNet
from .video_knet import require_object_ids


def tube_targets(frame_targets: list[dict], num_frames: int) -> list[dict]:
    """Per clip, the objects' tubes from its frames' targets (``num_frames`` consecutive entries
    of ``frame_targets``, each {"labels": (G_t,), "masks": (G_t, h, w), "ids": (G_t,)}):
    {"labels": (G,), "masks": (G, T h, w)}, one tube per object id (ascending), its masks stacked
    frame after frame, zero where the object is absent."""
    tubes = []
    for start in range(0, len(frame_targets), num_frames):
        clip = frame_targets[start : start + num_frames]
        ids = torch.cat([t["ids"] for t in clip]).unique()
        h, w = clip[0]["masks"].shape[-2:]
        masks = clip[0]["masks"].new_zeros((len(ids), num_frames, h, w))
        labels = torch.zeros(len(ids), dtype=torch.int64, device=ids.device)
        for t, target in enumerate(clip):
            rows = torch.searchsorted(ids, target["ids"])
            masks[rows, t] = target["masks"]
            labels[rows] = target["labels"]
        empty = masks.new_zeros((0, num_frames * h, w))
        tubes.append(
            {
                "labels": labels,
                "masks": masks.flatten(1, 2),
                "stuff_labels": labels[:0],
                "stuff_masks": empty,
            }
        )
    return tubes


@META_ARCH_REGISTRY.register()
class VideoKNetClip(KNet):
    """Clip-level Video K-Net for video instance segmentation (YouTube-VIS).

    Inputs: one dict per clip, {"frames": [T frame dicts]} with the image model's frame keys
    ("image", "height", "width"; in training "instances" with ``gt_ids``, the object each mask
    shows). Training: a batch of clips of equal length T (the official recipe: 5 consecutive
    frames); the image K-Net's losses on every frame and the clip head's ``tracker_s*`` losses
    on object tubes (``KNetCriterion.tube_losses``). Inference: a whole video is one clip.

    Output per clip, as Mask2Former's video models: {"image_size": (H, W) of the first frame's
    output, "pred_scores": (k,), "pred_labels": (k,) contiguous classes, "pred_masks":
    (k, T, H, W) bool}: the ``topk`` best (kernel, class) pairs of the clip's class scores, each
    an object with one id across the clip (its index), its mask in every frame.
    """

    extra_predictions = ("features", "kernels", "kernel_masks")  # the clip head's inputs

    @configurable
    def __init__(self, *, clip_head: ClipKernelHead, topk: int = 10, **kwargs):
        """
        Args:
            clip_head: the clip-level head on the image head's last stage.
            topk: objects per video (the official ``max_per_img``).
            kwargs: see ``KNet``.
        """
        super().__init__(**kwargs)
        self.clip_head = clip_head
        self.topk = topk

    @classmethod
    def from_config(cls, cfg) -> dict:
        ret = super().from_config(cfg)
        v = cfg.MODEL.KNET.VIDEO
        threshold = cfg.MODEL.KNET.HARD_MASK_THRESHOLD
        classify = build_update_stages(
            cfg, num_classes=cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES, hard_mask_threshold=threshold
        )
        per_frame = build_update_stages(cfg, num_classes=0, hard_mask_threshold=threshold)
        stages = classify[: v.CLIP_STAGES] + per_frame[v.CLIP_STAGES :]  # frames: no classes
        ret["clip_head"] = ClipKernelHead(
            stages, v.CLIP_STAGES, cfg.MODEL.KNET.MASK_UPSAMPLE_STRIDE
        )
        ret["topk"] = v.CLIP_TOPK
        return ret

    def forward(self, batched_inputs: list[dict]):
        """Training: dict of weighted losses. Inference: one dict per clip (class docstring)."""
        if not self.training:
            return [self.infer_clip(x["frames"]) for x in batched_inputs]
        frames = [f for x in batched_inputs for f in x["frames"]]
        num_frames = len(batched_inputs[0]["frames"])
        if len(frames) != num_frames * len(batched_inputs):
            raise ValueError("VideoKNetClip trains on clips of one length (the dataset's clips)")
        require_object_ids(
            frames, "VideoKNetClip", "clip records: register_video_dataset(clip_frames=5)"
        )
        images = self.preprocess_image(frames)
        outputs = self.kernel_head(*self.pixel_decoder(self.backbone(images.tensor)))
        mask_size = outputs["init"]["mask_logits"].shape[-2:]
        targets = self.prepare_targets(frames, images.tensor.shape[-2:], mask_size)
        losses = self.criterion(outputs, targets)
        clip_stages = self.clip_head(*self.clip_inputs(outputs, num_frames))
        tubes = tube_targets(targets, num_frames)
        losses.update(
            self.criterion.tube_losses(clip_stages, tubes, self.clip_head.num_clip_stages)
        )
        return losses

    @staticmethod
    def clip_inputs(outputs: dict, num_frames: int) -> tuple[torch.Tensor, ...]:
        """The image head's (B T, ...) features, kernels and mask logits (of its outputs or of
        ``predict``'s) as (B, T, ...)."""
        return tuple(
            outputs[k].unflatten(0, (-1, num_frames))
            for k in ("features", "kernels", "kernel_masks")
        )

    def infer_clip(self, frames: list[dict]) -> dict:
        """The objects of one clip (all frames in one batch), see the class docstring."""
        images = self.preprocess_image(frames)
        predictions = self.predict(images.tensor)  # the image network, under AMP when set
        # float32 from here, also inside a caller's autocast region
        with torch.autocast(self.device.type, enabled=False):
            (last,) = self.clip_head(*self.clip_inputs(predictions, len(frames)))
            scores = last["cls_logits"][0].sigmoid()  # (N, K)
            top = scores.flatten().topk(min(self.topk, scores.numel()))
            kernels, labels = top.indices // scores.shape[1], top.indices % scores.shape[1]
            masks = last["mask_logits"][0][:, kernels].sigmoid()  # (T, k, h, w)
            threshold = self.postprocessor.mask_threshold
            geometries = self.output_geometries(frames, images)
            masks = torch.stack(
                [resize_to_output(m, g) > threshold for m, g in zip(masks, geometries)], dim=1
            )
        return {
            "image_size": geometries[0].out_size,
            "pred_scores": top.values,
            "pred_labels": labels,
            "pred_masks": masks,
        }
