"""Export K-Net to TorchScript and ONNX, and run the exported files.

K-Net has no boxes, NMS or matching at test time, so the whole model exports: the graph takes
one uint8 image (3, H, W) of any size in ``INPUT.FORMAT``, normalises and pads it, runs the
network and the post-processing of eager inference (:mod:`knet.modeling.postprocessing`), and
returns plain tensors at the input size (resizing the input is the caller's, as in Detectron2):

* panoptic: ``panoptic_seg`` (H, W) int32 segment ids and the segment table
  ``segment_category_id`` (S,) int64, ``segment_score`` (S,), ``segment_isthing`` (S,) bool,
  ``segment_area`` (S,) int64 (row i is segment id i + 1);
* instance: ``pred_masks`` (M, H, W) bool, ``scores`` (M,), ``pred_classes`` (M,) int64,
  ``pred_boxes`` (M, 4) XYXY;
* semantic: ``sem_seg`` (K, H, W) float32 (class scores of instance/panoptic K-Net, softmax
  probabilities of semantic K-Net).

Which outputs a model has follows ``MODEL.KNET.TEST.{PANOPTIC,INSTANCE,SEMANTIC}_ON``.
:class:`ExportedKNet` runs a file with TorchScript or ONNX Runtime and returns the same dict;
its ``run_on_image`` also resizes an image like the test loader and brings the outputs back to
the image size.

Video K-Net (``VideoKNet``, without kernel fusion) exports with its tracking inputs: the graph
also takes ``previous_kernels`` (N, C), the last frame's kernels, and ``has_previous`` (a bool
scalar, false on a video's first frame), and returns ``segment_kernel`` (S,), the association
embeddings ``track_embeddings`` (N, E) of the linked kernels, this frame's ``kernels`` (N, C) and
``thing_pixels`` (H, W) bool (the semantic filter). The quasi-dense tracker runs in Python on
these tensors (:class:`ExportedKNet` keeps its state and the previous kernels per video) and
gives ``segment_track_id`` (S,).
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from detectron2.data import transforms as T
from detectron2.data.catalog import Metadata
from torch import Tensor, nn
from torch.onnx import symbolic_helper

from .data.kinds import CLASS_FIELDS, model_description, registered_or
from .modeling.meta_arch.base import check_image
from .modeling.postprocessing import OutputGeometry
from .modeling.tracking import QuasiDenseTracker, track_panoptic_segments

# The lowest ONNX opset the graph exports to and ONNX Runtime runs: scatter-add with a reduction
# (the segment areas) needs 16, deformable convolutions (DeformConv) 19.
ONNX_OPSET = 16
DEFORM_CONV_OPSET = 19
METADATA_FILE = "knet.json"  # extra file of a TorchScript export / metadata key in ONNX
# output name -> its dynamic axes, by output (the order of the exported tuple)
PANOPTIC_OUTPUTS = {
    "panoptic_seg": {0: "height", 1: "width"},
    **{f"segment_{k}": {0: "segments"} for k in ("category_id", "score", "isthing", "area")},
}
INSTANCE_OUTPUTS = {
    "pred_masks": {0: "instances", 1: "height", 2: "width"},
    **{k: {0: "instances"} for k in ("scores", "pred_classes", "pred_boxes")},
}
SEMANTIC_OUTPUTS = {"sem_seg": {1: "height", 2: "width"}}
TRACKING_OUTPUTS = {
    "segment_kernel": {0: "segments"},
    "track_embeddings": {},
    "kernels": {},
    "thing_pixels": {0: "height", 1: "width"},
}
TRACKING_INPUTS = ("previous_kernels", "has_previous")


class KNetExportModule(nn.Module):
    """A K-Net model (``knet.modeling.KNet`` or ``SemanticKNet``, eval mode) as a function of
    one (3, H, W) uint8 image in ``INPUT.FORMAT`` -> a tuple of tensors named by ``output_names``
    (see the module docstring), at the input size."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.eval()
        self.output_names: list[str] = []
        post = getattr(model, "postprocessor", None)  # None: semantic K-Net (sem_seg only)
        for enabled, outputs in (
            (post is not None and post.panoptic_on, PANOPTIC_OUTPUTS),
            (post is not None and post.instance_on, INSTANCE_OUTPUTS),
            (post is None or post.semantic_on, SEMANTIC_OUTPUTS),
        ):
            self.output_names += list(outputs) if enabled else []
        if not self.output_names:
            raise ValueError("the model has no output enabled (MODEL.KNET.TEST.*_ON)")
        self.tracks = hasattr(model, "tracking_inputs")  # Video K-Net
        if self.tracks:
            if model.fuses_kernels:
                raise ValueError(
                    "Video K-Net with kernel fusion (MODEL.KNET.VIDEO.KERNEL_FUSION) reads the "
                    "previous frame inside the network: its export is not supported (the graph "
                    "would be the first frame's)"
                )
            names = [n for n in TRACKING_OUTPUTS if n != "thing_pixels" or model.semantic_filter]
            self.output_names += names
        self.eval()  # (exporters restore the mode they found, recursively)

    @property
    def input_names(self) -> list[str]:
        return ["image", *(TRACKING_INPUTS if self.tracks else ())]

    def sample_inputs(self, image: Tensor) -> tuple[Tensor, ...]:
        """The inputs to trace with: ``image`` and, for Video K-Net, a previous frame."""
        if not self.tracks:
            return (image,)
        kernels = self.model.predict(self.model.preprocess_image([{"image": image}]).tensor)
        return image, torch.randn_like(kernels["kernels"][0]), torch.tensor(True)

    def forward(
        self,
        image: Tensor,
        previous_kernels: Tensor | None = None,
        has_previous: Tensor | None = None,
    ) -> tuple[Tensor, ...]:
        model = self.model
        images = model.preprocess_image([{"image": image}])  # normalise, pad (traced sizes)
        predictions = model.predict(images.tensor)
        geometry = OutputGeometry(tuple(images.tensor.shape[-2:]), tuple(image.shape[-2:]))
        outputs = model.postprocess(predictions, 0, geometry)
        if self.tracks:  # (no previous kernels: a first frame)
            previous = None if previous_kernels is None else previous_kernels[None]
            outputs.update(
                model.tracking_inputs(predictions, geometry, previous, True, has_previous)
            )
        return tuple(outputs[name] for name in self.output_names)

    def metadata(self, cfg) -> dict:
        """What a runner needs besides the graph: outputs, input format, test resizing, class
        names and colours (``knet.data.kinds.model_description``), the test dataset and, for
        Video K-Net, the tracker's options and the kernels' shape (N, C)."""
        meta = {
            "output_names": self.output_names,
            **model_description(cfg),
            "dataset": cfg.DATASETS.TEST[0] if len(cfg.DATASETS.TEST) else "",
        }
        if self.tracks:
            head = self.model.kernel_head
            num_kernels = head.initial_head.num_proposals + head.initial_head.num_stuff_classes
            meta["tracker"] = self.model.tracker.options()
            meta["kernels_shape"] = [num_kernels, cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM]
        return meta


@contextlib.contextmanager
def _exportable() -> Iterator[None]:
    """No fused attention kernel (``aten::_native_multi_head_attention`` has no ONNX form)
    and no autograd while exporting."""
    fast_path = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # the tracer's notes on Python values: the sizes that matter are traced (checked by
            # running the result at other sizes), the rest (class counts, flags) is constant
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export")
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fast_path)


def export_torchscript(
    module: KNetExportModule, sample_image: Tensor, path: str, metadata: dict, method: str
) -> str:
    """Trace (``method="tracing"``) or script ``module`` and save it with its metadata."""
    with _exportable():
        if method == "tracing":
            inputs = module.sample_inputs(sample_image)
            exported = torch.jit.trace(module, inputs, check_trace=False)
        elif method == "scripting":
            exported = torch.jit.script(module)
        else:
            raise ValueError(f"export method must be 'tracing' or 'scripting', got {method!r}")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.jit.save(exported, path, _extra_files={METADATA_FILE: json.dumps(metadata)})
    return path


def lowest_onnx_opset(module: nn.Module) -> int:
    """The lowest opset ``module`` exports to: 19 with deformable convolutions, else 16."""
    from .modeling.backbone.deform_conv import DeformConv

    deformable = any(isinstance(m, DeformConv) for m in module.modules())
    return DEFORM_CONV_OPSET if deformable else ONNX_OPSET


def _deform_conv2d_symbolic(g, x, weight, offset, mask, bias, *options):
    """``torchvision::deform_conv2d`` as ONNX DeformConv (same offset layout: (dy, dx) per
    kernel position and offset group). ``options``: stride, padding and dilation (h, w),
    groups and offset groups (ints), then whether ``mask`` is used (bool)."""
    *ints, use_mask = options
    sh, sw, ph, pw, dh, dw, groups, offset_groups = (
        symbolic_helper._parse_arg(v, "i") for v in ints
    )
    inputs = [x, weight, offset, bias]
    if symbolic_helper._parse_arg(use_mask, "b"):
        inputs.append(mask)
    return g.op(
        "DeformConv",
        *inputs,
        dilations_i=[dh, dw],
        group_i=groups,
        kernel_shape_i=symbolic_helper._get_tensor_sizes(weight)[2:],
        offset_group_i=offset_groups,
        pads_i=[ph, pw, ph, pw],
        strides_i=[sh, sw],
    )


def export_onnx(
    module: KNetExportModule,
    sample_image: Tensor,
    path: str,
    metadata: dict,
    opset: int | None = None,
) -> str:
    """Export ``module`` to ONNX (traced, dynamic image height and width) at ``opset``
    (default: the lowest that works, ``lowest_onnx_opset``), check it with ``onnx.checker``
    and store ``metadata`` in the model's metadata."""
    import onnx

    lowest = lowest_onnx_opset(module)
    opset = lowest if opset is None else opset
    if opset < lowest:
        # below 16 the exporter writes scatter-add (the segment areas) without its reduction:
        # the graph would run and give wrong panoptic segments
        raise ValueError(f"this model exports to ONNX opset {lowest} or newer, got {opset}")
    torch.onnx.register_custom_op_symbolic(
        "torchvision::deform_conv2d", _deform_conv2d_symbolic, DEFORM_CONV_OPSET
    )

    axes = {**PANOPTIC_OUTPUTS, **INSTANCE_OUTPUTS, **SEMANTIC_OUTPUTS, **TRACKING_OUTPUTS}
    dynamic_axes = {"image": {1: "height", 2: "width"}}
    dynamic_axes.update({name: axes[name] for name in module.output_names})
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with _exportable():
        torch.onnx.export(
            module,
            module.sample_inputs(sample_image),
            path,
            input_names=module.input_names,
            output_names=module.output_names,
            dynamic_axes=dynamic_axes,
            opset_version=opset,
            dynamo=False,
        )
    model = onnx.load(path)
    onnx.helper.set_model_props(model, {METADATA_FILE: json.dumps(metadata)})
    onnx.save(model, path)
    onnx.checker.check_model(path)
    return path


class ExportedKNet:
    """Runs an exported K-Net file (``.ts``/``.pt``: TorchScript; ``.onnx``: ONNX Runtime):
    {output name: CPU tensor}, which ``knet.modeling.postprocessing.detectron2_outputs`` turns
    into Detectron2's outputs."""

    def __init__(self, path: str, num_threads: int = 0):
        self.path = path
        self.session = self.module = None
        if path.endswith(".onnx"):
            import onnxruntime

            options = onnxruntime.SessionOptions()
            # No memory pattern (a block that ONNX Runtime plans per input size for the tensors
            # it can plan): it does not pay off for this graph, whose outputs and statistics
            # have data-dependent sizes; without it, the graph with every output peaks about
            # 1 GB lower at 800x1216 (R-50 panoptic) and runs as fast.
            options.enable_mem_pattern = False
            if num_threads > 0:
                options.intra_op_num_threads = num_threads
            self.session = onnxruntime.InferenceSession(
                path, options, providers=["CPUExecutionProvider"]
            )
            props = self.session.get_modelmeta().custom_metadata_map
            self.metadata = json.loads(props[METADATA_FILE])
        else:
            extra = {METADATA_FILE: ""}
            self.module = torch.jit.load(path, map_location="cpu", _extra_files=extra)
            self.metadata = json.loads(extra[METADATA_FILE])
        tracker = self.metadata.get("tracker")
        self.tracker = None if tracker is None else QuasiDenseTracker(**tracker)
        self.reset()

    def reset(self) -> None:
        """Start a new video (Video K-Net files): no previous kernels, an empty tracker."""
        self.previous: Tensor | None = None
        self.frame = 0
        if self.tracker is not None:
            self.tracker.reset()

    @property
    def output_names(self) -> Sequence[str]:
        return self.metadata["output_names"]

    def __call__(self, image) -> dict[str, Tensor]:
        """``image``: (3, H, W) (or (1, H, W)) uint8, or floating point in [0, 255], checked as
        the model checks its input (a float image in [0, 1] is refused, not truncated). Video
        K-Net files take the frames of one video in order (:meth:`reset` starts another) and
        return ``segment_track_id`` instead of their tracking outputs."""
        check_image(image, "image")
        array = image.cpu().numpy() if isinstance(image, Tensor) else np.asarray(image)
        array = np.broadcast_to(array, (3, *array.shape[1:]))
        array = np.ascontiguousarray(array if array.dtype == np.uint8 else np.rint(array), np.uint8)
        inputs = {"image": array}
        if self.tracker is not None:
            previous = self.previous
            if previous is None:
                previous = torch.zeros(self.metadata["kernels_shape"])
            inputs.update(
                previous_kernels=previous.numpy(), has_previous=np.array(self.previous is not None)
            )
        if self.session is not None:
            values = [torch.from_numpy(v) for v in self.session.run(None, inputs)]
        else:
            with torch.no_grad():
                values = self.module(*(torch.from_numpy(v) for v in inputs.values()))
        outputs = dict(zip(self.output_names, values))
        return outputs if self.tracker is None else self._track(outputs)

    def _track(self, outputs: dict[str, Tensor]) -> dict[str, Tensor]:
        """One frame's ``segment_track_id`` from its tracking outputs (removed)."""
        tracking = {name: outputs.pop(name) for name in TRACKING_OUTPUTS if name in outputs}
        outputs["segment_track_id"] = track_panoptic_segments(
            self.tracker,
            {**outputs, "segment_kernel": tracking["segment_kernel"]},
            tracking["track_embeddings"],
            self.frame,
            tracking.get("thing_pixels"),
        )
        self.previous, self.frame = tracking["kernels"], self.frame + 1
        return outputs

    def run_on_image(self, image: np.ndarray) -> dict[str, Tensor]:
        """(H, W, 3) uint8 image in the file's input format, resized like the test loader
        (``INPUT.MIN_SIZE_TEST`` / ``MAX_SIZE_TEST`` of the export), run, and the outputs
        brought back to (H, W) by :func:`at_size`."""
        meta = self.metadata
        resize = T.ResizeShortestEdge(meta["min_size_test"], meta["max_size_test"])
        resized = resize.get_transform(image).apply_image(image)
        outputs = self(np.ascontiguousarray(resized.transpose(2, 0, 1)))
        return at_size(outputs, image.shape[:2])

    def class_metadata(self, dataset: str | None = None) -> Metadata:
        """The class names and colours to draw with: those of a registered ``dataset`` (default:
        the export's), else those the file carries."""
        classes = {key: self.metadata[key] for key in CLASS_FIELDS if key in self.metadata}
        return registered_or([dataset or self.metadata["dataset"]], classes)


def at_size(outputs: dict[str, Tensor], size: tuple[int, int]) -> dict[str, Tensor]:
    """Exported outputs brought to ``size`` (H, W): id maps and masks by nearest neighbour,
    ``sem_seg`` bilinearly, boxes scaled (an exact inverse only where the size is unchanged:
    the eager model resizes the probabilities instead)."""
    out = dict(outputs)

    def resize(x: Tensor, mode: str = "nearest") -> Tensor:
        if tuple(x.shape[-2:]) == tuple(size):
            return x
        if not x.numel():  # no instance
            return x.new_zeros((*x.shape[:-2], *size))
        return F.interpolate(x[None], size=size, mode=mode)[0]

    if "panoptic_seg" in out:
        out["panoptic_seg"] = resize(out["panoptic_seg"][None].double())[0].int()
    if "pred_masks" in out:
        masks = out["pred_masks"]
        scale = torch.tensor([size[1] / masks.shape[2], size[0] / masks.shape[1]] * 2)
        out["pred_masks"] = resize(masks.to(torch.uint8)).bool()
        out["pred_boxes"] = out["pred_boxes"] * scale
    if "sem_seg" in out:
        out["sem_seg"] = resize(out["sem_seg"], "bilinear")
    return out


def compare_outputs(got: dict[str, Tensor], expected: dict[str, Tensor]) -> dict[str, float]:
    """Per output name: the largest absolute difference of floating-point outputs, the share
    of differing elements of integer and boolean ones (id maps, masks, classes); ``inf`` where
    the shapes differ (e.g. a segment more or less)."""
    report = {}
    for name, value in expected.items():
        other = got[name]
        if other.shape != value.shape:
            report[name] = float("inf")
        elif value.numel() == 0:
            report[name] = 0.0
        elif value.is_floating_point():
            report[name] = float((other.float() - value.float()).abs().max())
        else:
            report[name] = float((other != value).float().mean())
    return report
