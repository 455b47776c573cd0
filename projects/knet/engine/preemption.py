"""Preemption: on SIGTERM (clusters preempting a job) or SIGINT (Ctrl-C) during training, write a
checkpoint, then exit.

With :class:`PreemptionCheckpointer` among the trainer's hooks (``KNetTrainer`` adds it), such a
signal lets the current iteration finish, then its checkpoint is written like the periodic ones
(``model_<iteration>.pth``) and the process exits with status ``128 + signal number`` (143 for
SIGTERM, 130 for SIGINT). The same command with ``--resume`` continues from the next iteration,
with ``SEED >= 0`` exactly as the uninterrupted run would have (``knet.engine.seeded_loader``).

In a multi-process run every process stops after the same iteration (each step ends with an
all-reduce of "a signal arrived"), so one process receiving the signal is enough; ``train_net.py``
forwards one that its launching process receives to the workers
(:func:`forward_signals_to_workers`). Data-loader workers started during training inherit the
handler, so a signal sent to the whole process group (as schedulers do) does not kill them before
the checkpoint is written; a training loader wrapped in :class:`ClosableLoader` has them shut
down when training ends.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import threading
import weakref
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from detectron2.engine import HookBase
from detectron2.utils import comm

logger = logging.getLogger(__name__)

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def interrupted_exit_code(signum: int) -> int:
    """The shell's exit status of a process ended by signal ``signum``."""
    return 128 + int(signum)


class ClosableLoader:
    """An iterable over ``loader`` whose :meth:`close` stops the iterators it has handed out.

    A closed iterator drops the torch ``DataLoader`` iterator it was reading, whose workers
    (which have the signals blocked, so would not take a SIGTERM) PyTorch then shuts down.
    """

    def __init__(self, loader: Iterable[Any]):
        self.loader = loader
        self._iterators: weakref.WeakSet = weakref.WeakSet()

    def __iter__(self) -> Iterator[Any]:
        iterator = self._iterate()
        self._iterators.add(iterator)
        return iterator

    def _iterate(self) -> Iterator[Any]:
        yield from self.loader

    def close(self) -> None:
        for iterator in list(self._iterators):
            iterator.close()


class TrainingInterrupted(SystemExit):
    """Raised after the checkpoint of a signalled run is written; exits with 128 + signum. A
    ``SystemExit``: Detectron2's training loop does not log it as a failure, and the hooks'
    ``after_train`` still run (writers are flushed; no final evaluation, no ``model_final``)."""

    def __init__(self, signum: int, iteration: int):
        super().__init__(interrupted_exit_code(signum))
        self.signum = signum
        self.iteration = iteration


# the handlers a running PreemptionCheckpointer replaced: {signal: previous handler}
_REPLACED_HANDLERS: dict[int, Any] = {}


def _restore_handlers_in_child() -> None:
    """In a process forked during training, give the signals back their former handlers: a
    child with the trainer's handler would note a SIGTERM and go on, so that a process pool
    forked by an evaluation hook (panopticapi's PQ pool, which its finalizer terminates) would
    never end."""
    for signum, previous in _REPLACED_HANDLERS.items():
        with contextlib.suppress(ValueError, OSError):
            signal.signal(signum, previous)


os.register_at_fork(after_in_child=_restore_handlers_in_child)


class PreemptionCheckpointer(HookBase):
    """Write a checkpoint and stop when SIGTERM / SIGINT arrive during training (module doc). Put
    it after the LR scheduler hook (the checkpoint then holds the scheduler state after the step,
    as the periodic ones do) and before evaluation hooks.

    A signal handler notes the signal. During each step the signals are also blocked in the
    training thread and taken by a helper thread (``sigtimedwait``), so that processes forked in
    the step (data-loader workers, which PyTorch lets die on a SIGTERM from anyone but their
    parent) inherit them blocked and survive a signal sent to the whole process group; between
    steps they are unblocked, so that process pools forked there (PQ evaluation) can be ended.
    """

    def __init__(self, checkpointer, signals: Sequence[int] = PREEMPTION_SIGNALS):
        """``checkpointer``: the trainer's (its checkpointables hold the trainer); only the main
        process writes."""
        self.checkpointer = checkpointer
        self.signals = tuple(signals)
        self._received = 0
        self._previous: dict[int, object] = {}
        self._old_mask = None
        self._children: set = set()  # processes running before training
        self._waiter: threading.Thread | None = None
        self._stop = threading.Event()
        self._flag = None

    def _handle(self, signum: int, frame) -> None:
        if not self._received:
            self._received = signum

    def _wait(self) -> None:
        while not self._stop.is_set():
            info = signal.sigtimedwait(self.signals, 0.2)
            if info is not None:
                self._handle(info.si_signo, None)

    def before_train(self) -> None:
        self._received = 0
        if threading.current_thread() is not threading.main_thread():
            logger.info("Training outside the main thread: SIGTERM / SIGINT are not handled")
            return
        # threads started earlier (e.g. event writers) may take the signal: they run _handle
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._handle)
        _REPLACED_HANDLERS.update(self._previous)
        if hasattr(signal, "pthread_sigmask") and hasattr(signal, "sigtimedwait"):
            self._children = set(multiprocessing.active_children())
            self._old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, self.signals)
            self._stop.clear()
            self._waiter = threading.Thread(target=self._wait, name="knet-signals", daemon=True)
            self._waiter.start()
        if comm.get_world_size() > 1:
            device = "cpu"
            if dist.get_backend() == "nccl":
                device = torch.device("cuda", torch.cuda.current_device())
            self._flag = torch.zeros(1, dtype=torch.int64, device=device)

    def after_train(self) -> None:
        if self._waiter is not None:
            # the training data loader's workers have the signals blocked: stop them now, as
            # multiprocessing's exit would wait for them after a SIGTERM they never take
            self._stop_train_loader()
            self._stop.set()
            self._waiter.join()
            self._waiter = None
            signal.pthread_sigmask(signal.SIG_SETMASK, self._old_mask)
        for s, previous in self._previous.items():
            signal.signal(s, previous)
        self._previous.clear()
        _REPLACED_HANDLERS.clear()

    def _stop_train_loader(self) -> None:
        """Shut the training data loader's workers down (training is over)."""
        started = set(multiprocessing.active_children()) - self._children
        loader = getattr(self.trainer, "data_loader", None)
        if isinstance(loader, ClosableLoader):
            loader.close()
        for child in started:  # worker processes forked during training, still running
            if child.daemon and child.is_alive():
                child.join(timeout=5)
            if child.daemon and child.is_alive():
                child.kill()
                child.join(timeout=5)

    def _signal_received(self) -> int:
        """The signal received by any process (0: none); collective in multi-process runs."""
        if self._flag is None:
            return self._received
        self._flag.fill_(self._received)
        dist.all_reduce(self._flag, op=dist.ReduceOp.MAX)
        return int(self._flag.item())

    def before_step(self) -> None:
        if self._waiter is not None:
            signal.pthread_sigmask(signal.SIG_BLOCK, self.signals)

    def after_step(self) -> None:
        signum = self._signal_received()
        if not signum:
            if self._waiter is not None:
                signal.pthread_sigmask(signal.SIG_SETMASK, self._old_mask)
            return
        iteration = self.trainer.iter
        name = f"model_{iteration:07d}"
        if comm.is_main_process():
            tagged = self.checkpointer.has_checkpoint() and self.checkpointer.get_checkpoint_file()
            if not (tagged and os.path.basename(tagged) == name + ".pth"):
                self.checkpointer.save(name, iteration=iteration)
            logger.warning(
                "Received %s after iteration %d: wrote %s; run the same command with --resume "
                "to continue from iteration %d.",
                signal.Signals(signum).name,
                iteration,
                os.path.join(self.checkpointer.save_dir, name + ".pth"),
                iteration + 1,
            )
        comm.synchronize()
        raise TrainingInterrupted(signum, iteration)


@contextlib.contextmanager
def forward_signals_to_workers(
    signals: Sequence[int] = PREEMPTION_SIGNALS,
) -> Iterator[list[int]]:
    """In a process that launches training workers (``multiprocessing``), pass the signals it
    receives on to them; yields the list of signals received."""
    received: list[int] = []

    def forward(signum: int, frame) -> None:
        received.append(signum)
        for child in multiprocessing.active_children():
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signum)

    previous = {s: signal.signal(s, forward) for s in signals}
    try:
        yield received
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
