"""Large inputs cost memory set by the configuration: the mappers crop / resize a large image
and its label map as they are decoded (same outputs as augmenting the full-size arrays), and
the full post-processing resizes fewer kernels at a time to a large output."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import torch
from detectron2.data import transforms as T
from panopticapi.utils import id2rgb, rgb2id
from PIL import Image

from knet.data.dataset_mappers import (
    KNetPanopticDatasetMapper,
    KNetSemanticDatasetMapper,
    KNetTestDatasetMapper,
    read_image_checked,
)
from knet.modeling.postprocessing import OutputGeometry, full_mask_statistics
from knet.modeling.postprocessing import statistics as stats_module

H, W = 3000, 4000  # 12 megapixels: 36 MB as an RGB array
MAX_SIZE = 400
# The mapper's Python/numpy allocations (what tracemalloc sees) stay within a few arrays at the
# configured size: 64 bytes a pixel of a MAX_SIZE x MAX_SIZE image (10 MB), well under one
# full-size RGB array (36 MB), which the former mappers made several times.
BOUND = 64 * MAX_SIZE * MAX_SIZE


@pytest.fixture(scope="module")
def large_record(tmp_path_factory):
    """A 3000x4000 JPEG with a 20-segment panoptic PNG and a palette semantic PNG."""
    root = tmp_path_factory.mktemp("large")
    rng = np.random.default_rng(0)
    ids = np.ones((H, W), dtype=np.int32)
    image = np.zeros((H, W, 3), dtype=np.uint8)
    segments = [{"id": 1, "category_id": 5, "isthing": 0, "iscrowd": 0}]
    for k in range(2, 21):
        y, x = rng.integers(0, H - 500), rng.integers(0, W - 600)
        ids[y : y + 500, x : x + 600] = k
        image[y : y + 500, x : x + 600] = rng.integers(0, 256, 3, dtype=np.uint8)
        segments.append({"id": k, "category_id": k % 4, "isthing": 1, "iscrowd": int(k == 7)})
    Image.fromarray(image).save(root / "image.jpg", quality=90)
    Image.fromarray(id2rgb(ids)).save(root / "pan.png")
    sem = Image.fromarray((ids % 6).astype(np.uint8), mode="L").convert("P")
    sem.save(root / "sem.png")
    return {
        "file_name": str(root / "image.jpg"),
        "pan_seg_file_name": str(root / "pan.png"),
        "sem_seg_file_name": str(root / "sem.png"),
        "height": H,
        "width": W,
        "image_id": 0,
        "segments_info": segments,
    }


def _augmentations(crop: bool) -> list[T.Augmentation]:
    augs = [T.ResizeShortestEdge((240, 300), MAX_SIZE, "range"), T.RandomFlip(prob=0.5)]
    return ([T.RandomCrop("relative_range", (0.6, 0.8))] if crop else []) + augs


def _peak_traced(fn):
    """(result, peak bytes of Python/numpy allocations during ``fn()``)."""
    tracemalloc.start()
    try:
        out = fn()
        return out, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _reference_panoptic(rec, augs, image_format):
    """The former mapper: augment the full-size arrays, then split the id map."""
    image = read_image_checked(rec["file_name"], image_format, "image")
    pan = read_image_checked(rec["pan_seg_file_name"], "RGB", "pan")
    aug_input = T.AugInput(image)
    transforms = T.AugmentationList(augs)(aug_input)
    return aug_input.image, rgb2id(transforms.apply_segmentation(pan))


@pytest.mark.parametrize("crop, image_format", [(False, "RGB"), (True, "BGR")])
def test_panoptic_mapper_on_a_large_image(large_record, crop, image_format):
    mapper = KNetPanopticDatasetMapper(
        augmentations=_augmentations(crop), image_format=image_format, ignore_label=255
    )
    for seed in range(2):  # the same random draws as augmenting the full-size arrays
        np.random.seed(seed)
        out, peak = _peak_traced(lambda: mapper(large_record))
        np.random.seed(seed)
        image, ids = _reference_panoptic(large_record, _augmentations(crop), image_format)
        np.testing.assert_array_equal(out["image"].permute(1, 2, 0).numpy(), image)
        things = [s for s in large_record["segments_info"] if s["isthing"] and not s["iscrowd"]]
        expected = [ids == s["id"] for s in things if (ids == s["id"]).any()]
        np.testing.assert_array_equal(out["instances"].gt_masks.numpy(), np.stack(expected))
        assert max(out["image"].shape[1:]) <= MAX_SIZE
        assert peak < BOUND, f"{peak / 2**20:.1f} MB traced"


def test_semantic_mapper_on_a_large_palette_image(large_record):
    augs = [T.ResizeShortestEdge(256, MAX_SIZE)]
    mapper = KNetSemanticDatasetMapper(augmentations=augs, image_format="RGB")
    out, peak = _peak_traced(lambda: mapper(large_record))
    sem = read_image_checked(large_record["sem_seg_file_name"], None, "sem")  # palette indices
    aug_input = T.AugInput(
        read_image_checked(large_record["file_name"], "RGB", "image"), sem_seg=sem
    )
    T.AugmentationList(augs)(aug_input)
    np.testing.assert_array_equal(out["image"].permute(1, 2, 0).numpy(), aug_input.image)
    np.testing.assert_array_equal(out["sem_seg"].numpy(), aug_input.sem_seg)
    assert peak < BOUND, f"{peak / 2**20:.1f} MB traced"


def test_test_mapper_on_a_large_image(large_record):
    augs = [T.ResizeShortestEdge(256, MAX_SIZE)]
    out, peak = _peak_traced(
        lambda: KNetTestDatasetMapper(augmentations=augs, image_format="BGR")(large_record)
    )
    aug_input = T.AugInput(read_image_checked(large_record["file_name"], "BGR", "image"))
    T.AugmentationList(augs)(aug_input)
    np.testing.assert_array_equal(out["image"].permute(1, 2, 0).numpy(), aug_input.image)
    assert (out["height"], out["width"]) == (H, W)  # outputs are still wanted at the original size
    assert peak < BOUND, f"{peak / 2**20:.1f} MB traced"


def test_full_statistics_resize_fewer_kernels_for_a_large_output(monkeypatch):
    """Each chunk's full-resolution maps hold at most chunk_size padded inputs' pixels (one
    kernel at least), and the statistics do not depend on the chunking."""
    torch.manual_seed(0)
    mask_logits = torch.randn(12, 16, 20) * 4
    scores, selected = torch.rand(12), torch.tensor([3, 0, 3, 7])
    geometry = OutputGeometry((64, 80), (60, 75), (600, 750))  # output 100x the input
    sizes = []
    resize = stats_module.resize_to_output
    monkeypatch.setattr(
        stats_module,
        "resize_to_output",
        lambda maps, *a, **k: sizes.append(maps.shape[0]) or resize(maps, *a, **k),
    )
    got = full_mask_statistics(mask_logits, geometry, scores, selected, 0.5, chunk_size=16)
    assert max(sizes) == 1  # 16 x 64 x 80 pixels fit one 600 x 750 map
    monkeypatch.setattr(stats_module, "_kernels_per_chunk", lambda chunk, *a: chunk)
    ref = full_mask_statistics(mask_logits, geometry, scores, selected, 0.5, chunk_size=16)
    for a, b in zip(got, ref, strict=True):
        assert torch.equal(a, b)
    assert got.selected_masks.shape == (4, 600, 750)
