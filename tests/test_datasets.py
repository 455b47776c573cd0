"""Dataset generation, preparation, registration, metadata and bad-data errors."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.builtin_meta import (
    ADE20K_SEM_SEG_CATEGORIES,
    COCO_CATEGORIES,
    _get_builtin_metadata,
)
from panoptic_conversion import prepare_ade20k_sem_seg, read_panoptic_png, semantic_from_panoptic
from PIL import Image
from prepare_samples import prepare_ade20k_sample, prepare_coco_sample, shared_data_root
from scripts import REPO, load_script

import knet  # noqa: F401  (registers the datasets)
from knet.data.dataset_mappers import KNetPanopticDatasetMapper, KNetSemanticDatasetMapper
from knet.data.datasets import (
    TOY_CATEGORIES,
    TOY_NUM_CLASSES,
    TOY_NUM_THING_CLASSES,
    get_panoptic_metadata,
    load_panoptic_json_with_sem_seg,
    require_toy_dataset,
)
from knet.data.datasets.panoptic import contiguous_id_map
from knet.data.datasets.toy import TOY_STUFF_CATEGORIES, TOY_THING_CATEGORIES

generate_toy_dataset = load_script("tools/make_toy_dataset.py").generate_toy_dataset

SPLITS = ("train", "val")
TOY_PANOPTIC = [f"knet_toy_{s}_panoptic_with_sem_seg" for s in SPLITS]
TOY_INSTANCES = [f"knet_toy_{s}" for s in SPLITS]
TOY_SEMANTIC = [f"knet_toy_sem_seg_{s}" for s in SPLITS]
COCO_SAMPLE = ["coco_sample_val_panoptic_with_sem_seg", "coco_sample_val"]
ADE_SAMPLE = ["ade20k_sample_sem_seg_train", "ade20k_sample_sem_seg_val"]
COCO_FULL = ["coco_2017_train_panoptic_with_sem_seg", "coco_2017_val_panoptic_with_sem_seg"]


def _load_json(path):
    with open(path) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def coco_sample(shared_data_root, prepared_coco_sample):
    return os.path.join(shared_data_root, "coco_panoptic_sample", "sample_data")


@pytest.fixture(scope="module")
def ade_sample(shared_data_root, prepared_ade20k_sample):
    return os.path.join(shared_data_root, "ade20k_sample", "ADEChallengeData2016")


# --------------------------------------------------------------------------- toy generation
def test_toy_generation_is_deterministic(tmp_path):
    roots = {k: str(tmp_path / k) for k in ("a", "b", "c")}
    generate_toy_dataset(roots["a"], num_train=6, num_val=2, seed=7)
    generate_toy_dataset(roots["b"], num_train=6, num_val=2, seed=7)
    generate_toy_dataset(roots["c"], num_train=6, num_val=2, seed=8)
    files = [
        "train/000000000001.jpg",
        "train/000000000006.jpg",
        "val/000001000002.jpg",
        "panoptic_train/000000000003.png",
        "semantic_train/000000000003.png",
        "panoptic_train.json",
        "instances_train.json",
        "panoptic_val.json",
    ]

    def read(root, f):
        with open(os.path.join(root, "knet_toy", f), "rb") as fh:
            return fh.read()

    for f in files:
        assert read(roots["a"], f) == read(roots["b"], f), f
    assert read(roots["a"], files[0]) != read(roots["c"], files[0])
    assert read(roots["a"], "panoptic_train.json") != read(roots["c"], "panoptic_train.json")


def test_toy_generation_skips_when_complete(tmp_path):
    out = generate_toy_dataset(str(tmp_path), num_train=2, num_val=1, seed=0)
    probe = os.path.join(out, "train", "000000000001.jpg")
    mtime = os.stat(probe).st_mtime_ns
    assert generate_toy_dataset(str(tmp_path), num_train=2, num_val=1, seed=0) == out
    assert os.stat(probe).st_mtime_ns == mtime  # same parameters: not regenerated
    generate_toy_dataset(str(tmp_path), num_train=2, num_val=1, seed=0, force=True)
    assert sorted(os.listdir(os.path.join(out, "train"))) == [
        "000000000001.jpg",
        "000000000002.jpg",
    ]
    assert not [d for d in os.listdir(tmp_path) if ".tmp-" in d]


def test_toy_statistics(toy_root):
    pan = {s: _load_json(os.path.join(toy_root, f"panoptic_{s}.json")) for s in SPLITS}
    assert len(pan["train"]["images"]) == 300 and len(pan["val"]["images"]) == 50
    assert pan["train"]["categories"] == TOY_CATEGORIES
    for s in SPLITS:
        assert len(os.listdir(os.path.join(toy_root, s))) == len(pan[s]["images"])
        for img in pan[s]["images"]:
            assert 256 <= img["height"] <= 384 and 256 <= img["width"] <= 384

    images = {im["id"]: im for im in pan["train"]["images"]}
    cats = Counter()
    crowd_images, multi_instance_images, tiny, large, touching = 0, 0, 0, 0, 0
    for ann in pan["train"]["annotations"]:
        im = images[ann["image_id"]]
        things = [s for s in ann["segments_info"] if s["category_id"] in {1, 2, 3, 5}]
        plain = [s for s in things if not s["iscrowd"]]
        assert len(plain) <= 6
        cats.update(s["category_id"] for s in ann["segments_info"])
        crowd_images += any(s["iscrowd"] for s in things)
        per_class = Counter(s["category_id"] for s in plain)
        multi_instance_images += bool(per_class) and max(per_class.values()) >= 2
        for s in plain:
            x, y, w, h = s["bbox"]
            tiny += s["area"] < 100
            large += s["area"] > 0.3 * im["height"] * im["width"]
            touching += x == 0 or y == 0 or x + w == im["width"] or y + h == im["height"]
        assert all(s["area"] >= 16 for s in ann["segments_info"])
        assert all(s["iscrowd"] == 0 for s in ann["segments_info"] if s["category_id"] >= 10)
    assert set(cats) == {c["id"] for c in TOY_CATEGORIES}
    assert 10 <= crowd_images <= 60  # ~10% of 300
    assert multi_instance_images >= 30
    assert tiny >= 30 and large >= 10 and touching >= 50


def test_toy_files_are_consistent(toy_root):
    pan = _load_json(os.path.join(toy_root, "panoptic_train.json"))
    inst = _load_json(os.path.join(toy_root, "instances_train.json"))
    assert [a["id"] for a in inst["annotations"]] == list(range(1, len(inst["annotations"]) + 1))
    assert inst["categories"] == TOY_THING_CATEGORIES
    assert any(a["iscrowd"] == 1 for a in inst["annotations"])
    inst_by_image = {}
    for a in inst["annotations"]:
        inst_by_image.setdefault(a["image_id"], []).append(a)
    id_map = contiguous_id_map(TOY_CATEGORIES)
    for ann in pan["annotations"][:25]:
        ids = read_panoptic_png(os.path.join(toy_root, "panoptic_train", ann["file_name"]))
        present, counts = np.unique(ids, return_counts=True)
        area = dict(zip(present.tolist(), counts.tolist()))
        assert set(area) - {0} == {s["id"] for s in ann["segments_info"]}
        for s in ann["segments_info"]:
            assert area[s["id"]] == s["area"]
            ys, xs = np.nonzero(ids == s["id"])
            assert s["bbox"] == [
                xs.min(),
                ys.min(),
                xs.max() - xs.min() + 1,
                ys.max() - ys.min() + 1,
            ]
        sem = np.asarray(Image.open(os.path.join(toy_root, "semantic_train", ann["file_name"])))
        assert sem.dtype == np.uint8 and sem.shape == ids.shape
        np.testing.assert_array_equal(
            sem, semantic_from_panoptic(ids, ann["segments_info"], id_map)
        )
        things = [s for s in ann["segments_info"] if s["category_id"] < 10]
        anns = inst_by_image.get(ann["image_id"], [])
        assert [(a["category_id"], a["area"], a["iscrowd"]) for a in anns] == [
            (s["category_id"], s["area"], s["iscrowd"]) for s in things
        ]


# --------------------------------------------------------------------------- registration
def test_all_names_registered():
    names = set(DatasetCatalog.list())
    for name in TOY_PANOPTIC + TOY_INSTANCES + TOY_SEMANTIC + COCO_SAMPLE + ADE_SAMPLE + COCO_FULL:
        assert name in names, name


def test_metadata_needs_no_files(tmp_path, monkeypatch):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    meta = MetadataCatalog.get("knet_toy_train_panoptic_with_sem_seg")
    assert meta.thing_classes == ["circle", "rectangle", "triangle", "star"]
    assert meta.stuff_classes[TOY_NUM_THING_CLASSES:] == ["sky", "grass", "wall"]
    assert MetadataCatalog.get("knet_toy_sem_seg_val").ignore_label == 255
    assert os.listdir(tmp_path) == []  # nothing generated by reading class metadata


def test_toy_metadata_constants():
    meta = get_panoptic_metadata(TOY_CATEGORIES)
    assert TOY_NUM_CLASSES == 7 and TOY_NUM_THING_CLASSES == 4
    assert meta["thing_dataset_id_to_contiguous_id"] == {1: 0, 2: 1, 3: 2, 5: 3}
    assert meta["stuff_dataset_id_to_contiguous_id"] == {
        1: 0,
        2: 1,
        3: 2,
        5: 3,
        10: 4,
        11: 5,
        12: 6,
    }
    assert [c["isthing"] for c in TOY_STUFF_CATEGORIES] == [0, 0, 0]


@pytest.mark.parametrize("name", TOY_PANOPTIC + COCO_SAMPLE[:1] + COCO_FULL)
def test_panoptic_metadata(name):
    meta = MetadataCatalog.get(name)
    k = len(meta.stuff_classes)
    t = len(meta.thing_classes)
    assert meta.evaluator_type == "coco_panoptic_seg"
    assert meta.ignore_label == 255 and meta.label_divisor == 1000
    assert len(meta.stuff_colors) == k and len(meta.thing_colors) == t
    assert meta.stuff_classes[:t] == meta.thing_classes  # things first
    assert sorted(meta.thing_dataset_id_to_contiguous_id.values()) == list(range(t))
    assert sorted(meta.stuff_dataset_id_to_contiguous_id.values()) == list(range(k))
    for d, c in meta.thing_dataset_id_to_contiguous_id.items():
        assert meta.stuff_dataset_id_to_contiguous_id[d] == c
    if name.startswith("coco"):
        assert (k, t) == (133, 80)
        std = _get_builtin_metadata("coco_panoptic_standard")
        assert meta.thing_dataset_id_to_contiguous_id == std["thing_dataset_id_to_contiguous_id"]
        assert {
            **std["thing_dataset_id_to_contiguous_id"],
            **std["stuff_dataset_id_to_contiguous_id"],
        } == (meta.stuff_dataset_id_to_contiguous_id)
        assert meta.stuff_classes == [c["name"] for c in COCO_CATEGORIES]
    else:
        assert (k, t) == (TOY_NUM_CLASSES, TOY_NUM_THING_CLASSES)


def test_full_coco_is_lazy_and_reports_missing_files():
    root = os.environ["DETECTRON2_DATASETS"]  # as registered on import (tests/conftest.py)
    meta = MetadataCatalog.get("coco_2017_val_panoptic_with_sem_seg")
    assert meta.panoptic_json == os.path.join(root, "coco", "annotations", "panoptic_val2017.json")
    assert meta.json_file == os.path.join(root, "coco", "annotations", "instances_val2017.json")
    with pytest.raises(FileNotFoundError, match="panoptic_semseg_val2017"):
        DatasetCatalog.get("coco_2017_val_panoptic_with_sem_seg")


# --------------------------------------------------------------------------- toy records
@pytest.mark.parametrize("split", SPLITS)
def test_toy_panoptic_records(toy_root, split):
    records = DatasetCatalog.get(f"knet_toy_{split}_panoptic_with_sem_seg")
    assert len(records) == {"train": 300, "val": 50}[split]
    meta = MetadataCatalog.get(f"knet_toy_{split}_panoptic_with_sem_seg")
    assert meta.panoptic_json == os.path.join(toy_root, f"panoptic_{split}.json")
    assert meta.json_file == os.path.join(toy_root, f"instances_{split}.json")
    for r in records[:: max(1, len(records) // 12)]:
        for key in ("file_name", "pan_seg_file_name", "sem_seg_file_name"):
            assert os.path.isfile(r[key]), r[key]
        ids = read_panoptic_png(r["pan_seg_file_name"])
        assert ids.shape == (r["height"], r["width"])
        present = set(np.unique(ids).tolist())
        for s in r["segments_info"]:
            assert s["id"] in present
            assert 0 <= s["category_id"] < TOY_NUM_CLASSES
            assert s["isthing"] == (s["category_id"] < TOY_NUM_THING_CLASSES)
            assert s["iscrowd"] in (0, 1)
        sem = np.asarray(Image.open(r["sem_seg_file_name"]))
        assert set(np.unique(sem).tolist()) <= set(range(TOY_NUM_CLASSES)) | {255}


@pytest.mark.parametrize("split", SPLITS)
def test_toy_instance_records(toy_root, split):
    records = DatasetCatalog.get(f"knet_toy_{split}")
    inst = _load_json(os.path.join(toy_root, f"instances_{split}.json"))
    assert len(records) == len(inst["images"])
    assert sum(len(r["annotations"]) for r in records) == len(inst["annotations"])
    assert min(a["id"] for a in inst["annotations"]) == 1
    assert MetadataCatalog.get(f"knet_toy_{split}").evaluator_type == "coco"
    classes = {a["category_id"] for r in records for a in r["annotations"]}
    assert classes == set(range(TOY_NUM_THING_CLASSES))  # contiguous ids after loading
    for r in records[:5]:
        assert os.path.isfile(r["file_name"])
        for a in r["annotations"]:
            assert isinstance(a["segmentation"], dict) and a["segmentation"]["size"] == [
                r["height"],
                r["width"],
            ]


@pytest.mark.parametrize("split", SPLITS)
def test_toy_semantic_records(toy_root, split):
    records = DatasetCatalog.get(f"knet_toy_sem_seg_{split}")
    pan = {r["image_id"]: r for r in DatasetCatalog.get(f"knet_toy_{split}_panoptic_with_sem_seg")}
    assert len(records) == len(pan)
    meta = MetadataCatalog.get(f"knet_toy_sem_seg_{split}")
    assert meta.evaluator_type == "sem_seg" and len(meta.stuff_classes) == TOY_NUM_CLASSES
    for r in records[:10]:
        p = pan[r["image_id"]]
        assert (r["file_name"], r["sem_seg_file_name"]) == (p["file_name"], p["sem_seg_file_name"])
        assert (r["height"], r["width"]) == (p["height"], p["width"])
        sem = np.asarray(Image.open(r["sem_seg_file_name"]))
        assert sem.shape == (r["height"], r["width"])


# --------------------------------------------------------------------------- shared samples
def test_coco_sample(coco_sample):
    records = DatasetCatalog.get("coco_sample_val_panoptic_with_sem_seg")
    gt = _load_json(os.path.join(coco_sample, "panoptic_examples.json"))
    assert [r["image_id"] for r in records] == [a["image_id"] for a in gt["annotations"]]
    assert sum(len(r["segments_info"]) for r in records) == 50
    meta = MetadataCatalog.get("coco_sample_val_panoptic_with_sem_seg")
    cache = os.environ["KNET_CACHE"]
    assert meta.sem_seg_root.startswith(cache) and meta.json_file.startswith(cache)
    to_contig = meta.stuff_dataset_id_to_contiguous_id
    for r, ann in zip(records, gt["annotations"]):
        assert os.path.isfile(r["file_name"])
        ids = read_panoptic_png(r["pan_seg_file_name"])
        sem = np.asarray(Image.open(r["sem_seg_file_name"]))
        assert sem.shape == ids.shape == (r["height"], r["width"])
        assert set(np.unique(sem).tolist()) <= set(range(133)) | {255}
        for s, raw in zip(r["segments_info"], ann["segments_info"]):
            assert s["category_id"] == to_contig[raw["category_id"]]
            assert s["isthing"] == (s["category_id"] < 80)
            assert np.all(sem[ids == s["id"]] == s["category_id"])  # crowd keeps its class
        assert np.all(sem[ids == 0] == 255)

    inst = _load_json(meta.json_file)
    assert [a["id"] for a in inst["annotations"]] == list(range(1, len(inst["annotations"]) + 1))
    assert [c["id"] for c in inst["categories"]] == [c["id"] for c in COCO_CATEGORIES[:80]]
    n_things = sum(1 for r in records for s in r["segments_info"] if s["isthing"])
    assert len(inst["annotations"]) == n_things
    assert sum(a["iscrowd"] for a in inst["annotations"]) == 3
    inst_records = DatasetCatalog.get("coco_sample_val")
    assert sum(len(r["annotations"]) for r in inst_records) == n_things
    assert MetadataCatalog.get("coco_sample_val").evaluator_type == "coco"


def test_ade20k_sample(ade_sample):
    meta = MetadataCatalog.get("ade20k_sample_sem_seg_train")
    assert meta.stuff_classes == list(ADE20K_SEM_SEG_CATEGORIES) and len(meta.stuff_classes) == 150
    assert meta.evaluator_type == "sem_seg" and meta.ignore_label == 255
    counts = {}
    for split, folder in (("train", "training"), ("val", "validation")):
        records = DatasetCatalog.get(f"ade20k_sample_sem_seg_{split}")
        counts[split] = len(records)
        for r in records:
            name = os.path.basename(r["sem_seg_file_name"])
            raw = np.asarray(Image.open(os.path.join(ade_sample, "annotations", folder, name)))
            sem = np.asarray(Image.open(r["sem_seg_file_name"]))
            assert os.path.isfile(r["file_name"])
            np.testing.assert_array_equal(sem[raw == 0], 255)
            np.testing.assert_array_equal(sem[raw > 0], raw[raw > 0] - 1)
            assert sem.max() < 150 or 255 in sem
    assert counts == {"train": 2, "val": 1}


def test_missing_shared_data_is_reported(tmp_path, monkeypatch):
    missing = tmp_path / "nowhere"
    monkeypatch.setenv("KNET_SHARED_DATA", str(missing))
    for name in ("coco_sample_val_panoptic_with_sem_seg", "coco_sample_val", ADE_SAMPLE[0]):
        assert name in DatasetCatalog.list()
        with pytest.raises(FileNotFoundError, match="KNET_SHARED_DATA") as e:
            DatasetCatalog.get(name)
        assert str(missing) in str(e.value)


# --------------------------------------------------------------------------- nothing written
BUILTIN = TOY_PANOPTIC + TOY_INSTANCES + TOY_SEMANTIC + COCO_SAMPLE + ADE_SAMPLE + COCO_FULL
TOY_COMMAND = "`python tools/make_toy_dataset.py`"
SAMPLES_COMMAND = "`python tools/prepare_samples.py`"
# a fresh process: register (import knet), read every metadata field, load every dataset
_FRESH_PROCESS = """
import json, sys
sys.path.insert(0, sys.argv.pop(1))  # tools/, for the samples' datasets
import prepare_samples  # imports knet, which registers the built-in datasets
prepare_samples.register_samples()
from detectron2.data import DatasetCatalog, MetadataCatalog
errors = {}
for name in sys.argv[1:]:
    MetadataCatalog.get(name).as_dict()  # path fields included
    try:
        DatasetCatalog.get(name)
    except FileNotFoundError as e:
        errors[name] = str(e)
print(json.dumps(errors))
"""


def _files_under(root) -> list:
    return [os.path.join(d, f) for d, _, files in os.walk(root) for f in files]


@pytest.mark.slow
def test_registration_metadata_and_loading_write_nothing(tmp_path):
    shared = shared_data_root()
    env = {
        **os.environ,
        "DETECTRON2_DATASETS": str(tmp_path / "datasets"),
        "KNET_CACHE": str(tmp_path / "cache"),
        "KNET_SHARED_DATA": shared,
    }
    run = subprocess.run(
        [sys.executable, "-c", _FRESH_PROCESS, str(REPO / "tools"), *BUILTIN],
        cwd=tmp_path,  # Detectron2's default datasets root is relative to it
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    errors = json.loads(run.stdout.splitlines()[-1])
    assert sorted(errors) == sorted(BUILTIN)  # nothing could be loaded ...
    assert _files_under(tmp_path) == []  # ... and nothing was generated or prepared
    for name in TOY_PANOPTIC + TOY_INSTANCES + TOY_SEMANTIC:
        assert TOY_COMMAND in errors[name] and str(tmp_path / "datasets") in errors[name]
    for name in COCO_SAMPLE + ADE_SAMPLE:
        if os.path.isdir(shared):  # the samples are there, their derived files are not
            assert SAMPLES_COMMAND in errors[name] and str(tmp_path / "cache") in errors[name]
        else:
            assert "KNET_SHARED_DATA" in errors[name]
    for name in COCO_FULL:
        assert "prepare_coco_semantic_from_panoptic.py" in errors[name]


def test_missing_or_stale_toy_dataset_names_the_command(tmp_path):
    # the registered loaders call this first (each of them: the fresh-process test above)
    with pytest.raises(FileNotFoundError, match=re.escape(TOY_COMMAND)) as e:
        require_toy_dataset(str(tmp_path))
    assert str(tmp_path / "knet_toy") in str(e.value)
    assert os.listdir(tmp_path) == []

    root = generate_toy_dataset(str(tmp_path), num_train=1, num_val=1, seed=0)
    assert require_toy_dataset(str(tmp_path)) == root
    marker = os.path.join(root, "_COMPLETE.json")
    with open(marker) as f:
        params = json.load(f)
    with open(marker, "w") as f:
        json.dump({**params, "version": params["version"] - 1}, f)
    with pytest.raises(FileNotFoundError, match="format version") as e:
        require_toy_dataset(str(tmp_path))
    assert TOY_COMMAND in str(e.value)


def test_unprepared_or_stale_samples_name_the_command(tmp_path, monkeypatch, shared_data_root):
    cache = tmp_path / "cache"
    monkeypatch.setenv("KNET_CACHE", str(cache))  # the loaders check the files of this cache
    for name in COCO_SAMPLE + ADE_SAMPLE:
        with pytest.raises(FileNotFoundError, match=re.escape(SAMPLES_COMMAND)):
            DatasetCatalog.get(name)
    assert not cache.exists()

    out = prepare_coco_sample()
    assert len(DatasetCatalog.get(COCO_SAMPLE[0])) == 2
    with open(os.path.join(out, "_COMPLETE.json"), "w") as f:
        json.dump({"source": "an older copy of the sample"}, f)
    with pytest.raises(FileNotFoundError, match="out of date"):
        DatasetCatalog.get(COCO_SAMPLE[1])


def test_prepare_samples_tool(tmp_path, monkeypatch, shared_data_root):
    monkeypatch.setenv("KNET_CACHE", str(tmp_path / "cache"))
    tool = load_script("tools/prepare_samples.py")
    assert tool.main(["--only", "ade20k"]) == 0
    assert len(DatasetCatalog.get(ADE_SAMPLE[0])) == 2
    with pytest.raises(FileNotFoundError, match=re.escape(SAMPLES_COMMAND)):
        DatasetCatalog.get(COCO_SAMPLE[0])  # --only: the other sample is left alone
    assert tool.main([]) == 0
    assert len(DatasetCatalog.get(COCO_SAMPLE[0])) == 2
    marker = os.path.join(prepare_ade20k_sample(), "_COMPLETE.json")
    mtime = os.stat(marker).st_mtime_ns
    assert tool.main(["--only", "ade20k"]) == 0 and os.stat(marker).st_mtime_ns == mtime
    assert tool.main(["--only", "ade20k", "--force"]) == 0
    assert os.stat(marker).st_mtime_ns != mtime

    monkeypatch.setenv("KNET_SHARED_DATA", str(tmp_path / "nowhere"))
    assert tool.main([]) == 1  # the missing shared sample is reported, nothing is written


def test_prepare_ade20k_label_shift(tmp_path):
    src = tmp_path / "ade" / "annotations" / "training"
    src.mkdir(parents=True)
    (tmp_path / "ade" / "annotations" / "validation").mkdir()
    label = np.array([[0, 1, 2], [149, 150, 0]], np.uint8)
    Image.fromarray(label).save(src / "x.png")
    assert prepare_ade20k_sem_seg(str(tmp_path / "ade"), str(tmp_path / "out")) == 1
    out = np.asarray(Image.open(tmp_path / "out" / "annotations_detectron2" / "training" / "x.png"))
    np.testing.assert_array_equal(out, [[255, 0, 1], [148, 149, 255]])


# --------------------------------------------------------------------------- bad data
@pytest.fixture
def toy_copy(toy_root, tmp_path):
    """A 3-image copy of the toy val split that the tests may corrupt."""
    src = DatasetCatalog.get("knet_toy_val_panoptic_with_sem_seg")[:3]
    root = tmp_path / "bad"
    for d in ("val", "panoptic_val", "semantic_val"):
        (root / d).mkdir(parents=True)
    for r in src:
        for key, d in (
            ("file_name", "val"),
            ("pan_seg_file_name", "panoptic_val"),
            ("sem_seg_file_name", "semantic_val"),
        ):
            shutil.copy(r[key], root / d)
    data = _load_json(os.path.join(toy_root, "panoptic_val.json"))
    ids = {r["image_id"] for r in src}
    data["images"] = [im for im in data["images"] if im["id"] in ids]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in ids]
    return root, data


def _write_and_load(root, data):
    path = root / "panoptic_val.json"
    with open(path, "w") as f:
        json.dump(data, f)
    return str(path), load_panoptic_json_with_sem_seg(
        str(path),
        str(root / "val"),
        str(root / "panoptic_val"),
        str(root / "semantic_val"),
        get_panoptic_metadata(TOY_CATEGORIES),
    )


def test_bad_json_without_segments_info(toy_copy):
    root, data = toy_copy
    _, records = _write_and_load(root, copy.deepcopy(data))
    assert len(records) == 3
    del data["annotations"][1]["segments_info"]
    with pytest.raises(ValueError, match="segments_info") as e:
        _write_and_load(root, data)
    assert str(root / "panoptic_val.json") in str(e.value)
    assert data["annotations"][1]["file_name"] in str(e.value)


def test_bad_unknown_category_id(toy_copy):
    root, data = toy_copy
    data["annotations"][2]["segments_info"][0]["category_id"] = 99
    with pytest.raises(ValueError, match="category_id 99") as e:
        _write_and_load(root, data)
    assert str(root / "panoptic_val.json") in str(e.value)


def test_bad_invalid_json(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"annotations": [')
    with pytest.raises(ValueError, match="broken.json"):
        load_panoptic_json_with_sem_seg(
            str(path), "i", "p", "s", get_panoptic_metadata(TOY_CATEGORIES)
        )
    with pytest.raises(FileNotFoundError, match="absent.json"):
        load_panoptic_json_with_sem_seg(
            str(tmp_path / "absent.json"), "i", "p", "s", get_panoptic_metadata(TOY_CATEGORIES)
        )


def test_bad_missing_image(toy_copy):
    root, data = toy_copy
    _, records = _write_and_load(root, data)
    os.remove(records[1]["file_name"])
    mapper = KNetPanopticDatasetMapper(augmentations=[], image_format="RGB")
    mapper(records[0])  # intact record still works
    with pytest.raises(FileNotFoundError, match=os.path.basename(records[1]["file_name"])):
        mapper(records[1])
    os.remove(records[0]["file_name"])  # the loader checks the first record's files
    with pytest.raises(FileNotFoundError, match=os.path.basename(records[0]["file_name"])):
        _write_and_load(root, data)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_bad_corrupt_png(toy_copy, damage):
    root, data = toy_copy
    _, records = _write_and_load(root, data)
    r = records[1]
    for key in ("pan_seg_file_name", "sem_seg_file_name"):
        with open(r[key], "rb") as f:
            content = f.read()
        with open(r[key], "wb") as f:
            f.write(
                b"not a png at all" * 8 if damage == "garbage" else content[: len(content) // 2]
            )
    with pytest.raises(ValueError, match=os.path.basename(r["pan_seg_file_name"])) as e:
        KNetPanopticDatasetMapper(augmentations=[], image_format="RGB")(r)
    assert "panoptic PNG" in str(e.value)
    sem_mapper = KNetSemanticDatasetMapper(augmentations=[], image_format="RGB")
    with pytest.raises(ValueError, match=os.path.basename(r["sem_seg_file_name"])):
        sem_mapper(r)


def test_bad_label_size_mismatch(toy_copy):
    root, data = toy_copy
    _, records = _write_and_load(root, data)
    r = records[0]
    Image.open(r["pan_seg_file_name"]).crop((0, 0, 100, 90)).save(r["pan_seg_file_name"])
    with pytest.raises(ValueError, match="Size mismatch") as e:
        KNetPanopticDatasetMapper(augmentations=[], image_format="RGB")(r)
    assert r["pan_seg_file_name"] in str(e.value)
