"""The model checks what reaches it: through Detectron2's DefaultPredictor and called directly."""

from pathlib import Path

import numpy as np
import pytest
import torch
from detectron2.engine import DefaultPredictor
from detectron2.modeling import build_model

from knet.engine import get_knet_cfg

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


@pytest.mark.parametrize(
    "image, message",
    [
        (np.concatenate([photo(), photo()[:, :, :1]], 2), r"shape \(4, .*RGBA"),
        (photo().astype(np.float32) / 255.0, r"multiply an image in \[0, 1\] by 255"),
        ((photo().astype(np.float32) - 120.0) / 58.0, "normalised already"),
        (np.where(np.eye(48, 64, dtype=bool)[..., None], np.nan, photo()), "NaN"),
        (photo().astype(np.float32) * 257.0, "another bit depth"),
    ],
    ids=["rgba", "float 0-1", "normalised", "nan", "16-bit"],
)
def test_default_predictor_rejects_bad_images(predictor, image, message):
    with pytest.raises(ValueError, match=message) as e:
        predictor(image)
    assert "expected a (3, H, W) tensor of 0-255 pixel values" in str(e.value)


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
        (torch.zeros(3, 48, 64, dtype=torch.bool), "torch.bool"),
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
