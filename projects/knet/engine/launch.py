"""Multi-process training on GPUs (NCCL) and, for tests and CPU-only machines, on CPUs (gloo).

Detectron2 v0.6's ``launch`` requires CUDA (NCCL) and its ``create_ddp_model`` passes
``device_ids``, which ``DistributedDataParallel`` rejects for CPU modules; these two fall back to
gloo and CPU models, so that ``train_net.py --num-gpus N`` without a GPU runs N CPU processes
with exactly the code path of N GPUs.
"""

import logging
import os
import socket
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.engine import create_ddp_model as _d2_create_ddp_model
from detectron2.engine import launch as _d2_launch
from detectron2.engine.launch import DEFAULT_TIMEOUT
from detectron2.utils import comm


def create_ddp_model(model: torch.nn.Module, **kwargs: Any) -> torch.nn.Module:
    """Detectron2's ``create_ddp_model``, also for a model on the CPU (gloo)."""
    on_cpu = all(p.device.type == "cpu" for p in model.parameters())
    if comm.get_world_size() > 1 and on_cpu:
        kwargs.setdefault("device_ids", None)
    return _d2_create_ddp_model(model, **kwargs)


def _create_local_process_group(workers_per_machine: int) -> None:
    """The process group of this machine's workers, for ``comm.get_local_rank()`` and friends:
    Detectron2 v0.6 lacks ``comm.create_local_process_group`` (its launch sets the global)."""
    if hasattr(comm, "create_local_process_group"):
        comm.create_local_process_group(workers_per_machine)
        return
    machine_rank = dist.get_rank() // workers_per_machine
    for i in range(dist.get_world_size() // workers_per_machine):
        group = dist.new_group(list(range(i * workers_per_machine, (i + 1) * workers_per_machine)))
        if i == machine_rank:
            comm._LOCAL_PROCESS_GROUP = group


def _cpu_worker(
    local_rank: int,
    main_func: Callable,
    world_size: int,
    workers_per_machine: int,
    machine_rank: int,
    dist_url: str,
    args: Sequence[Any],
) -> None:
    rank = machine_rank * workers_per_machine + local_rank
    try:
        dist.init_process_group(
            "gloo", init_method=dist_url, world_size=world_size, rank=rank, timeout=DEFAULT_TIMEOUT
        )
    except Exception:
        logging.getLogger("knet").error("Process group URL: %s", dist_url)
        raise
    _create_local_process_group(workers_per_machine)
    comm.synchronize()
    try:
        main_func(*args)
    finally:
        dist.destroy_process_group()


class ExternalLauncherError(RuntimeError):
    """This process is one of several started by a launcher that :func:`launch` does not join."""


def _refuse_external_launcher() -> None:
    """Stop before anything is written when an external launcher (torchrun, torch elastic, a
    PyTorchJob: ``WORLD_SIZE`` > 1 in the environment) started this process: :func:`launch`
    starts its own processes, so each of the launcher's would train alone into one folder."""
    world_size = os.environ.get("WORLD_SIZE", "1")
    if world_size.strip() in ("", "0", "1"):
        return
    raise ExternalLauncherError(
        f"this process was started by a multi-process launcher (WORLD_SIZE={world_size}, "
        f"RANK={os.environ.get('RANK', '?')} in the environment, as torchrun sets them), but "
        "train_net.py starts its own processes and does not join the launcher's: each of them "
        "would train alone into the same output folder. Start one process instead: "
        f"python train_net.py --num-gpus {world_size} ... (or unset WORLD_SIZE)."
    )


def launch(
    main_func: Callable,
    num_gpus_per_machine: int,
    num_machines: int = 1,
    machine_rank: int = 0,
    dist_url: str | None = None,
    args: Sequence[Any] = (),
) -> None:
    """``detectron2.engine.launch`` with a CPU fallback: ``num_gpus_per_machine`` gloo processes.

    Args as for Detectron2's ``launch``; ``dist_url="auto"`` picks a free local port. Raises
    :class:`ExternalLauncherError` in a process that an external launcher started.
    """
    _refuse_external_launcher()
    world_size = num_machines * num_gpus_per_machine
    if torch.cuda.is_available() or world_size == 1:
        return _d2_launch(
            main_func, num_gpus_per_machine, num_machines, machine_rank, dist_url, args=args
        )
    if dist_url == "auto":
        if num_machines != 1:
            raise ValueError("dist_url='auto' works on one machine only; pass tcp://HOST:PORT")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))  # a free port (it may be taken again before use)
            dist_url = f"tcp://127.0.0.1:{sock.getsockname()[1]}"
    logging.getLogger("knet").info(
        "No GPU: starting %d CPU processes with a gloo process group", num_gpus_per_machine
    )
    mp.spawn(
        _cpu_worker,
        nprocs=num_gpus_per_machine,
        args=(main_func, world_size, num_gpus_per_machine, machine_rank, dist_url, tuple(args)),
        daemon=False,
    )
