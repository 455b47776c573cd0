"""TorchScript and ONNX export: the exported files reproduce eager inference at other sizes.

Each model is exported at one image size and run at others (odd ones included) from the saved
file, through TorchScript and ONNX Runtime, and compared with the eager model
(``model([{"image": ...}])``, the tile-bounded CPU post-processing): the same panoptic segments
with id maps differing on at most 1e-4 of the pixels, the same instances (scores to 1e-4,
masks), semantic outputs to 1e-4. Segment-rich predictions come from a briefly trained toy
model; the R-50 configs and the other backbones are exported with random weights.
"""

import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from detectron2.data import MetadataCatalog
from detectron2.modeling import build_model

from knet.engine import KNetTrainer, get_knet_cfg
from knet.export import (
    ExportedKNet,
    KNetExportModule,
    at_size,
    compare_outputs,
    export_onnx,
    export_torchscript,
    lowest_onnx_opset,
)
from knet.modeling import SemanticKNet
from knet.modeling.postprocessing import detectron2_outputs
from knet.visualization import above_threshold

onnx = pytest.importorskip("onnx", reason="ONNX export tests need `pip install onnx`")
onnxruntime = pytest.importorskip(
    "onnxruntime", reason="ONNX export tests need `pip install onnxruntime`"
)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
TOY = str(CONFIGS / "toy/knet_R18_toy_panoptic.yaml")
TOY_SEMANTIC = str(CONFIGS / "toy/knet_upernet_R18_toy_semantic.yaml")
EXPORT_SIZE = (96, 128)  # traced at this size, run at RUN_SIZES
RUN_SIZES = [(203, 301), (256, 341), (177, 255), (300, 223), (199, 257), (256, 256)]
MAX_DIFFERING = 1e-4  # share of pixels of id maps and masks that may differ
FORMATS = ["torchscript", "onnx"]


def photo(path: str, size) -> torch.Tensor:
    """(3, H, W) uint8 BGR of an image file resized to ``size``."""
    bgr = cv2.resize(cv2.imread(path), (size[1], size[0]), interpolation=cv2.INTER_AREA)
    return torch.from_numpy(np.ascontiguousarray(bgr.transpose(2, 0, 1)))


def export(model, cfg, fmt: str, folder) -> ExportedKNet:
    module = KNetExportModule(model)
    sample = torch.randint(0, 256, (3, *EXPORT_SIZE), dtype=torch.uint8)
    if fmt == "onnx":
        path = export_onnx(module, sample, str(folder / "model.onnx"), module.metadata(cfg))
    else:
        path = export_torchscript(
            module, sample, str(folder / "model.ts"), module.metadata(cfg), "tracing"
        )
    return ExportedKNet(path)


def tie_order(got, ref, tie: float = 1e-5) -> torch.Tensor:
    """Indices of the ``got`` instances in the order of the ``ref`` ones: the same, except that
    instances whose scores are within ``tie`` (equal up to rounding: the two computations may
    rank them either way) are paired by class."""
    order, free = [], set(range(len(got)))
    for i in range(len(ref)):
        tied = [
            j
            for j in sorted(free)
            if abs(float(got.scores[j] - ref.scores[i])) <= tie
            and got.pred_classes[j] == ref.pred_classes[i]
        ]
        j = i if i in tied or not tied else tied[0]
        order.append(j)
        free.discard(j)
    return torch.tensor(order, dtype=torch.int64)


def assert_matches_eager(exported: ExportedKNet, model, image: torch.Tensor) -> dict:
    """The exported outputs of ``image`` against the eager model's; returns the eager ones."""
    with torch.no_grad():
        eager = model([{"image": image}])[0]
    got = detectron2_outputs(exported(image))
    assert set(got) == set(eager)
    if "panoptic_seg" in eager:
        (ids, info), (got_ids, got_info) = eager["panoptic_seg"], got["panoptic_seg"]
        assert got_ids.shape == ids.shape == image.shape[1:] and got_ids.dtype == torch.int32
        differing = int((got_ids != ids).sum())
        assert differing <= MAX_DIFFERING * ids.numel()
        assert [(s["id"], s["category_id"], s["isthing"]) for s in got_info] == [
            (s["id"], s["category_id"], s["isthing"]) for s in info
        ]
        for s, r in zip(got_info, info):
            assert abs(s["score"] - r["score"]) <= 1e-4 and abs(s["area"] - r["area"]) <= differing
    if "instances" in eager:
        inst, got_inst = eager["instances"], got["instances"]
        assert len(got_inst) == len(inst) and got_inst.image_size == inst.image_size
        got_inst = got_inst[tie_order(got_inst, inst)]
        assert torch.equal(got_inst.pred_classes, inst.pred_classes)
        torch.testing.assert_close(got_inst.scores, inst.scores, atol=1e-4, rtol=0)
        masks_differing = float((got_inst.pred_masks != inst.pred_masks).float().mean())
        assert masks_differing <= MAX_DIFFERING
    if "sem_seg" in eager:
        # probabilities of semantic K-Net to 1e-4; the class scores of instance/panoptic K-Net
        # (sums over kernels, up to ~10 with random weights) to 1e-4 relative
        rtol = 0 if isinstance(model, SemanticKNet) else 1e-4
        assert got["sem_seg"].shape == eager["sem_seg"].shape
        torch.testing.assert_close(got["sem_seg"], eager["sem_seg"], atol=1e-4, rtol=rtol)
    return eager


# ----------------------------------------------------------------------------- a trained model
@pytest.fixture(scope="module")
def trained_toy(toy_root, tmp_path_factory):
    """The toy panoptic model after 150 iterations (about a minute on 2 CPU cores)."""
    out = tmp_path_factory.mktemp("toy_train")
    cfg = get_knet_cfg(
        TOY,
        [
            "INPUT.MIN_SIZE_TRAIN", "(128, 160)", "INPUT.MAX_SIZE_TRAIN", "213",
            "SOLVER.MAX_ITER", "150", "SOLVER.WARMUP_ITERS", "20", "SOLVER.STEPS", "()",
            "SOLVER.BASE_LR", "0.001", "SOLVER.CHECKPOINT_PERIOD", "100000",
            "TEST.EVAL_PERIOD", "0", "DATASETS.TEST", "()", "DATALOADER.NUM_WORKERS", "0",
            "OUTPUT_DIR", str(out),
        ],
    )  # fmt: skip
    trainer = KNetTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    model = trainer.model.eval()
    # after so short a training thing scores are still low: keep things from 0.15 on
    model.postprocessor.thing_score_thresh = 0.15
    images = sorted((Path(toy_root) / "val").glob("*.jpg"))[: len(RUN_SIZES)]
    assert len(images) == len(RUN_SIZES)
    return cfg, model, [photo(str(p), size) for p, size in zip(images, RUN_SIZES)]


@pytest.mark.slow
@pytest.mark.parametrize("fmt", FORMATS)
def test_trained_panoptic_model_exports_exactly(fmt, trained_toy, tmp_path):
    cfg, model, images = trained_toy
    exported = export(model, cfg, fmt, tmp_path)
    segments = things = 0
    for image in images:
        eager = assert_matches_eager(exported, model, image)
        segments += len(eager["panoptic_seg"][1])
        things += sum(s["isthing"] for s in eager["panoptic_seg"][1])
    assert segments >= 8 and things >= 2  # the comparison is not trivial


@pytest.mark.slow
@pytest.mark.parametrize("fmt", FORMATS)
def test_instance_only_and_semantic_only_outputs(fmt, trained_toy, tmp_path):
    cfg, model, images = trained_toy
    for flags, names in (
        ((False, True, False), ["pred_masks", "scores", "pred_classes", "pred_boxes"]),
        ((False, False, True), ["sem_seg"]),
    ):
        post = model.postprocessor
        saved = (post.panoptic_on, post.instance_on, post.semantic_on)
        post.panoptic_on, post.instance_on, post.semantic_on = flags
        try:
            exported = export(model, cfg, fmt, tmp_path / "-".join(names))
            assert list(exported.output_names) == names
            assert_matches_eager(exported, model, images[0])
        finally:
            post.panoptic_on, post.instance_on, post.semantic_on = saved


# ----------------------------------------------------------------------------- fast checks
@pytest.fixture(scope="module")
def toy_model():
    cfg = get_knet_cfg(TOY, ["MODEL.WEIGHTS", ""])
    torch.manual_seed(0)
    return cfg, build_model(cfg).eval()


@pytest.mark.parametrize("fmt", FORMATS)
def test_exported_file_holds_its_outputs_and_metadata(fmt, toy_model, tmp_path):
    cfg, model = toy_model
    exported = export(model, cfg, fmt, tmp_path)
    assert exported.metadata["input_format"] == cfg.INPUT.FORMAT == "RGB"  # (official order)
    assert exported.metadata["dataset"] == "knet_toy_val_panoptic_with_sem_seg"
    toy = MetadataCatalog.get("knet_toy_val_panoptic_with_sem_seg")  # the names to draw with
    assert exported.metadata["stuff_classes"] == list(toy.stuff_classes)
    assert exported.metadata["thing_classes"] == list(toy.thing_classes)
    assert exported.metadata["min_size_test"] == cfg.INPUT.MIN_SIZE_TEST
    image = torch.randint(0, 256, (3, 111, 97), dtype=torch.uint8)
    outputs = exported(image)
    assert list(outputs) == list(exported.output_names)
    assert outputs["panoptic_seg"].shape == (111, 97) and outputs["sem_seg"].shape == (7, 111, 97)
    assert outputs["pred_masks"].dtype == torch.bool and outputs["pred_boxes"].shape[1] == 4
    if fmt == "onnx":
        onnx.checker.check_model(str(tmp_path / "model.onnx"))
        graph_inputs = onnx.load(str(tmp_path / "model.onnx")).graph.input
        dims = graph_inputs[0].type.tensor_type.shape.dim
        assert [d.dim_param or d.dim_value for d in dims] == [3, "height", "width"]
    assert_matches_eager(exported, model, image)


@pytest.mark.parametrize("fmt", FORMATS)
def test_semantic_model_exports(fmt, tmp_path):
    cfg = get_knet_cfg(TOY_SEMANTIC, ["MODEL.WEIGHTS", ""])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    exported = export(model, cfg, fmt, tmp_path)
    assert list(exported.output_names) == ["sem_seg"]
    image = torch.randint(0, 256, (3, 101, 139), dtype=torch.uint8)
    eager = assert_matches_eager(exported, model, image)
    torch.testing.assert_close(eager["sem_seg"].sum(0), torch.ones(101, 139))


def test_onnx_opset_below_the_lowest_that_works_is_refused(toy_model, tmp_path):
    cfg, model = toy_model
    module = KNetExportModule(model)
    assert lowest_onnx_opset(module) == 16
    with pytest.raises(ValueError, match="opset 16 or newer"):
        export_onnx(
            module, torch.zeros(3, 64, 64, dtype=torch.uint8), str(tmp_path / "m.onnx"), {}, 15
        )


def test_compare_outputs_reports_differences():
    a = {"ids": torch.tensor([[1, 2], [3, 4]]), "x": torch.tensor([1.0, 2.0]), "s": torch.zeros(0)}
    b = {"ids": torch.tensor([[1, 2], [3, 5]]), "x": torch.tensor([1.0, 2.5]), "s": torch.zeros(0)}
    assert compare_outputs(b, a) == {"ids": 0.25, "x": 0.5, "s": 0.0}
    b["s"] = torch.zeros(1)  # a segment more
    assert compare_outputs(b, a)["s"] == float("inf")


@pytest.mark.parametrize("scale", [1, 2, 3, 6])
def test_adaptive_pooling_exports_for_every_input_size(scale, tmp_path):
    """Pyramid pooling (PSPNet, UPerNet) in ONNX: an integral image, equal to PyTorch's."""
    from knet.modeling.pixel_decoder.decode_heads import AdaptiveAvgPool2d

    pool = AdaptiveAvgPool2d(scale)
    path = str(tmp_path / "pool.onnx")
    torch.onnx.export(
        pool, (torch.rand(1, 2, 7, 9),), path, input_names=["x"], opset_version=16,
        dynamic_axes={"x": {2: "h", 3: "w"}}, dynamo=False,
    )  # fmt: skip
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    for size in [(13, 22), (5, 5), (3, 2), (7, 9)]:
        x = torch.rand(1, 2, *size)
        (got,) = session.run(None, {"x": x.numpy()})
        expected = torch.nn.functional.adaptive_avg_pool2d(x, scale)
        torch.testing.assert_close(torch.from_numpy(got), expected, atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------- model zoo
ZOO = {
    "R-50 panoptic": ("coco/panoptic-segmentation/knet_R50_bs16_1x.yaml", []),
    "R-50 instance": ("coco/instance-segmentation/knet_R50_bs16_1x.yaml", []),
    "R-50 UPerNet semantic": ("ade20k/semantic-segmentation/knet_s3_upernet_R50_bs16_80k.yaml", []),
    "R-101-DCN panoptic (R-50-DCN)": (
        "coco/panoptic-segmentation/knet_R101_DCN_bs16_ms3x.yaml",
        ["MODEL.RESNETS.DEPTH", "50"],
    ),
    "Swin-L panoptic (Swin tiny width)": (
        "coco/panoptic-segmentation/knet_swin_L_bs32_ms3x.yaml",
        ["MODEL.SWIN.EMBED_DIM", "32", "MODEL.SWIN.DEPTHS", "[2, 2, 2, 2]",
         "MODEL.SWIN.NUM_HEADS", "[1, 2, 4, 8]"],
    ),
    "Swin-T UPerNet semantic": (
        "ade20k/semantic-segmentation/knet_s3_upernet_swin_T_bs16_80k.yaml", []
    ),
}  # fmt: skip


def calibrate(model, image: torch.Tensor, std: float = 3.0) -> None:
    """Scale the classifier and each update stage's mask kernels of a randomly initialised
    semantic K-Net, one after the other, so that every stage's logits spread as a trained
    model's do (std ``std``; PyTorch's default init makes them reach thousands, and softmaxes of
    such logits turn rounding differences into different probabilities)."""
    head = model.kernel_head
    stages = head.stages
    with torch.no_grad():
        features = model.pixel_decoder(
            model.backbone(model.preprocess_image([{"image": image}]).tensor)
        )
        layers = [head.conv_seg] + [stage.fc_mask for stage in stages]
        for depth, layer in enumerate(layers):
            head.stages = stages[:depth]
            logits = (
                head.conv_seg(features[0])
                if depth == 0
                else head(*features)["stages"][-1]["seg_logits"]
            )
            scale = std / float(logits.std())
            layer.weight *= scale
            layer.bias *= scale
    head.stages = stages


@pytest.fixture(scope="module")
def coco_photos(shared_data_root):
    folder = Path(shared_data_root) / "coco_panoptic_sample/sample_data/input_images"
    return [
        photo(str(p), size)
        for p, size in zip(sorted(folder.glob("*.jpg")), [(161, 227), (200, 149)])
    ]


@pytest.mark.slow
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", sorted(ZOO))
def test_model_zoo_configs_export(name, fmt, coco_photos, tmp_path):
    config, opts = ZOO[name]
    cfg = get_knet_cfg(str(CONFIGS / config), ["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu", *opts])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    if isinstance(model, SemanticKNet):
        calibrate(model, coco_photos[0])
    exported = export(model, cfg, fmt, tmp_path)
    if fmt == "onnx":
        assert onnx.load(str(tmp_path / "model.onnx")).opset_import[0].version == lowest_onnx_opset(
            model
        )
    for image in coco_photos:
        assert_matches_eager(exported, model, image)


# ----------------------------------------------------------------------------- command line
def run_tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=600
    )


@pytest.mark.slow
@pytest.mark.parametrize("fmt, suffix", [("torchscript", "ts"), ("onnx", "onnx")])
def test_export_and_run_commands(fmt, suffix, tmp_path, shared_data_root):
    photos = Path(shared_data_root) / "coco_panoptic_sample/sample_data/input_images"
    sample = sorted(photos.glob("*.jpg"))[0]
    result = run_tool(
        "tools/deploy/export_model.py", "--config-file", TOY, "--format", fmt,
        "--sample-image", str(sample), "--output", str(tmp_path / "export"),
        "--opts", "MODEL.WEIGHTS", "",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    path = tmp_path / "export" / f"model.{suffix}"
    assert result.stdout.strip().splitlines()[-1] == str(path)
    assert "Exported vs eager on the sample image" in result.stdout + result.stderr
    result = run_tool(
        "tools/deploy/run_exported.py", "--model", str(path), "--input", str(photos / "*.jpg"),
        "--output", str(tmp_path / "vis"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    drawn = sorted(os.listdir(tmp_path / "vis"))
    assert drawn == sorted(p.stem + ".png" for p in photos.glob("*.jpg"))
    image = cv2.imread(str(tmp_path / "vis" / drawn[0]))
    assert image is not None and image.shape[2] == 3


def test_outputs_brought_to_the_image_size_and_thresholded():
    """``at_size`` (exported outputs of a resized image -> the image size) and
    ``above_threshold`` (Detectron2's outputs), as run_exported.py and the server apply them."""
    ids = torch.tensor([[1, 1, 2, 0], [3, 3, 2, 0]], dtype=torch.int32)
    outputs = {
        "panoptic_seg": ids,
        "segment_category_id": torch.tensor([0, 5, 1]),
        "segment_score": torch.tensor([0.9, 0.2, 0.4]),
        "segment_isthing": torch.tensor([True, False, True]),
        "segment_area": torch.tensor([2, 2, 2]),
        "pred_masks": ids[None] == torch.tensor([1, 3])[:, None, None],
        "scores": torch.tensor([0.9, 0.4]),
        "pred_classes": torch.tensor([0, 1]),
        "pred_boxes": torch.tensor([[0.0, 0.0, 2.0, 1.0], [0.0, 1.0, 2.0, 2.0]]),
        "sem_seg": torch.rand(6, 2, 4),
    }
    large = at_size(outputs, (4, 12))  # x2 in height, x3 in width
    assert torch.equal(large["panoptic_seg"], ids.repeat_interleave(2, 0).repeat_interleave(3, 1))
    assert large["pred_masks"].shape == (2, 4, 12) and large["pred_masks"].dtype == torch.bool
    assert large["pred_boxes"].tolist() == [[0.0, 0.0, 6.0, 2.0], [0.0, 2.0, 6.0, 4.0]]
    assert large["sem_seg"].shape == (6, 4, 12)
    same = at_size(outputs, (2, 4))  # same size: unchanged
    assert all(torch.equal(same[k], v) for k, v in outputs.items())
    kept = above_threshold(detectron2_outputs(outputs), 0.5)  # thing 3 (0.4) goes, stuff stays
    kept_ids, segments = kept["panoptic_seg"]
    assert kept_ids.tolist() == [[1, 1, 2, 0], [0, 0, 2, 0]]
    assert [s["id"] for s in segments] == [1, 2]
    assert kept["instances"].pred_classes.tolist() == [0]
    none = at_size({k: v[:0] for k, v in outputs.items() if k in ("pred_masks", "pred_boxes")},
                   (4, 12))  # fmt: skip
    assert none["pred_masks"].shape == (0, 4, 12) and none["pred_boxes"].shape == (0, 4)


@pytest.mark.slow
def test_scripting_is_refused_with_the_reason(tmp_path):
    result = run_tool(
        "tools/deploy/export_model.py", "--config-file", TOY, "--export-method", "scripting",
        "--output", str(tmp_path), "--opts", "MODEL.WEIGHTS", "",
    )  # fmt: skip
    assert result.returncode != 0
    assert "scripting is not supported" in result.stderr and "tracing" in result.stderr
