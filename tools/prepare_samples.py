#!/usr/bin/env python
"""The shared real samples as datasets: ``coco_sample_*`` and ``ade20k_sample_*``.

Development data read from ``$KNET_SHARED_DATA`` (default ``<repository>/../shared/data``), not
part of the package. This tool derives what their datasets read (COCO: semantic PNGs and an
instance json; ADE20K: converted labels) into ``$KNET_CACHE/prepared`` (default
``~/.cache/knet/prepared``), never next to the read-only samples. Up-to-date outputs are kept::

    python tools/prepare_samples.py                 # both samples
    python tools/prepare_samples.py --only coco     # or: --only ade20k
    python tools/prepare_samples.py --force         # prepare again

:func:`register_samples` registers the datasets (``tools/run_demo.py`` and the tests call it):

* ``coco_sample_val_panoptic_with_sem_seg`` / ``coco_sample_val``: the COCO sample, panoptic
  (with semantic labels and the instance json for mask AP) and instances;
* ``ade20k_sample_sem_seg_{train,val}``: the ADE20K sample.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json, load_sem_seg
from detectron2.data.datasets.builtin_meta import ADE20K_SEM_SEG_CATEGORIES
from filelock import FileLock
from panoptic_conversion import (
    prepare_ade20k_sem_seg,
    prepare_instances_from_panoptic,
    prepare_semantic_from_panoptic,
)

from knet.data.datasets.builtin import PANOPTIC_EXTRA, register_instances, register_sem_seg
from knet.data.datasets.panoptic import coco_panoptic_metadata, load_panoptic_json_with_sem_seg
from knet.data.datasets.toy import TOY_MARKER as MARKER  # the stamp file of a prepared folder
from knet.data.datasets.toy import read_toy_marker

COMMAND = "python tools/prepare_samples.py"
ADE_SPLITS = {"train": "training", "val": "validation"}
_COCO_META = coco_panoptic_metadata()


def shared_data_root() -> str:
    """``$KNET_SHARED_DATA``, else ``<repository>/../shared/data``."""
    default = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    return os.environ.get("KNET_SHARED_DATA", str(default))


def prepared_root() -> str:
    """``$KNET_CACHE/prepared`` (``KNET_CACHE`` defaults to ``~/.cache/knet``)."""
    cache = os.environ.get("KNET_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "knet"))
    return os.path.join(cache, "prepared")


def require_shared_path(*parts: str) -> str:
    """``parts`` under the shared data root; FileNotFoundError naming it and the variable."""
    path = os.path.join(shared_data_root(), *parts)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"Shared sample data not found: {path}. Set KNET_SHARED_DATA to the folder that "
            "holds coco_panoptic_sample/ and ade20k_sample/."
        )
    return path


def lock(out_dir: str) -> FileLock:
    """Inter-process lock on ``out_dir + '.lock'`` (creating the parent folder): concurrent
    processes (DDP ranks, test sessions) never prepare the same files at the same time."""
    os.makedirs(os.path.dirname(os.path.abspath(out_dir)), exist_ok=True)
    return FileLock(out_dir + ".lock")


def prepare_once(out_dir: str, stamp: dict, prepare: Callable[[str], None], force: bool) -> str:
    """Unless ``out_dir`` holds ``stamp`` already (in its :data:`MARKER`), run ``prepare(tmp_dir)``
    and rename the result to ``out_dir`` under :func:`lock`: no one sees a partial folder."""
    with lock(out_dir):
        if force or read_toy_marker(out_dir) != stamp:
            tmp_dir = f"{out_dir}.tmp-{os.getpid()}"
            shutil.rmtree(tmp_dir, ignore_errors=True)
            os.makedirs(tmp_dir)
            try:
                prepare(tmp_dir)
                with open(os.path.join(tmp_dir, MARKER), "w") as f:
                    json.dump(stamp, f)
                shutil.rmtree(out_dir, ignore_errors=True)
                os.replace(tmp_dir, out_dir)
            finally:
                shutil.rmtree(tmp_dir, ignore_errors=True)  # only left over if prepare() failed
    return out_dir


def _require_prepared(out_dir: str, stamp: dict[str, Any], what: str) -> None:
    if read_toy_marker(out_dir) != stamp:
        raise FileNotFoundError(
            f"The files derived from {what} are missing or out of date in {out_dir}. Create them "
            f"with `{COMMAND}` (it writes into KNET_CACHE/prepared, here {prepared_root()})."
        )


def coco_sample_paths() -> dict[str, str]:
    """Paths of the shared COCO panoptic sample and of its prepared files (not checked)."""
    source = os.path.join(shared_data_root(), "coco_panoptic_sample", "sample_data")
    out_dir = os.path.join(prepared_root(), "coco_panoptic_sample")
    return {
        "image_root": os.path.join(source, "input_images"),
        "panoptic_root": os.path.join(source, "panoptic_examples"),
        "panoptic_json": os.path.join(source, "panoptic_examples.json"),
        "sem_seg_root": os.path.join(out_dir, "panoptic_semseg_val"),
        "json_file": os.path.join(out_dir, "instances_val.json"),
    }


def _coco_sample_stamp() -> dict[str, Any]:
    require_shared_path("coco_panoptic_sample", "sample_data", "panoptic_examples")
    path = require_shared_path("coco_panoptic_sample", "sample_data", "panoptic_examples.json")
    st = os.stat(path)
    return {"source": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def prepare_coco_sample(force: bool = False) -> str:
    """Derive the COCO sample's semantic PNGs and instance json; returns their folder."""
    stamp, p = _coco_sample_stamp(), coco_sample_paths()

    def prepare(tmp: str) -> None:
        semantic = os.path.join(tmp, "panoptic_semseg_val")
        prepare_semantic_from_panoptic(p["panoptic_json"], p["panoptic_root"], semantic)
        instances = os.path.join(tmp, "instances_val.json")
        prepare_instances_from_panoptic(p["panoptic_json"], p["panoptic_root"], instances)

    return prepare_once(os.path.dirname(p["json_file"]), stamp, prepare, force)


def _load_coco_sample(panoptic: bool) -> list[dict]:
    """The COCO sample's panoptic or instance records (paths of the environment now)."""
    p = coco_sample_paths()
    _require_prepared(os.path.dirname(p["json_file"]), _coco_sample_stamp(), "the COCO sample")
    if not panoptic:
        return load_coco_json(p["json_file"], p["image_root"], "coco_sample_val")
    pan = (p["panoptic_json"], p["image_root"], p["panoptic_root"], p["sem_seg_root"])
    return load_panoptic_json_with_sem_seg(*pan, _COCO_META)


def _ade20k_dirs() -> tuple[str, str]:
    """(source, prepared) folders of the ADE20K sample."""
    sample = os.path.join("ade20k_sample", "ADEChallengeData2016")
    return os.path.join(shared_data_root(), sample), os.path.join(prepared_root(), sample)


def ade20k_sample_paths(split: str) -> dict[str, str]:
    """Images and prepared labels of the ADE20K sample ``split`` ("train"/"val")."""
    source, out_dir = _ade20k_dirs()
    return {
        "image_root": os.path.join(source, "images", ADE_SPLITS[split]),
        "sem_seg_root": os.path.join(out_dir, "annotations_detectron2", ADE_SPLITS[split]),
    }


def _ade20k_sample_stamp() -> dict[str, Any]:
    ade = require_shared_path("ade20k_sample", "ADEChallengeData2016")
    files = []
    for split in ADE_SPLITS.values():
        d = os.path.join(ade, "annotations", split)
        if os.path.isdir(d):
            files += [f"{split}/{n}:{os.path.getsize(os.path.join(d, n))}" for n in os.listdir(d)]
    return {"source": os.path.abspath(ade), "files": sorted(files)}


def prepare_ade20k_sample(force: bool = False) -> str:
    """Convert the ADE20K sample's labels; returns their folder."""
    stamp, (source, out_dir) = _ade20k_sample_stamp(), _ade20k_dirs()
    return prepare_once(out_dir, stamp, lambda tmp: prepare_ade20k_sem_seg(source, tmp), force)


def _load_ade20k_sample(split: str) -> list[dict]:
    _require_prepared(_ade20k_dirs()[1], _ade20k_sample_stamp(), "the ADE20K sample")
    p = ade20k_sample_paths(split)
    return load_sem_seg(p["sem_seg_root"], p["image_root"], gt_ext="png", image_ext="jpg")


SAMPLES = {"coco": prepare_coco_sample, "ade20k": prepare_ade20k_sample}


def register_samples() -> None:
    """Register the sample datasets (names above; already registered ones are kept).

    The paths are those of the environment now; loading a dataset whose prepared files are
    missing raises FileNotFoundError naming this tool's command."""
    if "coco_sample_val" in DatasetCatalog.list():
        return
    paths = coco_sample_paths()
    name = "coco_sample_val_panoptic_with_sem_seg"
    DatasetCatalog.register(name, partial(_load_coco_sample, True))
    MetadataCatalog.get(name).set(**paths, **_COCO_META, **PANOPTIC_EXTRA)
    register_instances("coco_sample_val", partial(_load_coco_sample, False), paths, _COCO_META)
    for split in ADE_SPLITS:
        metadata = {"stuff_classes": list(ADE20K_SEM_SEG_CATEGORIES)}
        load, paths = partial(_load_ade20k_sample, split), ade20k_sample_paths(split)
        register_sem_seg(f"ade20k_sample_sem_seg_{split}", load, paths, metadata)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--only", choices=sorted(SAMPLES), help="prepare this sample only")
    parser.add_argument("--force", action="store_true", help="prepare again even if up to date")
    args = parser.parse_args(argv)
    for name in [args.only] if args.only else list(SAMPLES):
        start = time.perf_counter()
        try:
            out = SAMPLES[name](force=args.force)
        except FileNotFoundError as e:  # the shared sample itself is missing
            print(f"{name}: {e}", file=sys.stderr)
            return 1
        print(f"{name} sample ready in {out} ({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
