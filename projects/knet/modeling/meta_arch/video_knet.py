"""Video K-Net for video panoptic segmentation (``VideoKNet``; lxtGH/Video-K-Net
``knet/video/knet_quansi_dense_embed_fc_joint_train.py``): image K-Net whose thing kernels are
linked to the previous frame's, embedded, and associated across frames by a tracker."""

from __future__ import annotations

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.structures import ImageList

from ..criterion.association import association_losses, association_targets
from ..kernel_head.video_heads import KernelAssociationHead, KernelFusion, KernelLink
from ..postprocessing import KNetPostProcessor, OutputGeometry, detectron2_outputs
from ..postprocessing.base import resize_to_output
from ..tracking import QuasiDenseTracker, track_panoptic_segments
from .knet import KNet


def require_object_ids(frames: list[dict], model: str, how: str) -> None:
    """Raise a ValueError naming ``how`` to get them unless every training frame's instances
    have ``gt_ids`` (the object each mask shows)."""
    for x in frames:
        if not x["instances"].has("gt_ids"):
            raise ValueError(
                f"{model} needs instances.gt_ids (the object of each mask) in its training "
                f"inputs; {x.get('file_name', 'an input')} has none: use the video mapper ({how})"
            )


@META_ARCH_REGISTRY.register()
class VideoKNet(KNet):
    """K-Net on video frames: the image model's outputs, plus a track id per thing segment.

    Training inputs: the image model's, plus "reference": the same for a nearby frame of the same
    video (shared augmentation), and ``gt_ids`` (the object each mask shows) in both frames'
    "instances". Losses: the image losses of both frames (the reference's with the suffix
    "_ref") and the association losses of the key frame's linked, embedded kernels against the
    reference frame's plain ones (``criterion.association``), positives and negatives from the
    Hungarian assignment of each frame's last stage to its own thing masks.

    Inference: frames of one video in order (one process). ``panoptic_seg``'s segments get
    "track_id" (>= 1 a tracked thing; 0 untracked things and stuff); a new video starts (memory
    and tracker reset) when "video_id" changes, when "frame_index" is 0 or goes back, or on
    :meth:`reset`. The network is the image model's (without kernel fusion); linking and
    embedding run after it on the last stage's kernels (:meth:`tracking_inputs`, also in the
    exported graphs), the tracker in Python with plain tensors as state.
    """

    extra_predictions = ("kernels", "seg_logits")

    @configurable
    def __init__(
        self,
        *,
        kernel_link: KernelLink | KernelFusion | None,
        association_head: KernelAssociationHead,
        tracker: QuasiDenseTracker,
        association_weights: dict[str, float],
        association_options: dict[str, float],
        semantic_filter: bool = True,
        **kwargs,
    ):
        """
        Args:
            kernel_link: links the last stage's kernels to the previous frame's (None: off); a
                ``KernelFusion`` first updates the previous kernels with the last stage's group
                features (the "update" link).
            association_head: kernels -> association embeddings.
            tracker: the online tracker of the thing segments.
            association_weights: {"track", "track_aux"} loss weights.
            association_options: :func:`~..criterion.association.hard_mined_l2`'s options.
            semantic_filter: tracker boxes keep only the pixels the initial head's semantic
                map calls a thing.
            kwargs: see ``KNet``.
        """
        super().__init__(**kwargs)
        self.kernel_link = kernel_link
        self.association_head = association_head
        self.tracker = tracker
        self.association_weights = association_weights
        self.association_options = association_options
        self.semantic_filter = semantic_filter
        if isinstance(kernel_link, KernelFusion):  # it reads the last stage's group features
            self.extra_predictions = (*self.extra_predictions, "features", "last_input_masks")
        self.reset()

    @classmethod
    def from_config(cls, cfg) -> dict:
        ret = super().from_config(cfg)
        v, k = cfg.MODEL.KNET.VIDEO, cfg.MODEL.KNET
        channels = cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM
        t = v.TRACKER
        ret["postprocessor"] = KNetPostProcessor(
            cfg, num_thing_classes=k.NUM_THING_CLASSES, segment_kernels=True
        )
        if v.KERNEL_FUSION:  # the last stage's input absorbs the previous frame's kernels
            fusion = KernelFusion(channels, k.NHEADS, k.DIM_FEEDFORWARD)
            ret["kernel_head"].stages[-1].fusion = fusion
        links = {"ffn": KernelLink, "update": KernelFusion}
        if v.LINK_TYPE not in links:
            raise ValueError(f"MODEL.KNET.VIDEO.LINK_TYPE {v.LINK_TYPE!r} not in {list(links)}")
        ret.update(
            kernel_link=links[v.LINK_TYPE](channels, k.NHEADS, k.DIM_FEEDFORWARD)
            if v.LINK_PREVIOUS
            else None,
            association_head=KernelAssociationHead(channels, v.EMBED_DIM),
            tracker=QuasiDenseTracker(
                init_score_thresh=t.INIT_SCORE_THRESH,
                obj_score_thresh=t.OBJ_SCORE_THRESH,
                match_score_thresh=t.MATCH_SCORE_THRESH,
                memo_tracklet_frames=t.MEMORY_FRAMES,
                memo_backdrop_frames=t.BACKDROP_FRAMES,
                memo_momentum=t.MOMENTUM,
                nms_conf_thresh=t.NMS_CONF_THRESH,
                nms_backdrop_iou_thresh=t.NMS_BACKDROP_IOU_THRESH,
                nms_class_iou_thresh=t.NMS_CLASS_IOU_THRESH,
                with_cats=t.WITH_CATS,
                official_id_alignment=t.OFFICIAL_ID_ALIGNMENT,
            ),
            association_weights={"track": v.TRACK_WEIGHT, "track_aux": v.TRACK_AUX_WEIGHT},
            association_options={
                "neg_pos_ratio": v.TRACK_AUX_NEG_POS_RATIO,
                "neg_margin": v.TRACK_AUX_NEG_MARGIN,
            },
            semantic_filter=v.SEMANTIC_FILTER,
        )
        return ret

    @property
    def fuses_kernels(self) -> bool:
        """Whether the network itself reads the previous frame's kernels (kernel fusion)."""
        return self.kernel_head.stages[-1].fusion is not None

    def forward(self, batched_inputs: list[dict]):
        """Training: the losses of key/reference pairs. Inference: frames one at a time, in
        order (each may read the previous one's kernels), as ``KNet`` returns them, with track
        ids."""
        if self.training:
            return self.pair_losses(batched_inputs)
        results = []
        for x in batched_inputs:
            self.frame = self.next_frame_index(x)  # a new video resets the memory first
            results += super().forward([x])
        return results

    def predict(self, images: torch.Tensor, **head_inputs) -> dict[str, torch.Tensor]:
        if self.fuses_kernels:
            head_inputs.setdefault("previous", self.memory)
        return super().predict(images, **head_inputs)

    # ------------------------------------------------------------------------ training
    def pair_losses(self, batched_inputs: list[dict]) -> dict[str, torch.Tensor]:
        """Both frames' image losses and the association losses (see the class docstring). The
        reference frame runs first: with kernel fusion, the key frame's last stage reads its
        kernels."""
        references = [x["reference"] for x in batched_inputs]
        images, ref_images = (
            self.preprocess_image(batched_inputs),
            self.preprocess_image(references),
        )
        decoded = self.pixel_decoder(self.backbone(images.tensor))
        ref_outputs = self.kernel_head(*self.pixel_decoder(self.backbone(ref_images.tensor)))
        previous = ref_outputs["kernels"] if self.fuses_kernels else None
        outputs = self.kernel_head(*decoded, previous=previous)
        targets = self.frame_targets(outputs, batched_inputs, images)
        ref_targets = self.frame_targets(ref_outputs, references, ref_images)
        losses = self.criterion(outputs, targets)
        losses.update({f"{k}_ref": v for k, v in self.criterion(ref_outputs, ref_targets).items()})
        ref_kernels = ref_outputs["kernels"]
        kernels = self.track_kernels(outputs, ref_kernels)
        key_embeds, ref_embeds, pair_targets = [], [], []
        key_positives = self.track_positives(outputs, targets)
        ref_positives = self.track_positives(ref_outputs, ref_targets)
        for b, ((key, key_ids), (ref, ref_ids)) in enumerate(zip(key_positives, ref_positives)):
            key_embeds.append(self.association_head(kernels[b, key]))
            ref_embeds.append(self.association_head(ref_kernels[b, ref]))
            pair_targets.append(association_targets(key_ids, ref_ids)[0])
        losses.update(
            association_losses(
                key_embeds,
                ref_embeds,
                pair_targets,
                self.association_weights,
                self.association_options,
            )
        )
        return losses

    def track_kernels(self, outputs: dict, previous: torch.Tensor | None) -> torch.Tensor:
        """The (B, N, C) kernels the association head embeds: the last stage's "kernels" of
        ``outputs``, linked to the previous frame's (B, N, C) ``previous`` when given."""
        kernels = outputs["kernels"]
        if self.kernel_link is None or previous is None:
            return kernels
        if isinstance(self.kernel_link, KernelFusion):
            last = self.kernel_head.stages[-1]
            _, group = last.group_features(outputs["features"], outputs["last_input_masks"])
            return self.kernel_link(group.to(kernels.dtype), kernels, previous)
        return self.kernel_link(kernels, previous)

    def frame_targets(self, outputs: dict, batched_inputs, images: ImageList) -> list[dict]:
        require_object_ids(
            batched_inputs, "VideoKNet", "INPUT.DATASET_MAPPER_NAME 'knet_video_panoptic'"
        )
        mask_size = outputs["init"]["mask_logits"].shape[-2:]
        return self.prepare_targets(batched_inputs, images.tensor.shape[-2:], mask_size)

    def track_positives(self, outputs: dict, targets: list[dict]):
        """Per image: the thing kernels the last stage's (detached) predictions match to a thing
        mask, ascending, and the object ids they were matched to."""
        last = outputs["stages"][-1]
        assignments = self.criterion.match(
            last["mask_logits"], last["cls_logits"], targets, "track assignment"
        )
        for assigned, target in zip(assignments, targets):
            kernels = (assigned >= 0).nonzero().squeeze(1)
            yield kernels, target["ids"][assigned[kernels]]

    # ------------------------------------------------------------------------ inference
    def reset(self) -> None:
        """Start a new video: no previous kernels, an empty tracker."""
        self.memory: torch.Tensor | None = None
        self.stream: tuple | None = None  # (video_id, frame_index) of the last frame
        self.frame = 0  # the frame index of the frame being inferred
        self.tracker.reset()

    def next_frame_index(self, inputs: dict) -> int:
        """The frame index of ``inputs`` (resetting at the start of a new video): its
        "frame_index", else one more than the last frame's."""
        video = inputs.get("video_id")
        last_video, last_frame = self.stream or (video, -1)
        frame = int(inputs.get("frame_index", last_frame + 1))
        if self.stream is not None and (video != last_video or frame <= last_frame):
            self.reset()
        self.stream = (video, frame)
        return frame

    def inference(self, predictions: dict, batched_inputs, images: ImageList) -> list[dict]:
        """One frame (``forward`` runs them one at a time): the image outputs, panoptic segments
        with a "track_id" (>= 1: the thing's track; 0: stuff and untracked things)."""
        (geometry,) = self.output_geometries(batched_inputs, images)
        outputs = self.postprocess(predictions, 0, geometry)
        panoptic = "panoptic_seg" in outputs
        with_things = panoptic and bool(outputs["segment_isthing"].any())
        tracking = self.tracking_inputs(predictions, geometry, self.memory, with_things)
        self.memory = tracking["kernels"][None]
        if panoptic:
            outputs["segment_track_id"] = track_panoptic_segments(
                self.tracker,
                outputs,
                tracking["track_embeddings"],
                self.frame,
                tracking.get("thing_pixels"),
            )
        outputs.pop("segment_kernel", None)
        return [detectron2_outputs(outputs)]

    def tracking_inputs(
        self,
        predictions: dict,
        geometry: OutputGeometry,
        previous: torch.Tensor | None,
        thing_pixels: bool = True,
        has_previous: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """What the tracker reads of one frame (the first of ``predictions``), as tensors (the
        exported graphs compute them too; the tracker itself runs in Python):

        - "track_embeddings" (N, E): the association embeddings of the last stage's kernels,
          linked to ``previous`` (1, N, C), the previous frame's kernels, when it is given and,
          with ``has_previous`` (a bool scalar tensor: the graphs' form), where that is true;
        - "kernels" (N, C): this frame's kernels, the next frame's ``previous``;
        - with the semantic filter and ``thing_pixels``: "thing_pixels" (H, W) bool, the pixels
          the initial head's semantic map calls a thing (the official code resizes the map
          without cropping the padding).
        """
        current = {k: predictions[k][:1] for k in self.extra_predictions}
        kernels = current["kernels"]
        linked = self.track_kernels(current, previous)
        if has_previous is not None:
            linked = torch.where(has_previous, linked, kernels)
        out = {"track_embeddings": self.association_head(linked[0]), "kernels": kernels[0]}
        if self.semantic_filter and thing_pixels:
            semantic = resize_to_output(predictions["seg_logits"][0], geometry)
            out["thing_pixels"] = semantic.argmax(0) < self.postprocessor.num_thing_classes
        return out
