"""The model checks what reaches it; Detectron2's DefaultPredictor (before its resize) and
``ExportedKNet`` refuse the same inputs with the same messages."""

from pathlib import Path

import numpy as np
import pytest
import torch
from detectron2.engine import DefaultPredictor
from detectron2.modeling import build_model

from knet.engine import get_knet_cfg
from knet.export import ExportedKNet, KNetExportModule, export_torchscript

REPO = Path(__file__).resolve().parents[1]
TOY_CONFIG = str(REPO / "configs" / "toy" / "knet_R18_toy_panoptic.yaml")
OPTS = ["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu", "INPUT.MIN_SIZE_TEST", "64"]


@pytest.fixture(scope="module")
def predictor():
    torch.manual_seed(0)
    return DefaultPredictor(get_knet_cfg(TOY_CONFIG, OPTS))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(get_knet_cfg(TOY_CONFIG, OPTS)).eval()


def photo(h=48, w=64, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("dtype", [np.uint8, np.float32, np.float64])
def test_default_predictor_accepts_pixel_values_of_any_dtype(predictor, dtype):
    outputs = predictor(photo().astype(dtype))
    assert outputs["panoptic_seg"][0].shape == (48, 64)


@pytest.mark.parametrize(
    "image, message",
    [
        (torch.zeros(3, 0, 40, dtype=torch.uint8), "the image is empty"),
        (torch.zeros(48, 64, 3, dtype=torch.uint8), r"use image.permute\(2, 0, 1\)"),
        (torch.zeros(48, 64, dtype=torch.uint8), r"shape \(48, 64\)"),
        (torch.zeros(3, 48, 64, dtype=torch.bool), "got a bool image"),
    ],
    ids=["empty", "channels last", "2-d", "bool"],
)
def test_model_rejects_bad_tensors(model, image, message):
    with torch.no_grad(), pytest.raises(ValueError, match=message) as e:
        model([{"image": image, "file_name": "frame_7.png"}])
    assert "input 0 (frame_7.png)" in str(e.value)


def test_model_rejects_a_missing_image(model):
    with torch.no_grad(), pytest.raises(TypeError, match="'image' must be a"):
        model([{"file_name": "x.png"}])


def test_grayscale_image_is_broadcast_to_three_channels(model):
    gray = torch.from_numpy(photo()[:, :, 0].copy())
    with torch.no_grad():
        (one,) = model([{"image": gray[None]}])
        (three,) = model([{"image": gray[None].expand(3, -1, -1).clone()}])
    assert torch.equal(one["panoptic_seg"][0], three["panoptic_seg"][0])
    assert torch.equal(one["instances"].pred_masks, three["instances"].pred_masks)


def _bad_images() -> dict[str, tuple[np.ndarray, str]]:
    """One table of bad (H, W, C) inputs: the array and the fault its message must name."""
    image = photo()
    return {
        "grayscale 2-d": (image[:, :, 0], r"shape \(48, 64\); .* \(grayscale\?"),
        "uint16": (image.astype(np.uint16) * 257, r"got a uint16 image; .* \(16-bit\?"),
        "empty": (np.zeros((0, 64, 3), np.uint8), "the image is empty"),
        "channels first": (np.ascontiguousarray(image.transpose(2, 0, 1)), r"got an image of"),
        "float 0-1": (image.astype(np.float32) / 255.0, r"multiply an image in \[0, 1\] by 255"),
        "rgba": (np.concatenate([image, image[:, :, :1]], 2), r"\(RGBA\? drop the alpha"),
        "nan": (np.where(np.eye(48, 64, dtype=bool)[..., None], np.nan, image), "NaN or inf"),
        "normalised": ((image.astype(np.float32) - 120.0) / 58.0, "normalised already"),
        "float 0-65535": (image.astype(np.float32) * 257.0, "another bit depth"),
    }


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The toy model, traced to TorchScript."""
    cfg = get_knet_cfg(TOY_CONFIG, OPTS)
    torch.manual_seed(0)
    module = KNetExportModule(build_model(cfg).eval())
    path = str(tmp_path_factory.mktemp("exported") / "model.ts")
    sample = torch.randint(0, 256, (3, 64, 80), dtype=torch.uint8)
    return ExportedKNet(export_torchscript(module, sample, path, module.metadata(cfg), "tracing"))


@pytest.mark.parametrize("case", list(_bad_images()))
def test_every_entry_point_refuses_a_bad_image_with_one_message(case, model, predictor, exported):
    """The same fault, named the same way: by the model (a (C, H, W) tensor), by Detectron2's
    DefaultPredictor (the (H, W, C) array, before its resize) and by an exported model."""
    image, fault = _bad_images()[case]
    with pytest.raises(ValueError, match=fault) as from_predictor:
        predictor(image)
    assert "expected an (H, W, 3) array of 0-255 pixel values" in str(from_predictor.value)
    chw = torch.from_numpy(
        np.ascontiguousarray(np.moveaxis(image, -1, 0) if image.ndim == 3 else image)
    )
    if case == "channels first":  # as a tensor it is the model's layout: (H, W, C) given instead
        chw = torch.from_numpy(photo())
    for name, run in [("model", lambda x: model([{"image": x}])), ("exported", exported)]:
        with (
            torch.no_grad(),
            pytest.raises(ValueError, match=fault if case != "channels first" else r"permute") as e,
        ):
            run(chw)
        assert "expected a (3, H, W) tensor of 0-255 pixel values" in str(e.value), name


def test_predictor_and_exported_model_take_good_images(predictor, exported):
    gray = photo()[:, :, :1]
    assert predictor(gray)["panoptic_seg"][0].shape == (48, 64)  # (H, W, 1): 3 channels
    as_float = torch.from_numpy(np.ascontiguousarray(photo().transpose(2, 0, 1)))
    from_uint8 = exported(as_float)
    from_float = exported(as_float.float())  # float 0-255: the same uint8 pixels
    assert all(torch.equal(from_uint8[k], from_float[k]) for k in from_uint8)


def test_run_exported_refuses_a_16_bit_image_file(tmp_path, exported):
    """A 16-bit PNG would be clipped to 8 bits on reading: refused, naming the file."""
    from PIL import Image
    from scripts import load_script

    path = tmp_path / "depth.png"
    Image.fromarray(photo()[:, :, 0].astype(np.uint16) * 257).save(path)
    run_exported = load_script("tools/deploy/run_exported.py")
    args = ["--model", exported.path, "--input", str(path), "--output", str(tmp_path / "vis")]
    with pytest.raises(ValueError, match=rf"{path} is a I;16.* \(16/32-bit\) image"):
        run_exported.main(args)


def test_another_models_predictor_runs_detectron2s_call_unchanged():
    """Only a K-Net model's input is checked first; ``import knet`` wraps the call once."""
    from detectron2.config import get_cfg
    from detectron2.data import transforms as T

    from knet.detectron2_defaults import adapt_detectron2_defaults

    adapt_detectron2_defaults()  # a second time: nothing wrapped twice
    assert DefaultPredictor.__call__.__wrapped__.__module__ == "detectron2.engine.defaults"

    class Echo(torch.nn.Module):
        def forward(self, inputs):
            return inputs

    other = object.__new__(DefaultPredictor)
    other.cfg, other.model, other.input_format = get_cfg(), Echo(), "BGR"
    other.aug = T.ResizeShortestEdge(48, 1000)
    seen = other(photo().astype(np.float32) / 255.0)  # a K-Net predictor refuses this
    assert seen["image"].shape == (3, 48, 64) and float(seen["image"].max()) <= 1.0
