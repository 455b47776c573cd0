"""Resuming a training run: the same batches, optimizer state and losses as without interruption."""

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from knet.checkpoint import CorruptCheckpointError, KNetCheckpointer
from knet.engine.seeded_loader import iteration_seed, seeded_batches

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs/toy/knet_R18_toy_panoptic.yaml")  # SEED 7
TINY = [
    "MODEL.KNET.NUM_PROPOSALS", "4",
    "MODEL.KNET.NUM_STAGES", "1",
    "MODEL.KNET.STAGE_LOSS_WEIGHTS", "[1.0]",
    "INPUT.MIN_SIZE_TRAIN", "(96, 112)",
    "INPUT.MAX_SIZE_TRAIN", "128",
    "SOLVER.IMS_PER_BATCH", "2",
    "SOLVER.WARMUP_ITERS", "8",  # the LR still changes when the runs are interrupted
    "SOLVER.STEPS", "()",
    "SOLVER.MAX_ITER", "20",
    "SOLVER.CHECKPOINT_PERIOD", "5",
    "DATALOADER.NUM_WORKERS", "1",
    "DATASETS.TEST", "()",
]  # fmt: skip

# train_net.py, killed with SIGKILL halfway through writing the checkpoint named in argv[1]
KILL_DURING_SAVE = """
import os, runpy, signal, sys, torch
target, sys.argv, real_save = sys.argv[1], sys.argv[2:], torch.save
def save(obj, f, *args, **kwargs):
    if target in getattr(f, "name", str(f)):
        f.write(b"PK\\x03\\x04 half a checkpoint"); f.flush(); os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, f, *args, **kwargs)
torch.save = save
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _train(out: Path, *extra: str, prefix=()) -> subprocess.Popen:
    """Start a run whose console goes to a file: the tests poll the run while it goes on, and
    an unread pipe would block it once the configuration dump fills the pipe's buffer."""
    cmd = [sys.executable, *prefix, str(REPO / "train_net.py"), "--config-file", CONFIG, *extra]
    cmd += [*TINY, "OUTPUT_DIR", str(out)]
    out.mkdir(parents=True, exist_ok=True)
    console = open(out.parent / f"{out.name}.{len(list(out.parent.glob('*.log')))}.log", "w")
    process = subprocess.Popen(cmd, cwd=REPO, stdout=console, stderr=subprocess.STDOUT)
    process.console = Path(console.name)
    console.close()  # the child holds its own descriptor
    return process


def _finish(process: subprocess.Popen) -> str:
    process.wait(timeout=600)
    log = process.console.read_text()
    assert process.returncode == 0, log[-3000:]
    return log


def _losses(out: Path) -> dict:
    """iteration -> logged values; a resumed run's entries replace the killed run's."""
    entries = [json.loads(line) for line in open(out / "metrics.json")]
    return {m["iteration"]: m for m in entries if "total_loss" in m}


def _assert_same_run(resumed: Path, reference: Path) -> None:
    got, expected = _losses(resumed), _losses(reference)
    assert got.keys() == expected.keys() and got
    for it in expected:
        for key in ("total_loss", "loss_rpn_seg", "s0_loss_cls", "lr"):
            assert got[it][key] == expected[it][key], (it, key)
    final = torch.load(resumed / "model_final.pth", weights_only=True)["model"]
    final_ref = torch.load(reference / "model_final.pth", weights_only=True)["model"]
    assert final.keys() == final_ref.keys()
    assert all(torch.equal(final[k], final_ref[k]) for k in final)


@pytest.mark.slow
def test_killed_runs_resume_to_the_uninterrupted_losses_and_weights(tmp_path, toy_root):
    reference = tmp_path / "uninterrupted"
    _finish(_train(reference))

    # 1. SIGKILL right after the iteration-9 checkpoint is tagged (the run goes on meanwhile)
    killed = tmp_path / "killed_after_checkpoint"
    process = _train(killed)
    tag = killed / "last_checkpoint"
    while not (tag.is_file() and tag.read_text() == "model_0000009.pth"):
        assert process.poll() is None, "the run ended before it was killed"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    log = _finish(_train(killed, "--resume"))
    assert "Starting training from iteration" in log
    _assert_same_run(killed, reference)

    # 2. SIGKILL while the iteration-14 checkpoint is written: the tag still names iteration 9;
    #    that file is then damaged too, so resuming falls back to iteration 4 with a warning
    crashed = tmp_path / "killed_during_save"
    process = _train(crashed, prefix=("-c", KILL_DURING_SAVE, "model_0000014"))
    process.wait(timeout=600)
    assert process.returncode == -signal.SIGKILL
    assert (crashed / "last_checkpoint").read_text() == "model_0000009.pth"
    assert not (crashed / "model_0000014.pth").exists()  # only a temporary file was written
    (crashed / "model_0000009.pth").write_bytes(b"truncated")
    log = _finish(_train(crashed, "--resume"))
    assert "Cannot resume from" in log and "model_0000009.pth" in log
    assert "Starting training from iteration 5" in log
    _assert_same_run(crashed, reference)


def test_batches_are_a_function_of_seed_and_iteration():
    orientations = [i % 3 == 0 for i in range(23)]
    stream = seeded_batches(orientations, batch_size=4, seed=3)
    first = [next(stream) for _ in range(30)]
    resumed = seeded_batches(orientations, batch_size=4, seed=3, start_iter=17)
    assert [next(resumed) for _ in range(13)] == first[17:]
    # every batch has one orientation, and each epoch visits every record once per bucket
    assert all(len({orientations[i] for i in batch}) == 1 for batch in first)
    assert first != [next(seeded_batches(orientations, 4, seed=4)) for _ in range(30)]
    assert len({iteration_seed(3, it, slot) for it in range(50) for slot in range(-1, 8)}) == 450


def test_checkpoints_are_atomic_and_resume_falls_back(tmp_path, caplog):
    model = torch.nn.Linear(3, 2)
    checkpointer = KNetCheckpointer(model, save_dir=str(tmp_path))
    checkpointer.save("model_0000001")
    time.sleep(0.01)  # distinct modification times
    with torch.no_grad():
        model.weight.fill_(2.0)
    checkpointer.save("model_0000002")
    assert sorted(os.listdir(tmp_path)) == [
        "last_checkpoint",
        "model_0000001.pth",
        "model_0000002.pth",
    ]
    (tmp_path / "model_0000002.pth").write_bytes(b"")
    restored = torch.nn.Linear(3, 2)
    KNetCheckpointer(restored, save_dir=str(tmp_path)).resume_or_load("", resume=True)
    assert not torch.equal(restored.weight, torch.full((2, 3), 2.0))  # the older checkpoint
    assert "Cannot resume from" in caplog.text and "model_0000002.pth" in caplog.text
    (tmp_path / "model_0000001.pth").write_bytes(b"garbage")
    with pytest.raises(CorruptCheckpointError, match="No readable checkpoint"):
        KNetCheckpointer(restored, save_dir=str(tmp_path)).resume_or_load("", resume=True)


def test_resume_falls_back_by_iteration_not_file_time(tmp_path, caplog):
    """After a copy that resets file times (``cp -r``), the fallback still takes the readable
    checkpoint of the highest iteration and names the one it skipped."""
    model = torch.nn.Linear(3, 2)
    checkpointer = KNetCheckpointer(model, save_dir=str(tmp_path))
    for iteration in (3, 11, 12):
        with torch.no_grad():
            model.weight.fill_(iteration)
        checkpointer.save(f"model_{iteration:07d}", iteration=iteration)
    (tmp_path / "model_0000012.pth").write_bytes(b"")  # the tagged one, unreadable
    now = time.time()
    os.utime(tmp_path / "model_0000003.pth", (now + 60, now + 60))  # newest by time
    restored = torch.nn.Linear(3, 2)
    resumed = KNetCheckpointer(restored, save_dir=str(tmp_path)).resume_or_load("", resume=True)
    assert resumed["iteration"] == 11
    assert torch.equal(restored.weight, torch.full((2, 3), 11.0))
    assert "skipped model_0000012.pth" in caplog.text


def test_failed_and_killed_writes_leave_no_temporary_file(tmp_path, monkeypatch, caplog):
    model = torch.nn.Linear(3, 2)
    checkpointer = KNetCheckpointer(model, save_dir=str(tmp_path))

    def disk_full(obj, f):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        checkpointer.save("model_0000001")
    assert os.listdir(tmp_path) == []
    monkeypatch.undo()
    # a write killed with its process: removed (and logged) at the next start
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    (tmp_path / f"model_0000007.pth.tmp{dead}").write_bytes(b"x" * 1000)
    live = tmp_path / f"model_0000008.pth.tmp{os.getpid()}"  # a write still running: kept
    live.write_bytes(b"x")
    with caplog.at_level(logging.INFO, logger="knet"):
        KNetCheckpointer(model, save_dir=str(tmp_path)).resume_or_load("", resume=True)
    assert sorted(os.listdir(tmp_path)) == [live.name]
    assert f"model_0000007.pth.tmp{dead}" in caplog.text and "killed" in caplog.text
