"""The Detectron2 installer's compatibility fixes, and that Detectron2's parts we use import."""

import importlib.metadata
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
from scripts import load_script

REPO = Path(__file__).resolve().parents[1]
INSTALLER = REPO / "tools" / "install_detectron2.py"


@pytest.fixture(scope="module")
def installer():
    return load_script("tools/install_detectron2.py")


def is_pure_python_build() -> bool:
    return "purepython" in importlib.metadata.version("detectron2")


def test_detectron2_parts_import():
    import detectron2
    from detectron2 import layers, model_zoo  # noqa: F401
    from detectron2.data import DatasetCatalog, transforms  # noqa: F401
    from detectron2.evaluation import (  # noqa: F401
        COCOEvaluator,
        COCOPanopticEvaluator,
        SemSegEvaluator,
    )
    from detectron2.projects.deeplab import add_deeplab_config  # noqa: F401
    from detectron2.projects.point_rend import ColorAugSSDTransform  # noqa: F401
    from detectron2.utils.visualizer import Visualizer  # noqa: F401

    assert detectron2.__version__.startswith("0.")
    config = model_zoo.get_config_file("COCO-PanopticSegmentation/panoptic_fpn_R_50_1x.yaml")
    assert Path(config).is_file()


@pytest.mark.skipif(not is_pure_python_build(), reason="Detectron2 was not built by our installer")
def test_installed_package_carries_the_fixes():
    import detectron2

    root = Path(detectron2.__file__).parent
    transform = (root / "data/transforms/transform.py").read_text()
    assert "interp=Image.BILINEAR" in transform and "Image.LINEAR" not in transform
    for rel in ["evaluation/sem_seg_evaluation.py", "data/build.py"]:
        assert not re.search(r"\bnp\.(int|float)\b(?![\d_])", (root / rel).read_text()), rel
    for rel in ["layers/deform_conv.py", "layers/rotated_boxes.py", "evaluation/fast_eval_api.py"]:
        assert "from detectron2._missing_extension import _C" in (root / rel).read_text(), rel


@pytest.mark.skipif(not is_pure_python_build(), reason="Detectron2 was not built by our installer")
def test_compiled_ops_fail_with_instructions():
    import torch
    from detectron2.layers.rotated_boxes import pairwise_iou_rotated

    with pytest.raises(RuntimeError, match=r"install_detectron2\.py --source git"):
        pairwise_iou_rotated(torch.zeros(1, 5), torch.zeros(1, 5))


def test_sem_seg_evaluator_runs_on_numpy2(tmp_path):
    """The np.int/np.float fix: SemSegEvaluator processes and evaluates predictions."""
    import numpy as np
    import torch
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.evaluation import SemSegEvaluator
    from PIL import Image

    gt = np.array([[0, 1], [1, 255]], dtype=np.uint8)
    Image.fromarray(gt).save(tmp_path / "gt.png")
    name = "knet_test_install_semseg"
    if name not in DatasetCatalog.list():
        DatasetCatalog.register(
            name, lambda: [{"file_name": "x.jpg", "sem_seg_file_name": str(tmp_path / "gt.png")}]
        )
        MetadataCatalog.get(name).set(stuff_classes=["a", "b"], ignore_label=255)
    evaluator = SemSegEvaluator(name, distributed=False, output_dir=str(tmp_path))
    evaluator.reset()
    pred = torch.zeros(2, 2, 2)
    pred[0, 0, 0] = pred[1, 0, 1] = pred[0, 1, 0] = pred[1, 1, 1] = 1  # one pixel wrong
    evaluator.process([{"file_name": "x.jpg"}], [{"sem_seg": pred}])
    result = evaluator.evaluate()["sem_seg"]
    # class 0: TP 1, FP 1 -> IoU 1/2; class 1: TP 1, FN 1 -> IoU 1/2
    assert result["mIoU"] == pytest.approx(50.0)


def write_fixable_tree(root: Path) -> None:
    files = {
        "detectron2/data/transforms/transform.py": "def f(interp=Image.LINEAR):\n    pass\n",
        "detectron2/evaluation/sem_seg_evaluation.py": (
            "a = np.array(x, dtype=np.int)\nb = np.array(y, dtype=np.int)\n"
            + "".join(f"c{i} = z.astype(np.float)\n" for i in range(5))
            + "d = np.float32(1)\n"
        ),
        "detectron2/data/build.py": "h = np.zeros(3, dtype=np.int)\ni = np.ones(3, dtype=np.int)\n",
    }
    for rel in [
        "detectron2/layers/deform_conv.py",
        "detectron2/layers/rotated_boxes.py",
        "detectron2/layers/roi_align_rotated.py",
        "detectron2/evaluation/fast_eval_api.py",
    ]:
        files[rel] = "import torch\nfrom detectron2 import _C\n\nx = 1\n"
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def test_apply_fixes_replaces_exactly_the_listed_text(installer, tmp_path):
    write_fixable_tree(tmp_path)
    applied = installer.apply_fixes(tmp_path)
    assert len(applied) == len(installer.FIXES)
    sem = (tmp_path / "detectron2/evaluation/sem_seg_evaluation.py").read_text()
    assert "dtype=int)" in sem and "astype(float)" in sem
    assert "np.float32(1)" in sem  # sized numpy types are untouched
    deform = (tmp_path / "detectron2/layers/deform_conv.py").read_text()
    assert "try:\n    from detectron2 import _C\nexcept ImportError" in deform
    missing = (tmp_path / "detectron2/_missing_extension.py").read_text()
    assert "class _MissingExtension" in missing


def test_apply_fixes_fails_loudly_on_a_different_source(installer, tmp_path):
    write_fixable_tree(tmp_path)
    (tmp_path / "detectron2/data/build.py").write_text("h = np.zeros(3, dtype=int)\n")
    with pytest.raises(installer.InstallError, match=r"data/build\.py.*expected 2.*found 0"):
        installer.apply_fixes(tmp_path)


def test_stage_package_from_the_pinned_sdist(installer, tmp_path):
    # The test session points KNET_CACHE elsewhere; the install used the user's cache.
    candidates = [installer.default_cache_dir(), Path.home() / ".cache" / "knet" / "downloads"]
    found = [d / installer.SDIST_FILE for d in candidates if (d / installer.SDIST_FILE).is_file()]
    if not found:
        pytest.skip(f"{installer.SDIST_FILE} not downloaded (Detectron2 was installed another way)")
    cached = found[0]
    assert installer.sha256_of(cached) == installer.SDIST_SHA256
    stage = installer.stage_package(cached, tmp_path)
    for name in installer.PROJECTS:
        assert (stage / "detectron2" / "projects" / name / "__init__.py").is_file()
    assert any((stage / "detectron2" / "model_zoo" / "configs").rglob("*.yaml"))


@pytest.mark.slow
def test_existing_install_is_kept_without_force():
    out = subprocess.run(
        [sys.executable, str(INSTALLER)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert "already installed; keeping it" in out.stdout


def test_unknown_source_is_rejected():
    out = subprocess.run(
        [sys.executable, str(INSTALLER), "--source", "conda"], capture_output=True, text=True
    )
    assert out.returncode != 0
    assert "unknown source 'conda'" in out.stderr


def test_collect_env_reports_the_project():
    from knet.collect_env import collect_knet_env

    report = collect_knet_env()
    assert "detectron2 source" in report
    assert "panopticapi" in report
    assert "detectron2._C" in report
