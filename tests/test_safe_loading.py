"""Weight files are read without running code from them, through every entry point; bad files and
checkpoints that do not fit the config fail with messages that name them."""

import datetime
import logging
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import DefaultPredictor, defaults
from scripts import load_script

import knet  # noqa: F401  (DefaultPredictor builds a KNetCheckpointer from now on)
from knet.checkpoint import (
    CheckpointMismatchError,
    CorruptCheckpointError,
    KNetCheckpointer,
    UnsafeCheckpointError,
    describe_weights,
    load_weights_file,
)
from knet.conversion import save_detectron2_checkpoint
from knet.engine import KNetTrainer, get_knet_cfg

REPO = Path(__file__).resolve().parents[1]
TOY_CONFIG = str(REPO / "configs" / "toy" / "knet_R18_toy_panoptic.yaml")


class MakesDirectory:
    """Unpickling this object calls ``os.makedirs(path)``: stands for arbitrary code."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.makedirs, (self.path,))


@pytest.fixture
def evil(tmp_path):
    """(marker, {suffix: file}) where unpickling either file creates ``marker``."""
    marker = tmp_path / "code_ran"
    weights = {"backbone.stem.conv1.weight": np.zeros((1,), np.float32)}
    files = {".pkl": tmp_path / "evil.pkl", ".pth": tmp_path / "evil.pth"}
    with open(files[".pkl"], "wb") as f:
        pickle.dump({"model": weights, "__author__": MakesDirectory(str(marker))}, f)
    torch.save({"model": {}, "config": MakesDirectory(str(marker))}, files[".pth"])
    return marker, files


def _predictor_cfg(weights: str, opts=()):
    opts = ["MODEL.WEIGHTS", weights, "MODEL.DEVICE", "cpu", *opts]
    return get_knet_cfg(TOY_CONFIG, opts)


@pytest.fixture(scope="module")
def toy_state_dict():
    torch.manual_seed(0)
    return DefaultPredictor(_predictor_cfg("")).model.state_dict()


@pytest.mark.parametrize("suffix", [".pkl", ".pth"])
def test_default_predictor_refuses_malicious_files(evil, suffix):
    marker, files = evil
    with pytest.raises(UnsafeCheckpointError, match=r"Refused to load .*evil.*os|posix"):
        DefaultPredictor(_predictor_cfg(str(files[suffix])))
    assert not marker.exists()
    message = str(pytest.raises(UnsafeCheckpointError, load_weights_file, str(files[suffix])).value)
    assert str(files[suffix]) in message and "resave_trusted_checkpoint.py" in message
    assert not marker.exists()


def test_demo_refuses_malicious_files(evil, tmp_path, monkeypatch):
    marker, files = evil
    monkeypatch.syspath_prepend(str(REPO / "demo"))  # as ``python demo/demo.py`` has it
    demo = load_script("demo/demo.py")
    image = tmp_path / "image.png"
    image.write_bytes(b"")  # never read: loading the weights fails first
    for path in files.values():
        args = ["--config-file", TOY_CONFIG, "--input", str(image), "--output", str(tmp_path)]
        with pytest.raises(UnsafeCheckpointError):
            demo.main([*args, "--opts", "MODEL.WEIGHTS", str(path), "MODEL.DEVICE", "cpu"])
    assert not marker.exists()


@pytest.mark.slow
def test_train_net_refuses_malicious_files(evil, tmp_path, toy_root):
    marker, files = evil
    runs = {".pkl": ["--eval-only"], ".pth": []}  # evaluation and training load the weights
    for suffix, mode in runs.items():
        cmd = [sys.executable, str(REPO / "train_net.py"), "--config-file", TOY_CONFIG, *mode]
        cmd += ["MODEL.WEIGHTS", str(files[suffix]), "OUTPUT_DIR", str(tmp_path / suffix[1:])]
        result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert result.returncode != 0
        assert "UnsafeCheckpointError: Refused to load" in result.stderr, result.stderr[-2000:]
    assert not marker.exists()


def test_import_knet_binds_the_checkpointer_name_of_detectron2_defaults_only():
    """DefaultPredictor / DefaultTrainer build ours; Detectron2's class is intact."""
    assert defaults.DetectionCheckpointer is KNetCheckpointer
    for name in ("load", "_load_file", "_log_incompatible_keys"):
        method = getattr(DetectionCheckpointer, name)
        assert method.__module__.split(".")[0] in ("detectron2", "fvcore"), name


def test_corrupt_and_empty_files_are_named(tmp_path, toy_state_dict):
    good = tmp_path / "good.pth"
    save_detectron2_checkpoint(toy_state_dict, str(good), author="test")
    data = good.read_bytes()
    files = {
        "empty.pth": b"",
        "truncated.pth": data[: len(data) // 2],
        "legacy_truncated.pth": pickle.dumps({"model": {}})[:-3],
        "truncated.pkl": pickle.dumps({"model": {"a": np.ones(4)}, "__author__": "x"})[:-5],
        "text.pkl": b"not a pickle at all",
    }
    for name, content in files.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(CorruptCheckpointError) as error:
            DefaultPredictor(_predictor_cfg(str(path)))
        message = str(error.value)
        assert str(path) in message and "corrupt" in message
        assert "weights_only" not in message


def test_weight_files_in_every_safe_layout_load(tmp_path, toy_state_dict):
    """Detectron2 .pkl (numpy), .pth with tensors or numpy arrays, a plain pickle of tensors."""
    arrays = {k: v.numpy() for k, v in toy_state_dict.items()}
    pkl_numpy, pkl_torch = tmp_path / "numpy.pkl", tmp_path / "tensors.pkl"
    save_detectron2_checkpoint(toy_state_dict, str(pkl_numpy), author="test")
    pkl_torch.write_bytes(pickle.dumps({"model": dict(toy_state_dict), "__author__": "x"}))
    pth_numpy = tmp_path / "numpy.pth"
    torch.save({"model": arrays, "meta": {"date": "2021-10-16", "epochs": (1, 2)}}, pth_numpy)
    for path in (pkl_numpy, pkl_torch, pth_numpy):
        model = DefaultPredictor(_predictor_cfg(str(path))).model
        loaded = model.state_dict()
        assert all(torch.equal(loaded[k], toy_state_dict[k]) for k in toy_state_dict), path


def test_evaluation_refuses_a_checkpoint_that_does_not_fit(tmp_path, toy_state_dict):
    path = tmp_path / "other_head.pth"
    weights = dict(toy_state_dict)
    cls_key = next(k for k in weights if k.endswith("fc_cls.weight"))
    weights[cls_key] = torch.zeros(weights[cls_key].shape[0] + 3, *weights[cls_key].shape[1:])
    dropped = next(k for k in weights if k.startswith("pixel_decoder.") and "weight" in k)
    del weights[dropped]
    save_detectron2_checkpoint(weights, str(path), author="test")
    with pytest.raises(CheckpointMismatchError) as error:
        DefaultPredictor(_predictor_cfg(str(path)))
    message = str(error.value)
    assert str(path) in message and cls_key in message and dropped.rsplit(".", 1)[0] in message
    # first what the file holds and what the config builds, then the keys
    first, keys = message.split("\nKeys: ")
    assert "holds a panoptic / instance K-Net (ResNet-18, 10 classes)" in first
    assert "the config builds a panoptic / instance K-Net (ResNet-18, 7 classes)" in first
    assert cls_key not in first and cls_key in keys


def test_fine_tuning_loads_what_fits_with_one_summary_line(tmp_path, toy_state_dict, caplog):
    path = tmp_path / "other_classes.pth"
    weights = {k: v + 1 if v.is_floating_point() else v for k, v in toy_state_dict.items()}
    resized = [k for k in weights if "fc_cls" in k]
    for k in resized:
        weights[k] = torch.zeros(weights[k].shape[0] + 3, *weights[k].shape[1:])
    save_detectron2_checkpoint(weights, str(path), author="test")
    torch.manual_seed(0)
    model = DefaultPredictor(_predictor_cfg("")).model.train()
    with caplog.at_level(logging.WARNING):
        KNetCheckpointer(model).load(str(path))
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], weights[k]) for k in weights if k not in resized)
    assert all(torch.equal(loaded[k], toy_state_dict[k]) for k in resized)  # initialisation kept
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) == 1 and f"{len(resized)} with another shape" in lines[0], lines


def _semantic_toy_state_dict() -> dict[str, torch.Tensor]:
    cfg = get_knet_cfg(str(REPO / "configs/toy/knet_upernet_R18_toy_semantic.yaml"), [])
    return KNetTrainer.build_model(cfg).state_dict()


def test_training_refuses_another_models_weights_unless_partial(tmp_path, toy_state_dict):
    """A semantic model's file given to the panoptic config (a typo'd path) would leave most of
    the model random: refused for training, with what the file holds; loaded when asked."""
    path = tmp_path / "semantic.pth"
    save_detectron2_checkpoint(_semantic_toy_state_dict(), str(path), author="test")
    model = DefaultPredictor(_predictor_cfg("")).model.train()
    with pytest.raises(CheckpointMismatchError) as error:
        KNetCheckpointer(model).load(str(path))
    first = str(error.value).split("\nKeys: ")[0]
    assert f"{path} holds a semantic K-Net (ResNet-18 with deep stem, 7 classes)" in first
    assert "MODEL.WEIGHTS_PARTIAL True" in first
    KNetCheckpointer(model, allow_partial=True).load(str(path))  # asked for: what fits
    # a pretrained backbone (ImageNet) leaves the heads random, as intended: loaded
    backbone = {k: v for k, v in toy_state_dict.items() if k.startswith("backbone.bottom_up.")}
    save_detectron2_checkpoint(backbone, str(tmp_path / "backbone.pth"), author="test")
    KNetCheckpointer(model).load(str(tmp_path / "backbone.pth"))


@pytest.mark.parametrize(
    "config, description",
    [
        ("coco/panoptic-segmentation/knet_R50_bs16_1x.yaml", "K-Net (ResNet-50, 133 classes)"),
        (
            "coco/instance-segmentation/knet_R101_DCN_bs16_ms3x.yaml",
            "K-Net (ResNet-101 with deformable convs, 80 classes)",
        ),
        (
            "ade20k/semantic-segmentation/knet_s3_upernet_R50_bs16_80k.yaml",
            "semantic K-Net (ResNet-50 with deep stem, 150 classes)",
        ),
        ("ade20k/semantic-segmentation/knet_s3_upernet_swin_T_bs16_80k.yaml", "(Swin-T, 150"),
    ],
)
def test_weights_are_described_from_their_keys(config, description):
    cfg = get_knet_cfg(str(REPO / "configs" / config), ["MODEL.DEVICE", "cpu"])
    state = KNetTrainer.build_model(cfg).state_dict()
    assert description in describe_weights(state)
    backbone = {k: v for k, v in state.items() if k.startswith("backbone.")}
    assert describe_weights(backbone).startswith("a backbone only (")
    assert "MMDetection layout" in describe_weights({"rpn_head.init_kernels.weight": 0})


def test_resave_tool_makes_a_trusted_file_loadable(tmp_path, toy_state_dict):
    trusted = tmp_path / "trusted.pth"
    torch.save({"model": dict(toy_state_dict), "when": datetime.date(2021, 10, 16)}, trusted)
    with pytest.raises(UnsafeCheckpointError):
        load_weights_file(str(trusted))
    out = tmp_path / "resaved.pth"
    assert load_script("tools/resave_trusted_checkpoint.py").main([str(trusted), str(out)]) == 0
    model = DefaultPredictor(_predictor_cfg(str(out))).model.state_dict()
    assert all(torch.equal(model[k], toy_state_dict[k]) for k in toy_state_dict)
