"""Training with train_net's trainer: losses logged, checkpoints written, --resume restores."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "MODEL.KNET.NUM_PROPOSALS", "4",
    "MODEL.KNET.NUM_STAGES", "1",
    "MODEL.KNET.STAGE_LOSS_WEIGHTS", "[1.0]",
    "INPUT.MIN_SIZE_TRAIN", "(96, 112)",
    "INPUT.MAX_SIZE_TRAIN", "128",
    "INPUT.MIN_SIZE_TEST", "96",
    "INPUT.MAX_SIZE_TEST", "128",
    "SOLVER.IMS_PER_BATCH", "2",
    "SOLVER.WARMUP_ITERS", "1",
    "SOLVER.STEPS", "()",
    "DATALOADER.NUM_WORKERS", "0",
    "TEST.EVAL_PERIOD", "0",
]  # fmt: skip


def run_train_net(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "train_net.py"), *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_train_checkpoint_resume_and_eval_only(tmp_path, toy_root):
    config = str(REPO / "configs/toy/knet_R18_toy_panoptic.yaml")
    out = str(tmp_path / "run")
    opts = [*TINY, "OUTPUT_DIR", out, "SOLVER.CHECKPOINT_PERIOD", "2"]  # KEY VALUE pairs last

    first = run_train_net("--config-file", config, *opts, "SOLVER.MAX_ITER", "3")
    assert first.returncode == 0, first.stderr[-3000:]
    assert (Path(out) / "model_0000001.pth").is_file()
    assert (Path(out) / "model_final.pth").is_file()
    metrics = [json.loads(line) for line in open(os.path.join(out, "metrics.json"))]
    losses = [m for m in metrics if "total_loss" in m]
    assert losses and all(k in losses[-1] for k in ["s0_loss_cls", "loss_rpn_seg", "lr"])
    # the final evaluation (after the last iteration) is logged too
    assert any("panoptic_seg/PQ" in m for m in metrics)
    assert list(Path(out).glob("events.out.tfevents.*"))

    # --resume continues from the last checkpoint (iteration 3) instead of starting over
    resumed = run_train_net("--config-file", config, "--resume", *opts, "SOLVER.MAX_ITER", "5")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = resumed.stdout + resumed.stderr
    assert "Starting training from iteration 3" in log

    # --eval-only with MODEL.WEIGHTS loads what training wrote (torch.load weights_only safe)
    weights = os.path.join(out, "model_final.pth")
    evaluated = run_train_net(
        "--config-file", config, "--eval-only", *opts, "MODEL.WEIGHTS", weights
    )
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert "copypaste: PQ,SQ,RQ" in evaluated.stdout + evaluated.stderr


@pytest.mark.slow
def test_semantic_train_and_eval_only_with_tta(tmp_path, toy_root):
    config = str(REPO / "configs/toy/knet_upernet_R18_toy_semantic.yaml")
    out = str(tmp_path / "sem")
    opts = [
        "INPUT.MIN_SIZE_TRAIN", "(80, 96)",
        "INPUT.MAX_SIZE_TRAIN", "128",
        "INPUT.CROP.SIZE", "(64, 64)",
        "INPUT.MIN_SIZE_TEST", "64",
        "INPUT.MAX_SIZE_TEST", "96",
        "SOLVER.IMS_PER_BATCH", "2",
        "SOLVER.WARMUP_ITERS", "1",
        "SOLVER.STEPS", "()",
        "DATALOADER.NUM_WORKERS", "0",
        "TEST.EVAL_PERIOD", "0",
        "OUTPUT_DIR", out,
    ]  # fmt: skip
    trained = run_train_net("--config-file", config, *opts, "SOLVER.MAX_ITER", "2")
    assert trained.returncode == 0, trained.stderr[-3000:]
    metrics = [json.loads(line) for line in open(os.path.join(out, "metrics.json"))]
    losses = [m for m in metrics if "total_loss" in m]
    assert losses and all(k in losses[-1] for k in ["loss_init_ce", "s2_loss_ce", "loss_aux_ce"])
    assert any("sem_seg/mIoU" in m for m in metrics)

    tta = ["TEST.AUG.ENABLED", "True", "TEST.AUG.MIN_SIZES", "(48,)", "TEST.AUG.MAX_SIZE", "128"]
    weights = os.path.join(out, "model_final.pth")
    evaluated = run_train_net(
        "--config-file", config, "--eval-only", *opts, *tta, "MODEL.WEIGHTS", weights
    )
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    log = evaluated.stdout + evaluated.stderr
    assert log.count("copypaste: mIoU,fwIoU,mACC,pACC") == 2  # plain and with TTA
    assert (Path(out) / "inference_TTA" / "sem_seg_predictions.json").is_file()


def test_process_of_an_external_launcher_stops_before_writing(tmp_path):
    """A launcher's environment that train_net.py cannot join (WORLD_SIZE > 1 without
    MASTER_ADDR): an error naming the variables and the command to use, and no output folder."""
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}
    out = tmp_path / "out"
    cmd = [
        sys.executable, str(REPO / "train_net.py"),
        "--config-file", "configs/toy/knet_R18_toy_panoptic.yaml", "OUTPUT_DIR", str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "WORLD_SIZE=2" in proc.stderr and "--num-gpus 2" in proc.stderr, proc.stderr[-2000:]
    assert "MASTER_ADDR is not set" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()
