"""What both K-Net meta-architectures share: input checks and normalisation, the network
(backbone -> pixel decoder -> kernel head), mixed-precision inference and output geometries."""

import math

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from detectron2.modeling import Backbone, build_backbone
from detectron2.structures import ImageList
from detectron2.utils import comm
from torch import nn

from ..kernel_head import build_kernel_head
from ..pixel_decoder import build_pixel_decoder
from ..postprocessing import OutputGeometry, detectron2_outputs

__all__ = ["KNetBase", "check_image", "checked_image", "inference_amp_dtype", "pad_to_global_batch"]


def pixel_range_top(pixel_mean) -> int:
    """The largest pixel value a config's images have: 255 when ``PIXEL_MEAN`` is in 0-255 (every
    shipped config), else 1."""
    return 255 if float(max(pixel_mean)) > 1 else 1


def check_image(image, name: str, top: float = 255, channels_last: bool = False) -> None:
    """Raise ``ValueError`` for an image that would be segmented wrong or fail deep inside: the
    one check of every entry point (the model, ``DefaultPredictor``, ``ExportedKNet``).

    Args:
        image: a tensor or numpy array, (3, H, W) or (1, H, W); (H, W, 3) or (H, W, 1) if
            ``channels_last``. uint8, or floating point with finite values in [0, ``top``].
        name: what the message calls it ("input 0 (frame_7.png)", "image").
        top: the largest pixel value (255 for every shipped config: ``PIXEL_MEAN`` > 1).
    The commonest mistakes (grayscale without a channel axis, channels in the other place,
    RGBA, empty, 16-bit, NaNs, a float image in [0, 1], an image normalised already) are named.
    """
    layout = "an (H, W, 3) array" if channels_last else "a (3, H, W) tensor"
    expected = f"expected {layout} of 0-{top:g} pixel values in the config's INPUT.FORMAT"
    shape = tuple(image.shape)
    channels = (shape[-1] if channels_last else shape[0]) if len(shape) == 3 else None
    if channels not in (1, 3):
        if len(shape) == 2:
            hint = " (grayscale? give it 3 channels, e.g. cv2.cvtColor(img, cv2.COLOR_GRAY2BGR))"
        elif channels == 4:
            hint = " (RGBA? drop the alpha channel, e.g. cv2.cvtColor(img, cv2.COLOR_BGRA2BGR))"
        elif len(shape) == 3 and not channels_last and shape[-1] in (1, 3, 4):
            hint = " (an (H, W, C) array? use image.permute(2, 0, 1))"
        elif len(shape) == 3 and channels_last and shape[0] in (1, 3, 4):
            hint = " (a (C, H, W) array? use image.transpose(1, 2, 0))"
        else:
            hint = ""
        raise ValueError(f"{name}: got an image of shape {shape}; {expected}{hint}")
    if 0 in shape:
        raise ValueError(f"{name}: the image is empty ({shape}); {expected}")
    dtype = str(image.dtype).replace("torch.", "")
    if not (dtype == "uint8" or dtype.startswith(("float", "bfloat"))):
        hint = " (16-bit? scale it to 0-255 and convert to uint8)" if "int16" in dtype else ""
        raise ValueError(f"{name}: got a {dtype} image; {expected}{hint}")
    if dtype == "uint8":
        return
    values = (
        image if isinstance(image, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(image))
    )
    low, high = (float(v) for v in torch.aminmax(values))
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError(f"{name}: the image has NaN or infinite values; {expected}")
    if low < 0 or high > top * 1.001:
        raise ValueError(
            f"{name}: pixel values range over [{low:.3g}, {high:.3g}]; {expected} (an image "
            "normalised already, or of another bit depth?)"
        )
    if top == 255 and 0 < high <= 1:
        raise ValueError(
            f"{name}: pixel values range over [{low:.3g}, {high:.3g}]; {expected}: multiply "
            "an image in [0, 1] by 255"
        )


def checked_image(inputs: dict, index: int, pixel_mean: torch.Tensor) -> torch.Tensor:
    """``inputs["image"]`` after :func:`check_image`, as (3, H, W) (a (1, H, W) grayscale image
    is broadcast). Skipped while tracing (the checks read values)."""
    image = inputs.get("image") if isinstance(inputs, dict) else None
    name = f"input {index}" + (f" ({inputs['file_name']})" if "file_name" in inputs else "")
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"{name}: 'image' must be a (3, H, W) tensor, got {type(image).__name__}")
    if not torch.jit.is_tracing():
        check_image(image, name, top=pixel_range_top(pixel_mean.flatten().tolist()))
    return image.expand(3, -1, -1) if image.shape[0] == 1 else image


def inference_amp_dtype(cfg) -> torch.dtype | None:
    """``MODEL.KNET.TEST.AMP_DTYPE``: "" (float32), "float16", "bfloat16" or "auto" (float16 on
    CUDA, bfloat16 on the CPU)."""
    name = cfg.MODEL.KNET.TEST.AMP_DTYPE
    if name == "auto":
        name = "float16" if cfg.MODEL.DEVICE.startswith("cuda") else "bfloat16"
    if name not in ("", "float16", "bfloat16"):
        raise ValueError(
            f"MODEL.KNET.TEST.AMP_DTYPE must be '', 'auto', 'float16' or 'bfloat16', got {name!r}"
        )
    return getattr(torch, name) if name else None


def pad_to_global_batch(images: ImageList) -> ImageList:
    """``images`` zero-padded (bottom/right) to the largest padded size of all processes' batches
    (one all-reduce), the size one process holding the global batch would pad it to; the
    images themselves and their ``image_sizes`` are unchanged. Every process must call it."""
    h, w = images.tensor.shape[-2:]
    size = torch.tensor([h, w], device=images.tensor.device)
    if comm.get_world_size() > 1:
        dist.all_reduce(size, op=dist.ReduceOp.MAX)
    pad_h, pad_w = int(size[0]) - h, int(size[1]) - w
    if pad_h == pad_w == 0:
        return images
    return ImageList(F.pad(images.tensor, (0, pad_w, 0, pad_h)), images.image_sizes)


class KNetBase(nn.Module):
    """backbone -> pixel decoder -> kernel head, trained by ``criterion``.

    ``extra_predictions``: kernel-head outputs besides the last stage's that ``predict`` returns
    (Video K-Net's kernels).

    Inputs follow Detectron2's contract: a list of dicts with "image" (C, H, W) in
    ``INPUT.FORMAT`` (uint8 or float, unnormalised), optional "height"/"width" (output size) and
    the training targets of the subclass. Subclasses define ``losses`` (training) and
    ``postprocess`` (eval mode).
    """

    extra_predictions: tuple[str, ...] = ()

    def __init__(
        self,
        *,
        backbone: Backbone,
        pixel_decoder: nn.Module,
        kernel_head: nn.Module,
        criterion: nn.Module,
        size_divisibility: int,
        pixel_mean: list[float],
        pixel_std: list[float],
        channels_last: bool = False,
        amp_dtype: torch.dtype | None = None,
        global_batch_padding: bool = False,
    ):
        """
        Args:
            backbone, pixel_decoder, kernel_head: the three parts; the pixel decoder's outputs
                are passed to the kernel head as positional args.
            criterion: the training losses of the kernel head's outputs.
            size_divisibility: images are padded (bottom/right) to a multiple of this.
            pixel_mean, pixel_std: the input normalisation (``MODEL.PIXEL_MEAN/STD``).
            channels_last: run the network on channels-last tensors.
            amp_dtype: inference under autocast in this dtype (None: float32).
            global_batch_padding: in training with several processes, pad every process's
                batch to the size of the global batch (``pad_to_global_batch``), so that
                images, mask targets and losses are those of one process holding it.
        """
        super().__init__()
        self.backbone = backbone
        self.pixel_decoder = pixel_decoder
        self.kernel_head = kernel_head
        self.criterion = criterion
        self.size_divisibility = size_divisibility
        self.channels_last = channels_last
        self.amp_dtype = amp_dtype
        self.global_batch_padding = global_batch_padding
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)

    @classmethod
    def from_config(cls, cfg) -> dict:
        k = cfg.MODEL.KNET
        if len(k.STAGE_LOSS_WEIGHTS) != k.NUM_STAGES:
            raise ValueError(
                f"MODEL.KNET.STAGE_LOSS_WEIGHTS has {len(k.STAGE_LOSS_WEIGHTS)} entries, "
                f"MODEL.KNET.NUM_STAGES is {k.NUM_STAGES}"
            )
        if cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES < 0:
            raise ValueError(
                "MODEL.SEM_SEG_HEAD.NUM_CLASSES is -1, which means 'from the training dataset': "
                "set the class counts, or configure the config for its registered datasets first "
                "(train_net.py and the demo do; in Python: configure_for_datasets of "
                "knet.engine.dataset_config)"
            )
        backbone = build_backbone(cfg)
        return {
            "backbone": backbone,
            "pixel_decoder": build_pixel_decoder(cfg, backbone.output_shape()),
            "kernel_head": build_kernel_head(cfg),
            "size_divisibility": k.SIZE_DIVISIBILITY,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "channels_last": k.CHANNELS_LAST,
            "amp_dtype": inference_amp_dtype(cfg),
            "global_batch_padding": k.GLOBAL_BATCH_LOSSES,
        }

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def preprocess_image(self, batched_inputs: list[dict]) -> ImageList:
        """Checked, normalised images padded to a batch (bottom/right, to a multiple of
        ``size_divisibility``; in training with ``global_batch_padding``, to the global batch's
        size), channels-last when ``channels_last``."""
        images = [
            (checked_image(x, i, self.pixel_mean).to(self.device) - self.pixel_mean)
            / self.pixel_std
            for i, x in enumerate(batched_inputs)
        ]
        images = ImageList.from_tensors(images, self.size_divisibility)
        # training only: inference batches are not shared out evenly (a collective could hang)
        if self.training and self.global_batch_padding and comm.get_world_size() > 1:
            images = pad_to_global_batch(images)
        if self.channels_last:
            images.tensor = images.tensor.contiguous(memory_format=torch.channels_last)
        return images

    def forward(self, batched_inputs: list[dict]):
        """Training: dict of weighted losses. Inference: one dict of Detectron2 outputs per
        image, at its output size."""
        images = self.preprocess_image(batched_inputs)
        if not self.training:
            predictions = self.predict(images.tensor)
            # float32 post-processing, also inside a caller's autocast region
            with torch.autocast(images.tensor.device.type, enabled=False):
                return self.inference(predictions, batched_inputs, images)
        features = self.backbone(images.tensor)
        outputs = self.kernel_head(*self.pixel_decoder(features))
        return self.losses(outputs, features, batched_inputs, images)

    def predict(self, images: torch.Tensor, **head_inputs) -> dict[str, torch.Tensor]:
        """The network in eval mode: (B, 3, H, W) normalised, padded images -> the last stage's
        float32 predictions (see the kernel head); ``head_inputs``: the kernel head's keyword
        arguments (Video K-Net's previous kernels).

        With ``amp_dtype`` the network runs under autocast in that dtype (post-processing is
        always float32)."""
        with torch.autocast(
            images.device.type, dtype=self.amp_dtype or torch.float32, enabled=bool(self.amp_dtype)
        ):
            features = self.backbone(images)
            outputs = self.kernel_head(*self.pixel_decoder(features), **head_inputs)
        predictions = {k: v for k, v in outputs["stages"][-1].items() if v is not None}
        predictions.update({k: outputs[k] for k in self.extra_predictions})
        return {k: v.float() for k, v in predictions.items()}

    @staticmethod
    def output_geometries(batched_inputs, images: ImageList) -> list[OutputGeometry]:
        """Per image: the padded input size, its size inside it, and the requested output size
        ("height"/"width" of the input dict, default the image size)."""
        padded_size = tuple(images.tensor.shape[-2:])
        geometries = []
        for x, image_size in zip(batched_inputs, images.image_sizes):
            output_size = (x.get("height", image_size[0]), x.get("width", image_size[1]))
            if tuple(output_size) == tuple(image_size):
                output_size = None
            geometries.append(OutputGeometry(padded_size, image_size, output_size))
        return geometries

    def losses(
        self, outputs: dict, features: dict[str, torch.Tensor], batched_inputs, images: ImageList
    ) -> dict[str, torch.Tensor]:
        """The weighted training losses of the kernel head's ``outputs``."""
        raise NotImplementedError

    def postprocess(
        self, predictions: dict[str, torch.Tensor], index: int, geometry: OutputGeometry
    ) -> dict[str, torch.Tensor]:
        """The outputs of image ``index`` of ``predict``'s predictions, as tensors at the output
        size of ``geometry`` (the exported graphs return these)."""
        raise NotImplementedError

    def inference(
        self, predictions: dict[str, torch.Tensor], batched_inputs, images: ImageList
    ) -> list[dict]:
        """Per image, Detectron2's outputs (``postprocess``'s, as Detectron2 structures)."""
        geometries = self.output_geometries(batched_inputs, images)
        return [
            detectron2_outputs(self.postprocess(predictions, i, g))
            for i, g in enumerate(geometries)
        ]
