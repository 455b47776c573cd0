"""Registration of K-Net's datasets (runs on ``import knet``; reads and writes nothing).

Registered names:

* ``knet_toy_{train,val}_panoptic_with_sem_seg``: toy panoptic records (``evaluator_type``
  ``coco_panoptic_seg``; ``json_file`` points at the toy instance json for mask AP).
* ``knet_toy_{train,val}``: toy instances (Detectron2 COCO format, ``evaluator_type="coco"``).
* ``knet_toy_sem_seg_{train,val}``: toy semantic segmentation (``evaluator_type="sem_seg"``).
* ``coco_sample_val_panoptic_with_sem_seg`` / ``coco_sample_val``: the 2 real COCO val images of
  the shared sample (``$KNET_SHARED_DATA/coco_panoptic_sample``), with semantic PNGs and an
  instance json derived into ``$KNET_CACHE/prepared`` by ``tools/prepare_samples.py``.
* ``ade20k_sample_sem_seg_{train,val}``: the shared ADE20K street-scene sample, labels converted
  into ``$KNET_CACHE/prepared`` by ``tools/prepare_samples.py``.
* ``coco_2017_{train,val}_panoptic_with_sem_seg``: full COCO, Mask2Former's layout (skipped if
  already registered, e.g. by Mask2Former).

As in Mask2Former, registration only records paths: registering, reading metadata (paths are
resolved from the environment when read, see :mod:`.catalog`) and loading never generate or
prepare files. A loader whose files are missing raises ``FileNotFoundError`` naming the command
that creates them; :func:`prepare_builtin_datasets` runs those commands' functions for a list of
dataset names (``tools/run_demo.py`` calls it).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterable
from typing import Any

from detectron2.data.datasets import load_coco_json, load_sem_seg
from detectron2.data.datasets.builtin_meta import ADE20K_SEM_SEG_CATEGORIES

from .catalog import register_dataset
from .panoptic import (
    coco_panoptic_metadata,
    coco_panoptic_with_sem_seg_paths,
    get_panoptic_metadata,
    load_panoptic_json_with_sem_seg,
)
from .paths import file_lock, get_prepared_root, get_shared_data_root, require_shared_path
from .prepare import (
    prepare_ade20k_sem_seg,
    prepare_instances_from_panoptic,
    prepare_semantic_from_panoptic,
)
from .toy import TOY_CATEGORIES, ensure_toy_dataset, require_toy_dataset, toy_dataset_dir

__all__ = [
    "SAMPLES_COMMAND",
    "get_toy_metadata",
    "toy_paths",
    "coco_sample_paths",
    "ade20k_sample_paths",
    "prepare_coco_sample",
    "prepare_ade20k_sample",
    "prepare_builtin_datasets",
    "register_all",
]

# The command that prepares the shared samples' derived files (named when they are missing).
SAMPLES_COMMAND = "python tools/prepare_samples.py"

TOY_SPLITS = ("train", "val")
ADE_SPLITS = {"train": "training", "val": "validation"}
_PANOPTIC_EXTRA = {
    "evaluator_type": "coco_panoptic_seg",
    "ignore_label": 255,
    "label_divisor": 1000,
}


# --------------------------------------------------------------------------- toy
def get_toy_metadata() -> dict[str, Any]:
    """Class metadata of the toy dataset (no files needed): Mask2Former panoptic convention."""
    return get_panoptic_metadata(TOY_CATEGORIES)


def toy_paths(split: str) -> dict[str, str]:
    """Paths of the toy ``split`` files under ``$DETECTRON2_DATASETS/knet_toy`` (not checked)."""
    root = toy_dataset_dir()
    return {
        "image_root": os.path.join(root, split),
        "panoptic_root": os.path.join(root, f"panoptic_{split}"),
        "panoptic_json": os.path.join(root, f"panoptic_{split}.json"),
        "sem_seg_root": os.path.join(root, f"semantic_{split}"),
        "json_file": os.path.join(root, f"instances_{split}.json"),
    }


def _lazy(paths_fn: Callable[[], dict[str, str]], keys: list[str]) -> dict[str, Callable[[], str]]:
    return {k: (lambda k=k: paths_fn()[k]) for k in keys}


def _load_toy_panoptic(split: str) -> list[dict]:
    require_toy_dataset()
    p = toy_paths(split)
    return load_panoptic_json_with_sem_seg(
        p["panoptic_json"],
        p["image_root"],
        p["panoptic_root"],
        p["sem_seg_root"],
        get_toy_metadata(),
    )


def _load_toy_instances(split: str) -> list[dict]:
    require_toy_dataset()
    p = toy_paths(split)
    return load_coco_json(p["json_file"], p["image_root"], dataset_name=f"knet_toy_{split}")


def _load_toy_sem_seg(split: str) -> list[dict]:
    require_toy_dataset()
    p = toy_paths(split)
    records = load_sem_seg(p["sem_seg_root"], p["image_root"], gt_ext="png", image_ext="jpg")
    with open(p["panoptic_json"]) as f:
        images = {os.path.splitext(im["file_name"])[0]: im for im in json.load(f)["images"]}
    for r in records:
        im = images[os.path.splitext(os.path.basename(r["file_name"]))[0]]
        r.update(image_id=im["id"], height=im["height"], width=im["width"])
    return records


def _register_toy() -> None:
    meta = get_toy_metadata()
    things = {
        "thing_classes": meta["thing_classes"],
        "thing_colors": meta["thing_colors"],
        "thing_dataset_id_to_contiguous_id": meta["thing_dataset_id_to_contiguous_id"],
    }
    for split in TOY_SPLITS:
        paths = lambda s=split: toy_paths(s)  # noqa: E731
        register_dataset(
            f"knet_toy_{split}_panoptic_with_sem_seg",
            lambda s=split: _load_toy_panoptic(s),
            _lazy(
                paths, ["image_root", "panoptic_root", "panoptic_json", "sem_seg_root", "json_file"]
            ),
            **meta,
            **_PANOPTIC_EXTRA,
        )
        register_dataset(
            f"knet_toy_{split}",
            lambda s=split: _load_toy_instances(s),
            _lazy(paths, ["image_root", "json_file"]),
            evaluator_type="coco",
            **things,
        )
        register_dataset(
            f"knet_toy_sem_seg_{split}",
            lambda s=split: _load_toy_sem_seg(s),
            _lazy(paths, ["image_root", "sem_seg_root"]),
            evaluator_type="sem_seg",
            ignore_label=255,
            stuff_classes=meta["stuff_classes"],
            stuff_colors=meta["stuff_colors"],
            stuff_dataset_id_to_contiguous_id=meta["stuff_dataset_id_to_contiguous_id"],
        )


# --------------------------------------------------------------------------- shared samples
def _source_stamp(path: str) -> dict[str, Any]:
    st = os.stat(path)
    return {"source": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _prepared(out_dir: str, stamp: dict[str, Any]) -> bool:
    """Whether ``out_dir`` holds a complete preparation of the source described by ``stamp``."""
    try:
        with open(os.path.join(out_dir, "_COMPLETE.json")) as f:
            return json.load(f) == stamp
    except (OSError, ValueError):
        return False


def _prepare_once(
    out_dir: str, stamp: dict[str, Any], prepare: Callable[[str], None], force: bool = False
) -> None:
    """Run ``prepare(tmp_dir)`` and move the result to ``out_dir`` unless it is up to date."""
    if not force and _prepared(out_dir, stamp):
        return
    with file_lock(out_dir):
        if not force and _prepared(out_dir, stamp):
            return
        tmp_dir = f"{out_dir}.tmp-{os.getpid()}"
        shutil.rmtree(tmp_dir, ignore_errors=True)
        os.makedirs(tmp_dir)
        try:
            prepare(tmp_dir)
            with open(os.path.join(tmp_dir, "_COMPLETE.json"), "w") as f:
                json.dump(stamp, f)
            shutil.rmtree(out_dir, ignore_errors=True)
            os.replace(tmp_dir, out_dir)
        finally:
            shutil.rmtree(tmp_dir, ignore_errors=True)  # only left over if prepare() failed


def _require_prepared(out_dir: str, stamp: dict[str, Any], what: str) -> None:
    """Raise ``FileNotFoundError`` naming :data:`SAMPLES_COMMAND` unless ``out_dir`` is ready."""
    if not _prepared(out_dir, stamp):
        raise FileNotFoundError(
            f"The files derived from {what} are missing or out of date in {out_dir}. Create them "
            f"with `{SAMPLES_COMMAND}` (it writes into KNET_CACHE/prepared, here "
            f"{get_prepared_root()})."
        )


def _coco_sample_dirs() -> dict[str, str]:
    return {
        "source": os.path.join(get_shared_data_root(), "coco_panoptic_sample", "sample_data"),
        "out_dir": os.path.join(get_prepared_root(), "coco_panoptic_sample"),
    }


def coco_sample_paths() -> dict[str, str]:
    """Paths of the shared COCO panoptic sample and of its prepared files (not checked)."""
    dirs = _coco_sample_dirs()
    return {
        "image_root": os.path.join(dirs["source"], "input_images"),
        "panoptic_root": os.path.join(dirs["source"], "panoptic_examples"),
        "panoptic_json": os.path.join(dirs["source"], "panoptic_examples.json"),
        "sem_seg_root": os.path.join(dirs["out_dir"], "panoptic_semseg_val"),
        "json_file": os.path.join(dirs["out_dir"], "instances_val.json"),
    }


def _coco_sample_stamp() -> dict[str, Any]:
    """Stamp of the shared COCO sample; raises ``FileNotFoundError`` (naming the path and
    KNET_SHARED_DATA) if it is absent."""
    require_shared_path("coco_panoptic_sample", "sample_data")
    require_shared_path("coco_panoptic_sample", "sample_data", "panoptic_examples")
    return _source_stamp(
        require_shared_path("coco_panoptic_sample", "sample_data", "panoptic_examples.json")
    )


def prepare_coco_sample(force: bool = False) -> str:
    """Derive the COCO sample's semantic PNGs and instance json into the cache (skipped when up
    to date, unless ``force``); returns the prepared folder. Run by ``tools/prepare_samples.py``.
    """
    stamp, p = _coco_sample_stamp(), coco_sample_paths()

    def prepare(tmp: str) -> None:
        prepare_semantic_from_panoptic(
            p["panoptic_json"], p["panoptic_root"], os.path.join(tmp, "panoptic_semseg_val")
        )
        prepare_instances_from_panoptic(
            p["panoptic_json"], p["panoptic_root"], os.path.join(tmp, "instances_val.json")
        )

    out_dir = _coco_sample_dirs()["out_dir"]
    _prepare_once(out_dir, stamp, prepare, force)
    return out_dir


def _require_coco_sample() -> dict[str, str]:
    """The sample's paths, once checked to exist and to be prepared."""
    _require_prepared(_coco_sample_dirs()["out_dir"], _coco_sample_stamp(), "the COCO sample")
    return coco_sample_paths()


def _load_coco_sample() -> list[dict]:
    p = _require_coco_sample()
    return load_panoptic_json_with_sem_seg(
        p["panoptic_json"],
        p["image_root"],
        p["panoptic_root"],
        p["sem_seg_root"],
        coco_panoptic_metadata(),
    )


def _load_coco_sample_instances() -> list[dict]:
    p = _require_coco_sample()
    return load_coco_json(p["json_file"], p["image_root"], dataset_name="coco_sample_val")


def _register_coco_sample() -> None:
    meta = coco_panoptic_metadata()
    register_dataset(
        "coco_sample_val_panoptic_with_sem_seg",
        _load_coco_sample,
        _lazy(
            coco_sample_paths,
            ["image_root", "panoptic_root", "panoptic_json", "sem_seg_root", "json_file"],
        ),
        **meta,
        **_PANOPTIC_EXTRA,
    )
    register_dataset(
        "coco_sample_val",
        _load_coco_sample_instances,
        _lazy(coco_sample_paths, ["image_root", "json_file"]),
        evaluator_type="coco",
        thing_classes=meta["thing_classes"],
        thing_colors=meta["thing_colors"],
        thing_dataset_id_to_contiguous_id=meta["thing_dataset_id_to_contiguous_id"],
    )


def _ade20k_sample_dirs() -> dict[str, str]:
    return {
        "source": os.path.join(get_shared_data_root(), "ade20k_sample", "ADEChallengeData2016"),
        "out_dir": os.path.join(get_prepared_root(), "ade20k_sample", "ADEChallengeData2016"),
    }


def ade20k_sample_paths(split: str) -> dict[str, str]:
    """Paths of the shared ADE20K sample ``split`` ("train"/"val") and of its prepared labels
    (not checked)."""
    dirs = _ade20k_sample_dirs()
    return {
        "image_root": os.path.join(dirs["source"], "images", ADE_SPLITS[split]),
        "sem_seg_root": os.path.join(dirs["out_dir"], "annotations_detectron2", ADE_SPLITS[split]),
    }


def _ade20k_sample_stamp() -> dict[str, Any]:
    """Stamp of the shared ADE20K sample; raises ``FileNotFoundError`` if it is absent."""
    ade = require_shared_path("ade20k_sample", "ADEChallengeData2016")
    return {"source": os.path.abspath(ade), "files": sorted(_list_pngs(ade))}


def prepare_ade20k_sample(force: bool = False) -> str:
    """Convert the ADE20K sample's labels into the cache (skipped when up to date, unless
    ``force``); returns the prepared folder. Run by ``tools/prepare_samples.py``."""
    stamp, dirs = _ade20k_sample_stamp(), _ade20k_sample_dirs()
    prepare = lambda tmp: prepare_ade20k_sem_seg(dirs["source"], tmp)  # noqa: E731
    _prepare_once(dirs["out_dir"], stamp, prepare, force)
    return dirs["out_dir"]


def _load_ade20k_sample(split: str) -> list[dict]:
    stamp = _ade20k_sample_stamp()
    _require_prepared(_ade20k_sample_dirs()["out_dir"], stamp, "the ADE20K sample")
    p = ade20k_sample_paths(split)
    return load_sem_seg(p["sem_seg_root"], p["image_root"], gt_ext="png", image_ext="jpg")


def _list_pngs(ade: str) -> list[str]:
    out = []
    for split in ADE_SPLITS.values():
        d = os.path.join(ade, "annotations", split)
        if os.path.isdir(d):
            out += [f"{split}/{n}:{os.path.getsize(os.path.join(d, n))}" for n in os.listdir(d)]
    return out


def _register_ade20k_sample() -> None:
    for split in ADE_SPLITS:
        paths = lambda s=split: ade20k_sample_paths(s)  # noqa: E731
        register_dataset(
            f"ade20k_sample_sem_seg_{split}",
            lambda s=split: _load_ade20k_sample(s),
            _lazy(paths, ["image_root", "sem_seg_root"]),
            stuff_classes=list(ADE20K_SEM_SEG_CATEGORIES),
            evaluator_type="sem_seg",
            ignore_label=255,
        )


# --------------------------------------------------------------------------- full COCO
def _load_coco_full(split: str) -> list[dict]:
    p = coco_panoptic_with_sem_seg_paths(split)
    if not os.path.isdir(p["sem_seg_root"]):
        raise FileNotFoundError(
            f"Semantic labels not found: {p['sem_seg_root']}. Create them with "
            "tools/prepare_coco_semantic_from_panoptic.py (see datasets/README.md)."
        )
    return load_panoptic_json_with_sem_seg(
        p["panoptic_json"],
        p["image_root"],
        p["panoptic_root"],
        p["sem_seg_root"],
        coco_panoptic_metadata(),
    )


def _register_coco_full() -> None:
    meta = coco_panoptic_metadata()
    for split in ("train", "val"):
        paths = lambda s=split: coco_panoptic_with_sem_seg_paths(s)  # noqa: E731
        register_dataset(
            f"coco_2017_{split}_panoptic_with_sem_seg",
            lambda s=split: _load_coco_full(s),
            _lazy(
                paths, ["image_root", "panoptic_root", "panoptic_json", "sem_seg_root", "json_file"]
            ),
            **meta,
            **_PANOPTIC_EXTRA,
        )


# --------------------------------------------------------------------------- explicit preparation
_CREATORS: dict[str, Callable[[], str]] = {
    "knet_toy": ensure_toy_dataset,
    "coco_sample": prepare_coco_sample,
    "ade20k_sample": prepare_ade20k_sample,
}


def prepare_builtin_datasets(names: Iterable[str]) -> dict[str, str]:
    """Create the files of the built-in datasets among ``names`` (toy: generated, samples:
    prepared; each skipped when up to date). Other names are left alone.

    For the commands that create data (``tools/run_demo.py``); returns {prefix: folder} for the
    datasets it created or found ready.
    """
    done: dict[str, str] = {}
    for name in names:
        for prefix, create in _CREATORS.items():
            if name.startswith(prefix) and prefix not in done:
                done[prefix] = create()
    return done


def register_all() -> None:
    """Register every K-Net dataset (idempotent: already registered names are skipped)."""
    _register_toy()
    _register_coco_sample()
    _register_ade20k_sample()
    _register_coco_full()
