"""SIGTERM / SIGINT during training write a checkpoint, then the run exits; --resume continues
it to the weights of an uninterrupted run."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from custom_data import make_coco_instances

from knet.engine.preemption import ClosableLoader, PreemptionCheckpointer, TrainingInterrupted

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs/custom/knet_R18_cpu_instance.yaml")  # SEED 42
TINY = [
    "MODEL.KNET.NUM_PROPOSALS", "4",
    "MODEL.KNET.NUM_STAGES", "1",
    "MODEL.KNET.STAGE_LOSS_WEIGHTS", "[1.0]",
    "INPUT.MIN_SIZE_TRAIN", "(64, 72)",
    "INPUT.MAX_SIZE_TRAIN", "96",
    "SOLVER.IMS_PER_BATCH", "2",
    # constant LR after a 2-iteration warm-up: the same schedule whatever MAX_ITER is
    "SOLVER.LR_SCHEDULER_NAME", "WarmupMultiStepLR",
    "SOLVER.STEPS", "()",
    "SOLVER.WARMUP_ITERS", "2",
    "SOLVER.CHECKPOINT_PERIOD", "100000",
    "DATALOADER.NUM_WORKERS", "1",  # a worker process, which gets the signal too
    "DATASETS.TEST", "()",
]  # fmt: skip


def _train(data, out: Path, max_iter: int, *extra: str) -> subprocess.Popen:
    json_file, images = data
    cmd = [sys.executable, str(REPO / "train_net.py"), "--config-file", CONFIG, *extra]
    cmd += ["--dataset", "my_dataset_train", "coco-instances", json_file, images]
    cmd += [*TINY, "SOLVER.MAX_ITER", str(max_iter), "OUTPUT_DIR", str(out)]
    return subprocess.Popen(
        cmd,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, as a batch job's
    )


def _finish(process: subprocess.Popen) -> str:
    log, _ = process.communicate(timeout=600)
    assert process.returncode == 0, log[-3000:]
    return log


@pytest.mark.slow
def test_sigterm_writes_a_checkpoint_and_resume_continues_exactly(tmp_path):
    data = make_coco_instances(tmp_path / "data", "train", [0, 1, 2, 3])
    reference = tmp_path / "uninterrupted"
    length = 40  # iterations: the preempted run must stop before the end, however fast it is
    _finish(_train(data, reference, length))

    # a long run, preempted the way schedulers do it: SIGTERM to the whole process group
    out = tmp_path / "preempted"
    process = _train(data, out, 100000)
    lines = []
    for line in process.stdout:
        lines.append(line)
        if "Starting training from iteration 0" in line:
            break
    time.sleep(0.5)
    assert process.poll() is None, "".join(lines)[-3000:]
    os.killpg(process.pid, signal.SIGTERM)
    log = "".join(lines) + process.communicate(timeout=300)[0]
    assert process.returncode == 128 + signal.SIGTERM, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    tag = (out / "last_checkpoint").read_text()
    iteration = int(tag[len("model_") : -len(".pth")])
    assert f"Received SIGTERM after iteration {iteration}: wrote" in log
    assert iteration < length - 1, "the run was not interrupted early enough for this test"
    checkpoint = torch.load(out / tag, weights_only=True)
    assert checkpoint["iteration"] == iteration
    assert "optimizer" in checkpoint["trainer"]["_trainer"]  # and the LR scheduler's state
    assert checkpoint["trainer"]["hooks"]["LRScheduler"]["last_epoch"] == iteration + 1

    log = _finish(_train(data, out, length, "--resume"))
    assert f"Starting training from iteration {iteration + 1}" in log
    final = torch.load(out / "model_final.pth", weights_only=True)["model"]
    final_ref = torch.load(reference / "model_final.pth", weights_only=True)["model"]
    assert final.keys() == final_ref.keys()
    assert all(torch.equal(final[k], final_ref[k]) for k in final)


class _Checkpointer:
    save_dir = "/nowhere"

    def __init__(self):
        self.saved = []

    def has_checkpoint(self):
        return False

    def save(self, name, **kwargs):
        self.saved.append((name, kwargs))


def test_closing_the_loader_shuts_its_worker_processes_down():
    before = set(multiprocessing.active_children())
    loader = ClosableLoader(torch.utils.data.DataLoader(range(100), batch_size=2, num_workers=1))
    iterator = iter(loader)
    assert next(iterator).tolist() == [0, 1]
    workers = set(multiprocessing.active_children()) - before
    assert workers and all(w.is_alive() for w in workers)
    loader.close()  # what the preemption hook does after training
    assert not any(w.is_alive() for w in workers)  # shut down, not left for the hook to kill
    with pytest.raises(StopIteration):
        next(iterator)


def test_sigint_is_taken_after_the_step_and_handlers_are_restored():
    checkpointer = _Checkpointer()
    hook = PreemptionCheckpointer(checkpointer)
    hook.trainer = SimpleNamespace(iter=7)
    previous = signal.getsignal(signal.SIGINT)
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    hook.before_train()
    try:
        hook.after_step()  # no signal yet: nothing happens
        assert checkpointer.saved == []
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C: no KeyboardInterrupt in the step
        deadline = time.time() + 5
        while not hook._received and time.time() < deadline:
            time.sleep(0.01)
        with pytest.raises(TrainingInterrupted) as e:
            hook.after_step()
    finally:
        hook.after_train()
    assert e.value.code == 128 + signal.SIGINT and e.value.iteration == 7
    assert checkpointer.saved == [("model_0000007", {"iteration": 7})]
    assert signal.getsignal(signal.SIGINT) is previous
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == mask


def _sigterm_handler_is_default() -> bool:
    return signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_pools_forked_between_steps_can_be_terminated():
    """The evaluation hooks run between steps: a process pool they fork (panopticapi's PQ) takes
    the SIGTERM of its shutdown, while the step itself keeps the signals blocked."""
    hook = PreemptionCheckpointer(_Checkpointer())
    hook.trainer = SimpleNamespace(iter=3)
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    hook.before_train()
    try:
        hook.before_step()
        assert signal.SIGTERM in signal.pthread_sigmask(signal.SIG_BLOCK, [])
        hook.after_step()
        assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == mask
        pool = multiprocessing.get_context("fork").Pool(1)
        assert pool.apply(abs, (-2,)) == 2
        # the child has the handler it had before training, so a SIGTERM ends it (whether the
        # pool's shutdown sentinel or its SIGTERM reaches the worker first)
        default_handler = pool.apply(_sigterm_handler_is_default)
        workers = list(pool._pool)
        closer = threading.Thread(target=pool.terminate, daemon=True)
        closer.start()
        closer.join(timeout=20)
        stuck = closer.is_alive()
        for worker in workers:  # never leave a stuck worker behind
            if worker.is_alive():
                worker.kill()
        assert not stuck, "terminating the pool waited on a worker that ignores SIGTERM"
        assert default_handler, "a process forked during training has the trainer's handler"
    finally:
        hook.after_train()
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == mask
