"""Multi-process training: Detectron2's launch, external launchers, and CPUs (gloo).

* Started by torchrun (torch elastic, a PyTorchJob) or SLURM's ``srun``, a process joins the
  launcher's group from its environment (:func:`launcher_world`) instead of spawning; a run the
  launcher restarts resumes (:func:`launcher_restart`).
* Started by hand, :func:`launch` spawns the processes as Detectron2's does (whose v0.6
  requires CUDA, and whose ``create_ddp_model`` passes ``device_ids``, which
  ``DistributedDataParallel`` rejects for CPU modules): NCCL on GPUs, gloo and CPU models
  without, so ``train_net.py --num-gpus N`` runs N CPU processes with the code path of N GPUs.
* When a process fails, the others stop within a minute naming it (:class:`_FailureWatch`); a
  group that cannot form names the variable to set (:func:`explain_network_error`).
"""

import contextlib
import dataclasses
import datetime
import functools
import logging
import os
import re
import socket
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.engine import create_ddp_model as _d2_create_ddp_model
from detectron2.engine.launch import DEFAULT_TIMEOUT
from detectron2.utils import comm

from ..modeling.batch_norm import share_cpu_batch_statistics


def create_ddp_model(model: torch.nn.Module, **kwargs: Any) -> torch.nn.Module:
    """Detectron2's ``create_ddp_model``, also for a model on the CPU (gloo): there the
    ``nn.SyncBatchNorm`` layers ("SyncBN"), which refuse CPU tensors, become
    ``GlobalBatchNorm2d`` layers (the same statistics, parameters and buffers)."""
    on_cpu = all(p.device.type == "cpu" for p in model.parameters())
    if comm.get_world_size() > 1 and on_cpu:
        kwargs.setdefault("device_ids", None)
        model = share_cpu_batch_statistics(model)
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


def _torchrun_store(world: "ProcessWorld") -> dist.Store:
    """torchrun's store (hosted by its agent, else by rank 0, as ``env://`` does) under a prefix
    per restart: the agent keeps one store across restarts, where the killed workers' addresses
    would be read by the new ones."""
    hosted_by_agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world.size,
        is_master=not hosted_by_agent and world.rank == 0, timeout=DEFAULT_TIMEOUT,
        multi_tenant=True,
    )  # fmt: skip
    return dist.PrefixStore(f"knet_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


HEARTBEAT_S, SILENCE_S = 2.0, 20.0  # a process whose heartbeats stop for 20 s has died


class ProcessGroupError(RuntimeError):
    """The processes could not form their group (the message names the variable to set)."""


def explain_network_error(error: Exception, world: "ProcessWorld", backend: str) -> str | None:
    """What to set when ``error`` kept this process from joining the group: a port in use, an
    unreachable master, a wrong interface (None for other errors)."""
    text, here = str(error), socket.gethostname()
    host, port = _master(world) or ("?", "?")
    port_name = "MASTER_PORT" + (" (by hand: --dist-url)" if world.source == "train_net.py" else "")
    ifname = "NCCL_SOCKET_IFNAME" if backend == "nccl" else "GLOO_SOCKET_IFNAME"
    if "EADDRINUSE" in text:
        return f"port {port} is in use on {here} (another run?): set {port_name} to a free port"
    if "trying to connect to" in text:  # (the store's client)
        return (
            f"{here} could not reach the master {host}:{port}: check MASTER_ADDR, {port_name}, "
            f"that rank 0 runs and that no firewall blocks the port ({text})"
        )
    if re.search("Unable to find address|socket interface|onnect timeout|connect: ", text):
        names = ", ".join(name for _, name in socket.if_nameindex())
        return (
            f"{ifname}={os.environ.get(ifname, '(not set)')} on {here}: set {ifname} to the "
            f"interface on which the machines reach each other (here: {names}) ({text})"
        )
    return None


def _master(world: "ProcessWorld") -> tuple[str, int] | None:
    """The host and port of the store the processes meet at (None for ``file://``)."""
    if world.init_method == "env://":
        return os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    url = urllib.parse.urlparse(world.init_method)
    return (url.hostname, url.port) if url.scheme == "tcp" else None


def _say(message: str) -> None:
    """Log an error, also on the console of a rank > 0 (whose log goes to a file only)."""
    logger = logging.getLogger("knet")
    logger.error(message)
    if not any(getattr(h, "stream", None) in (sys.stdout, sys.stderr) for h in logger.handlers):
        print(f"error: {message}", file=sys.stderr, flush=True)


class _FailureWatch:
    """A thread that stops this process, naming the failed rank and its host, when another fails.

    In the processes' store (a client of its own: the main thread's may be blocked), each
    registers "rank R on host H (pid P)", counts heartbeats and watches the next rank's (a ring).
    A process that raises publishes "... failed: <error>" (:meth:`fail`), one silent for
    ``SILENCE_S`` (killed, out of memory, machine down) is published by its watcher, a lost store
    names its holder; a watch reading a report logs it and exits the process (status 1), be it
    in a collective (gloo raises on a dead peer, NCCL may hang), an evaluation or idle. The
    collectives keep their 30-minute timeout: a long evaluation is no failure. Backend-agnostic.
    """

    def __init__(self, world: "ProcessWorld", host: str, port: int):
        self.rank, self.size, self._closed, self._last = world.rank, world.size, False, None
        self.me = f"rank {world.rank} on host {socket.gethostname()} (pid {os.getpid()})"
        timeout = datetime.timedelta(seconds=SILENCE_S)
        client = dist.TCPStore(host, port, is_master=False, timeout=timeout)
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        self.store = dist.PrefixStore(f"knet_watch_{restart}", client)
        self.store.set(f"who/{self.rank}", self.me)
        self._lock = threading.Lock()
        threading.Thread(target=self._watch, args=(f"{host}:{port}",), daemon=True).start()

    def _watch(self, store_at: str) -> None:
        agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        holder = f"torchrun's agent at {store_at}" if agent else self._who(0)
        while True:
            time.sleep(HEARTBEAT_S)
            with self._lock:
                if self._closed:
                    return
                try:
                    report = self._beat()
                except Exception as e:  # the store's holder is gone
                    report = f"{holder} failed or exited: lost the store at {store_at} ({e})"
                if report:
                    _say(f"{report}; stopping {self.me}")
                    self._depart(3 * HEARTBEAT_S)
                    logging.shutdown()
                    os._exit(1)

    def _who(self, rank: int) -> str:
        with contextlib.suppress(Exception):
            return self.store.get(f"who/{rank}").decode()
        return f"rank {rank}"

    def _beat(self) -> str | None:
        """Count a heartbeat; return the failure report published, if any."""
        self.store.add(f"beat/{self.rank}", 1)
        if self.store.check(["failed"]):
            return self.store.get("failed").decode()
        ring = [(self.rank + i) % self.size for i in range(1, self.size)]
        watched = next((r for r in ring if not self.store.check([f"left/{r}"])), None)
        if watched is None:
            return None
        count, now = self.store.add(f"beat/{watched}", 0), time.monotonic()
        if self._last is None or self._last[:2] != (watched, count):
            self._last = (watched, count, now)
        elif now - self._last[2] > SILENCE_S:
            silent = f"no heartbeat for {SILENCE_S:.0f} s (killed? out of memory? machine down?)"
            report = f"{self._who(watched)} failed: {silent}"
            return self.store.compare_set("failed", "", report).decode()
        return None

    def _depart(self, wait: float) -> None:
        """Mark this process gone; rank 0 (may hold the store) waits up to ``wait`` s for all."""
        deadline = time.monotonic() + wait
        with contextlib.suppress(Exception):
            self.store.set(f"left/{self.rank}", "")
            self.store.add("left", 1)
            while self.rank == 0 and self.store.add("left", 0) < self.size:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.1)

    def fail(self, error: Exception) -> None:
        """Publish this process's failure, unless ``error`` is a collective broken by another
        process: this process's watch then names that one, and exits, meanwhile."""
        if isinstance(error, dist.DistError) or re.search("gloo|NCCL", str(error)):
            time.sleep(SILENCE_S + 3 * HEARTBEAT_S)
        with self._lock:
            self._closed = True
            report = f"{self.me} failed: {type(error).__name__}: {error}"
            _say(report)
            with contextlib.suppress(Exception):
                self.store.compare_set("failed", "", report)
            self._depart(3 * HEARTBEAT_S)

    def close(self) -> None:
        """The end without failure: rank 0 waits (``SILENCE_S`` at most: one of the others may
        wait for it in a collective) for the others to end, its watch running."""
        if not self._closed:
            self._depart(SILENCE_S)
            with self._lock:
                self._closed = True


def _run_in_group(main_func: Callable, args: Sequence[Any], world: "ProcessWorld") -> None:
    """Join the process group of ``world``, run ``main_func(*args)``, leave the group."""
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(world.local_rank)
    try:
        if world.init_method == "env://":
            where = {"store": _torchrun_store(world)}
        else:
            where = {"init_method": world.init_method}
        dist.init_process_group(
            backend, **where, world_size=world.size, rank=world.rank, timeout=DEFAULT_TIMEOUT
        )
        _create_local_process_group(world.local_size)
        comm.synchronize()  # (NCCL connects here)
    except Exception as e:
        logging.getLogger("knet").error("Process group (%s): %s", world.source, world.init_method)
        explained = explain_network_error(e, world, backend)
        if explained:
            raise ProcessGroupError(explained) from e
        raise
    watch = _FailureWatch(world, *_master(world)) if _master(world) else None
    try:
        main_func(*args)
    except Exception as e:
        if watch:
            watch.fail(e)
        raise
    finally:
        if watch:
            watch.close()
        dist.destroy_process_group()


def _worker(local_rank: int, main_func: Callable, world: "ProcessWorld", args) -> None:
    rank = world.rank + local_rank  # world.rank: the rank of this machine's first process
    _run_in_group(main_func, args, dataclasses.replace(world, rank=rank, local_rank=local_rank))


class ExternalLauncherError(RuntimeError):
    """The environment of an external launcher is incomplete, or disagrees with the command line."""


@dataclasses.dataclass(frozen=True)
class ProcessWorld:
    """This process's place among the training processes: where a launcher put it."""

    source: str  # "torchrun" (torch elastic, a PyTorchJob), "SLURM" or "train_net.py"
    rank: int
    size: int
    local_rank: int
    local_size: int  # processes on this machine
    init_method: str  # "env://" or "tcp://HOST:PORT"


def _tasks_on_node(tasks_per_node: str, node_id: int) -> int:
    """This node's entry of SLURM's ``SLURM_TASKS_PER_NODE`` ("2(x3),1": 2, 2, 2, 1)."""
    counts = []
    for part in tasks_per_node.split(","):
        count, _, repeat = part.partition("(x")
        counts += [int(count)] * int(repeat.rstrip(")") or 1)
    return counts[node_id]


def _first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: "gpu[03-05,09],cpu1" -> "gpu03"."""
    prefix, ranges = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip()).groups()
    return prefix + re.split(r"[-,]", ranges)[0] if ranges else prefix


def job_port(job_id: str) -> int:
    """The master's port of a SLURM job: 15000 + the job id modulo 20000, the same in every task
    and different for jobs submitted one after another."""
    return 15000 + int(job_id.split("_")[0]) % 20000


def launcher_world(environ: Mapping[str, str] = os.environ) -> ProcessWorld | None:
    """The world an external launcher started this process in, from its environment; None
    when none did (one process, or ``train_net.py`` spawns the others).

    * torchrun / torch elastic / a PyTorchJob: ``WORLD_SIZE`` > 1 with ``RANK``, ``LOCAL_RANK``,
      ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` (joined by ``env://``);
    * ``srun`` under SLURM: ``SLURM_NTASKS`` > 1 with ``SLURM_PROCID``, ``SLURM_LOCALID``,
      ``SLURM_NTASKS_PER_NODE`` (else ``SLURM_TASKS_PER_NODE`` and ``SLURM_NODEID``) and the
      first host of ``SLURM_JOB_NODELIST`` as master; the port is ``MASTER_PORT``, else
      15000 + the job id modulo 20000 (one per job, the same in every task).
    """

    def need(name: str, source: str, size_name: str) -> str:
        if not environ.get(name, "").strip():
            raise ExternalLauncherError(
                f"{source} started this process ({size_name}={environ[size_name]} in the "
                f"environment) but {name} is not set: it would train alone into the shared "
                f"output folder. Start it with {source}, which sets {name}, or start one "
                f"process: python train_net.py --num-gpus {environ[size_name]} ..."
            )
        return environ[name].strip()

    if int(environ.get("WORLD_SIZE", "1").strip() or 1) > 1:
        torchrun = functools.partial(need, source="torchrun", size_name="WORLD_SIZE")
        torchrun("MASTER_ADDR"), torchrun("MASTER_PORT")
        return ProcessWorld(
            "torchrun", int(torchrun("RANK")), int(environ["WORLD_SIZE"]),
            int(environ.get("LOCAL_RANK", 0)), int(environ.get("LOCAL_WORLD_SIZE", 1)), "env://",
        )  # fmt: skip
    if int(environ.get("SLURM_NTASKS", "1").strip() or 1) > 1 and "SLURM_PROCID" in environ:
        slurm = functools.partial(need, source="SLURM", size_name="SLURM_NTASKS")
        if environ.get("SLURM_NTASKS_PER_NODE"):
            local_size = int(environ["SLURM_NTASKS_PER_NODE"])
        else:
            tasks = slurm("SLURM_TASKS_PER_NODE")
            local_size = _tasks_on_node(tasks, int(environ.get("SLURM_NODEID", 0)))
        host = _first_host(slurm("SLURM_JOB_NODELIST"))
        port = environ.get("MASTER_PORT") or job_port(environ.get("SLURM_JOB_ID", "0"))
        return ProcessWorld(
            "SLURM", int(environ["SLURM_PROCID"]), int(environ["SLURM_NTASKS"]),
            int(slurm("SLURM_LOCALID")), local_size, f"tcp://{host}:{port}",
        )  # fmt: skip
    return None


def launcher_restart(environ: Mapping[str, str] = os.environ) -> str | None:
    """ "NAME=N" when a launcher restarted this run (torchrun's ``--max-restarts``, a requeued
    SLURM job), so that it resumes from its last checkpoint without ``--resume``; else None."""
    for name in ("TORCHELASTIC_RESTART_COUNT", "SLURM_RESTART_COUNT"):
        if int(environ.get(name, "0").strip() or 0) > 0:
            return f"{name}={environ[name].strip()}"
    return None


def _join_launcher(world: ProcessWorld, num_gpus: int, num_machines: int) -> None:
    """Refuse a ``--num-gpus`` / ``--num-machines`` given on the command line (anything but the
    default 1 x 1) that disagrees with the launcher's numbers."""
    machines = world.size // world.local_size
    if (num_gpus, num_machines) not in ((1, 1), (world.local_size, machines)):
        raise ExternalLauncherError(
            f"--num-gpus {num_gpus} --num-machines {num_machines} (command line) disagree with "
            f"{world.source}'s {world.local_size} processes per machine x {machines} machines "
            "(environment); leave both out under a launcher, or make them agree"
        )
    logging.getLogger("knet").info(
        "Joining the %d processes started by %s: rank %d (local rank %d of %d)",
        world.size, world.source, world.rank, world.local_rank, world.local_size,
    )  # fmt: skip


def fit_threads_to_cores(cfg) -> None:
    """On the CPU, give each of this machine's processes an equal share of the cores, less its
    loader workers, so that threads x processes + workers do not oversubscribe them (two
    processes with PyTorch's default threads ran 4-5x slower on a busy 2-core machine).

    One process keeps PyTorch's default; ``OMP_NUM_THREADS`` in the environment overrides the
    choice. The layout is logged either way.
    """
    if cfg.MODEL.DEVICE != "cpu":
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    processes, workers = comm.get_local_size(), cfg.DATALOADER.NUM_WORKERS
    if os.environ.get("OMP_NUM_THREADS"):
        reason = "OMP_NUM_THREADS"
    elif processes > 1:
        torch.set_num_threads(max(1, cores // processes - workers))
        reason = "cores / processes - loader workers; set OMP_NUM_THREADS to override"
    else:
        reason = "PyTorch's default for one process"
    logging.getLogger("knet").info(
        "CPU layout: %d process(es) x %d torch threads + %d loader workers each, on %d cores (%s)",
        processes, torch.get_num_threads(), workers, cores, reason,
    )  # fmt: skip


def launch(
    main_func: Callable,
    num_gpus_per_machine: int,
    num_machines: int = 1,
    machine_rank: int = 0,
    dist_url: str | None = None,
    args: Sequence[Any] = (),
) -> None:
    """``detectron2.engine.launch`` that also joins an external launcher's processes, falls
    back to gloo CPU processes without a GPU, and stops every process when one fails.

    Started by torchrun or ``srun`` (:func:`launcher_world`), this process joins their group
    (NCCL on GPUs, gloo on CPUs) and runs ``main_func`` itself; otherwise it spawns
    ``num_gpus_per_machine`` processes as Detectron2 does. Args as for Detectron2's
    ``launch``; ``dist_url="auto"`` picks a free local port. Raises
    :class:`ExternalLauncherError` for an incomplete launcher environment or a command line
    that disagrees with it, :class:`ProcessGroupError` for a group that cannot form.
    """
    world = launcher_world()
    if world is not None:
        _join_launcher(world, num_gpus_per_machine, num_machines)
        return _run_in_group(main_func, args, world)
    world_size = num_machines * num_gpus_per_machine
    if world_size == 1:
        return main_func(*args)
    if dist_url == "auto":
        if num_machines != 1:
            raise ValueError("dist_url='auto' works on one machine only; pass tcp://HOST:PORT")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))  # a free port (it may be taken again before use)
            dist_url = f"tcp://127.0.0.1:{sock.getsockname()[1]}"
    logging.getLogger("knet").info(
        "Starting %d processes (%s)", num_gpus_per_machine,
        "NCCL" if torch.cuda.is_available() else "no GPU: CPU processes with gloo",
    )  # fmt: skip
    first_rank = machine_rank * num_gpus_per_machine
    world = ProcessWorld("train_net.py", first_rank, world_size, 0, num_gpus_per_machine, dist_url)
    mp.spawn(_worker, nprocs=num_gpus_per_machine, args=(main_func, world, tuple(args)))
