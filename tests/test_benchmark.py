"""tools/benchmark.py runs every engine and part it offers and reports consistent numbers."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOY_CONFIG = str(REPO / "configs" / "toy" / "knet_R18_toy_panoptic.yaml")


@pytest.mark.slow
def test_benchmark_reports_engines_parts_amp_and_training(tmp_path):
    pytest.importorskip("onnxruntime", reason="the onnx engine needs onnxruntime")
    json_path = tmp_path / "bench.json"
    cmd = [
        sys.executable, "tools/benchmark.py", "--config-file", TOY_CONFIG, "--size", "64x96",
        "--warmup", "1", "--iters", "2", "--threads", "1", "--breakdown", "--train",
        "--engines", "eager", "torchscript", "onnx", "--amp", "--output-json", str(json_path),
    ]  # fmt: skip
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(json_path.read_text())
    names = [m["name"] for m in results["inference"]]
    for engine in ("eager", "torchscript", "onnx", "eager, torch.bfloat16 autocast"):
        assert f"knet_R18_toy_panoptic: {engine}" in names
    assert "knet_R18_toy_panoptic: its backbone alone" in names
    floor = results["inference"][names.index("Detectron2 R50-FPN backbone (floor)")]
    for m in results["inference"]:
        assert m["median_s"] > 0 and len(m["times_s"]) == 2
        if m is not floor:
            assert m["ratio_to_floor"] == pytest.approx(m["median_s"] / floor["median_s"])
    # every part of the model is timed by its hooks, and the parts fit in the whole
    parts = {m["name"]: m["median_s"] for m in results["breakdown"]}
    assert {"backbone", "pixel_decoder", "kernel_head", "postprocessor"} <= set(parts)
    full = results["inference"][names.index("knet_R18_toy_panoptic: eager")]["median_s"]
    assert 0 < sum(v for k, v in parts.items() if not k.startswith("rest")) <= full * 1.2
    assert results["train"]["median_s"] > 0 and len(results["train"]["times_s"]) == 2
    assert "| measurement" in result.stdout and "ratio to floor" in result.stdout


@pytest.mark.slow
def test_benchmark_breakdown_of_semantic_knet(tmp_path):
    """The parts are timed by hooks on any meta-architecture (no post-processor here)."""
    json_path = tmp_path / "bench.json"
    config = str(REPO / "configs" / "toy" / "knet_upernet_R18_toy_semantic.yaml")
    cmd = [
        sys.executable, "tools/benchmark.py", "--config-file", config, "--size", "64x96",
        "--warmup", "1", "--iters", "1", "--threads", "1", "--breakdown",
        "--output-json", str(json_path),
    ]  # fmt: skip
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    parts = {m["name"] for m in json.loads(json_path.read_text())["breakdown"]}
    assert {"backbone", "pixel_decoder", "kernel_head"} <= parts and "postprocessor" not in parts
