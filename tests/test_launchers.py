"""train_net.py under external launchers: torchrun and SLURM's srun environment join one process
group; the launchers' environments are read and checked."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from knet.engine.launch import (
    ExternalLauncherError,
    ProcessWorld,
    _join_launcher,
    fit_threads_to_cores,
    launcher_restart,
    launcher_world,
)

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = {
    "WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
    "MASTER_ADDR": "10.0.0.5", "MASTER_PORT": "29500",
}  # fmt: skip
SRUN = {
    "SLURM_NTASKS": "5", "SLURM_PROCID": "4", "SLURM_LOCALID": "0", "SLURM_NODEID": "2",
    "SLURM_TASKS_PER_NODE": "2(x2),1", "SLURM_JOB_NODELIST": "gpu[07-09,12],cpu1",
    "SLURM_JOB_ID": "123456",
}  # fmt: skip


def test_torchrun_environment():
    assert launcher_world(TORCHRUN) == ProcessWorld("torchrun", 3, 4, 1, 2, "env://")


def test_srun_environment():
    """Tasks per node from SLURM's compressed list, the master from the first host, the port
    from the job id (the same in every task)."""
    assert launcher_world(SRUN) == ProcessWorld("SLURM", 4, 5, 0, 1, "tcp://gpu07:18456")
    with_port = {**SRUN, "SLURM_NTASKS_PER_NODE": "2", "MASTER_PORT": "4000"}
    assert launcher_world(with_port) == ProcessWorld("SLURM", 4, 5, 0, 2, "tcp://gpu07:4000")


def test_no_launcher_or_one_process():
    assert launcher_world({}) is None
    assert launcher_world({"WORLD_SIZE": "1", "RANK": "0"}) is None
    assert launcher_world({"SLURM_NTASKS": "1", "SLURM_PROCID": "0"}) is None


@pytest.mark.parametrize(
    "environ, missing",
    [
        ({**TORCHRUN, "MASTER_ADDR": ""}, "MASTER_ADDR"),
        ({k: v for k, v in TORCHRUN.items() if k != "RANK"}, "RANK"),
        ({k: v for k, v in SRUN.items() if k != "SLURM_JOB_NODELIST"}, "SLURM_JOB_NODELIST"),
    ],
)
def test_incomplete_launcher_environment_names_the_variable(environ, missing):
    with pytest.raises(ExternalLauncherError, match=f"but {missing} is not set"):
        launcher_world(environ)


def test_command_line_that_disagrees_with_the_launcher_is_refused():
    world = launcher_world(TORCHRUN)
    _join_launcher(world, 1, 1)  # the defaults: the launcher decides
    _join_launcher(world, 2, 2)  # the same numbers
    with pytest.raises(ExternalLauncherError, match=r"--num-gpus 4 .* 2 processes per machine"):
        _join_launcher(world, 4, 1)


@pytest.mark.parametrize(
    "processes, workers, omp, threads",
    [(2, 0, "", 4), (2, 2, "", 2), (8, 4, "", 1), (1, 4, "", None), (2, 0, "3", None)],
)
def test_cpu_threads_share_the_cores(monkeypatch, processes, workers, omp, threads):
    """8 cores: processes x threads + workers fit them; one process or OMP_NUM_THREADS: as is."""
    from detectron2.config import get_cfg
    from detectron2.utils import comm

    cfg = get_cfg()
    cfg.MODEL.DEVICE, cfg.DATALOADER.NUM_WORKERS = "cpu", workers
    monkeypatch.setattr(comm, "get_local_size", lambda: processes)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.setenv("OMP_NUM_THREADS", omp)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(5)
        fit_threads_to_cores(cfg)
        assert torch.get_num_threads() == (threads or 5)
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------- whole runs (2 CPU processes)
TRAIN = [
    "--config-file", "configs/toy/knet_R18_toy_panoptic.yaml",
    "MODEL.KNET.NUM_PROPOSALS", "4", "MODEL.KNET.NUM_STAGES", "1",
    "MODEL.KNET.STAGE_LOSS_WEIGHTS", "[1.0]", "INPUT.MIN_SIZE_TRAIN", "(96, 96)",
    "INPUT.MAX_SIZE_TRAIN", "128", "SOLVER.IMS_PER_BATCH", "4", "SOLVER.MAX_ITER", "6",
    "SOLVER.WARMUP_ITERS", "1", "SOLVER.STEPS", "()", "SOLVER.CHECKPOINT_PERIOD", "2",
    "DATALOADER.NUM_WORKERS", "0", "DATASETS.TEST", "()", "TEST.EVAL_PERIOD", "0",
]  # fmt: skip
LAUNCHER_VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _clean_environ(**extra: str) -> dict:
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCHELASTIC"))}
    keep = {k: v for k, v in keep.items() if k not in LAUNCHER_VARIABLES}
    return {**keep, "OMP_NUM_THREADS": "1", **extra}


def _start(cmd: list[str], out: Path, **environ: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, *cmd, *TRAIN, "OUTPUT_DIR", str(out)], cwd=REPO,
        env=_clean_environ(**environ), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def _finish(procs: list[subprocess.Popen], out: Path, restarted: bool = False) -> dict:
    """Wait for the processes; the final weights, after checking that one process group ran."""
    for proc in procs:
        stdout, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, stdout[-3000:]
    log = (out / "log.txt").read_text()
    assert "World size: 2" in log, log[-2000:]
    if not restarted:  # (a restarted run logs the iterations after its checkpoint again)
        iterations = [json.loads(line)["iteration"] for line in (out / "metrics.json").open()]
        assert iterations == sorted(set(iterations)), iterations  # one writer: each row once
    return torch.load(out / "model_final.pth", weights_only=True)["model"]


@pytest.fixture(scope="module")
def spawned_weights(tmp_path_factory, toy_root):
    """The reference: ``train_net.py --num-gpus 2`` (two spawned gloo processes)."""
    out = tmp_path_factory.mktemp("spawned")
    return _finish([_start(["train_net.py", "--num-gpus", "2"], out)], out)


def _torchrun(nodes: int, node: int, endpoint: str) -> list[str]:
    return [
        "-m", "torch.distributed.run", "--nnodes", str(nodes), "--nproc-per-node", str(2 // nodes),
        "--node-rank", str(node), "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint,
        "train_net.py",
    ]  # fmt: skip


def _srun_task(rank: int, port: str) -> dict[str, str]:
    """The variables ``srun --ntasks 2`` sets for task ``rank`` on one node."""
    return {
        "SLURM_NTASKS": "2", "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank),
        "SLURM_NODEID": "0", "SLURM_TASKS_PER_NODE": "2", "SLURM_JOB_NODELIST": "127.0.0.1",
        "SLURM_JOB_ID": "42", "MASTER_PORT": port,
    }  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "torchrun 2 machines", "srun", "2 machines"])
def test_every_launcher_trains_like_num_gpus_2(launcher, tmp_path, spawned_weights):
    """Two processes joined into one group by each launcher (on loopback) reach the weights of
    ``--num-gpus 2`` (same seed, same global batch; tolerance 1e-5 relative)."""
    out = tmp_path / "out"
    port = str(_free_port())
    endpoint = f"127.0.0.1:{port}"
    by_hand = ["train_net.py", "--num-machines", "2", "--dist-url", f"tcp://{endpoint}"]
    procs = {
        "torchrun": lambda: [_start(_torchrun(1, 0, endpoint), out)],
        "torchrun 2 machines": lambda: [_start(_torchrun(2, n, endpoint), out) for n in range(2)],
        "srun": lambda: [_start(["train_net.py"], out, **_srun_task(r, port)) for r in range(2)],
        "2 machines": lambda: [_start([*by_hand, "--machine-rank", str(m)], out) for m in range(2)],
    }[launcher]()
    _assert_same_weights(_finish(procs, out), spawned_weights)


def _assert_same_weights(weights: dict, reference: dict) -> None:
    assert weights.keys() == reference.keys()
    for key, value in weights.items():
        torch.testing.assert_close(value, reference[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.slow
def test_torchrun_restart_resumes_to_the_uninterrupted_weights(tmp_path, spawned_weights):
    """``torchrun --max-restarts 1`` with a worker killed (SIGKILL) after the first checkpoint:
    the restarted workers resume by themselves and end with the uninterrupted run's weights."""
    out = tmp_path / "out"
    cmd = _torchrun(1, 0, f"127.0.0.1:{_free_port()}")
    proc = _start([*cmd[:2], "--max-restarts", "1", *cmd[2:]], out)
    deadline = time.monotonic() + 300
    while not (out / "last_checkpoint").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint written"
        time.sleep(0.05)
    workers = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    assert workers, "the run ended before a worker was killed"
    os.kill(int(workers[-1]), signal.SIGKILL)
    weights = _finish([proc], out, restarted=True)
    log = (out / "log.txt").read_text()
    assert "Restarted by the launcher (TORCHELASTIC_RESTART_COUNT=1): resuming" in log
    _assert_same_weights(weights, spawned_weights)


def test_a_launcher_restart_is_named():
    assert launcher_restart({"TORCHELASTIC_RESTART_COUNT": "0"}) is None
    assert launcher_restart({"TORCHELASTIC_RESTART_COUNT": "2"}) == "TORCHELASTIC_RESTART_COUNT=2"
    assert launcher_restart({"SLURM_RESTART_COUNT": "1"}) == "SLURM_RESTART_COUNT=1"


def _descendants(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [d for c in map(int, children) for d in (c, *_descendants(c))]


@pytest.mark.slow
def test_submitit_requeue_resumes_to_the_uninterrupted_weights(
    tmp_path, monkeypatch, spawned_weights
):
    """tools/submit_slurm.py on submitit's local cluster, 2 tasks: the time-out signal after
    the first checkpoint requeues the job with --resume; it ends with the uninterrupted weights."""
    from scripts import load_script

    submit_slurm = load_script("tools/submit_slurm.py")
    monkeypatch.chdir(REPO)
    for name, value in _clean_environ().items():
        monkeypatch.setenv(name, value)
    out = tmp_path / "out"
    args = ["--cluster", "local", "--gpus-per-node", "0", "--tasks-per-node", "2"]
    args += ["--folder", str(tmp_path / "jobs"), "--", *TRAIN, "OUTPUT_DIR", str(out)]
    job = submit_slurm.main(args)
    deadline = time.monotonic() + 300
    while not (out / "last_checkpoint").exists():
        assert not job.done() and time.monotonic() < deadline, job.stdout()
        time.sleep(0.05)
    for pid in _descendants(job._process.pid):  # what SLURM does: signal the first task
        if b"SUBMITIT_LOCAL_GLOBALID=0\0" in Path(f"/proc/{pid}/environ").read_bytes():
            os.kill(pid, signal.SIGUSR2)
    job.wait()
    assert "Requeued job" in job.stdout(), job.stdout()[-3000:]
    assert job.state == "FINISHED", job.stderr()
    final = torch.load(out / "model_final.pth", weights_only=True)["model"]
    _assert_same_weights(final, spawned_weights)


@pytest.mark.slow
def test_a_killed_rank_stops_every_machine_promptly(tmp_path, toy_root):
    """Two torchrun "machines" of one process each: SIGKILL to the worker of one makes both
    commands exit with an error within a minute, not at the 30-minute collective timeout."""
    out = tmp_path / "out"
    endpoint = f"127.0.0.1:{_free_port()}"
    machines = [_start(_torchrun(2, n, endpoint), out) for n in range(2)]
    deadline = time.monotonic() + 300
    while not (out / "last_checkpoint").exists():
        assert all(m.poll() is None for m in machines) and time.monotonic() < deadline
        time.sleep(0.05)
    workers = [Path(f"/proc/{m.pid}/task/{m.pid}/children").read_text().split() for m in machines]
    assert all(workers), "the run ended before a worker was killed"
    os.kill(int(workers[1][0]), signal.SIGKILL)
    killed_at = time.monotonic()
    for machine in machines:
        machine.communicate(timeout=60)
        assert machine.returncode != 0
    assert time.monotonic() - killed_at < 60
