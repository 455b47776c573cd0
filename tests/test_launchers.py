"""train_net.py under external launchers: torchrun and SLURM's srun environment join one process
group; the launchers' environments are read and checked; a failed process stops the others
promptly, named, and network errors name the variable to set."""

import json
import os
import re
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
    ProcessGroupError,
    ProcessWorld,
    _join_launcher,
    _run_in_group,
    explain_network_error,
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


def _start(cmd: list[str], out: Path, console=None, **environ: str) -> subprocess.Popen:
    """Start ``cmd`` with the training arguments; its console goes to ``console`` (default: a
    new file next to ``out``, ``proc.console``), never to a pipe that nobody reads while the
    test waits (a full pipe blocks the run)."""
    if console is None:
        out.parent.mkdir(parents=True, exist_ok=True)
        console = open(out.parent / f"console-{time.monotonic_ns()}.txt", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, *cmd, *TRAIN, "OUTPUT_DIR", str(out)], cwd=REPO,
        env=_clean_environ(**environ), stdout=console, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    proc.console = Path(console.name)
    return proc


def _finish(procs: list[subprocess.Popen], out: Path, restarted: bool = False) -> dict:
    """Wait for the processes; the final weights, after checking that one process group ran."""
    for proc in procs:
        proc.wait(timeout=600)
        assert proc.returncode == 0, proc.console.read_text()[-3000:]
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


def _by_hand(port: str, rank: int) -> ProcessWorld:
    return ProcessWorld("train_net.py", rank, 2, 0, 1, f"tcp://127.0.0.1:{port}")


@pytest.mark.parametrize(
    "error, backend, variables",
    [
        ("The server socket has failed to listen ... code: -98, name: EADDRINUSE", "gloo",
         ["port 29500 is in use", "MASTER_PORT", "--dist-url"]),
        ("The client socket has timed out after 1800000ms while trying to connect to "
         "(10.0.0.5, 29500).", "gloo", ["master 127.0.0.1:29500", "MASTER_ADDR", "MASTER_PORT"]),
        ("[enforce fail at gloo/transport/tcp/device.cc:84] ifa != nullptr. Unable to find "
         "address for: eth7", "gloo", ["GLOO_SOCKET_IFNAME=eth7", "lo"]),
        ("[gloo/transport/tcp/pair.cc:144] Connect timeout [127.0.1.1]:4242", "gloo",
         ["GLOO_SOCKET_IFNAME"]),
        ("NCCL error: internal error. Last error: Bootstrap : no socket interface found", "nccl",
         ["NCCL_SOCKET_IFNAME=eth7"]),
    ],
    ids=["port in use", "no master", "no interface", "unreachable peer", "NCCL interface"],
)  # fmt: skip
def test_network_errors_name_the_variable_to_set(monkeypatch, error, backend, variables):
    for name in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        monkeypatch.setenv(name, "eth7")
    explained = explain_network_error(RuntimeError(error), _by_hand("29500", 1), backend)
    assert all(variable in explained for variable in variables), explained
    assert explain_network_error(ValueError("bad config"), _by_hand("29500", 1), backend) is None


def test_a_port_in_use_names_master_port():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        with pytest.raises(ProcessGroupError, match=f"port {port} is in use .* MASTER_PORT"):
            _run_in_group(print, (), _by_hand(port, 0))


def test_an_unreachable_master_names_master_addr():
    from datetime import timedelta

    import torch.distributed as dist

    port = str(_free_port())
    with pytest.raises(dist.DistNetworkError) as error:
        dist.TCPStore("127.0.0.1", int(port), is_master=False, timeout=timedelta(seconds=1))
    explained = explain_network_error(error.value, _by_hand(port, 1), "gloo")
    assert f"could not reach the master 127.0.0.1:{port}" in explained
    assert "MASTER_ADDR, MASTER_PORT" in explained


def test_a_wrong_gloo_interface_names_gloo_socket_ifname(monkeypatch):
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "knet_no_such_if")
    world = ProcessWorld("train_net.py", 0, 1, 0, 1, f"tcp://127.0.0.1:{_free_port()}")
    with pytest.raises(ProcessGroupError, match="GLOO_SOCKET_IFNAME=knet_no_such_if .* lo"):
        _run_in_group(print, (), world)


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


# train_net.py with rank 1 failing where FAIL_AT says: "step" (an exception at iteration 3) or
# "after" (after training, while rank 0 stands in a long evaluation without collectives); the
# file FAIL_MARK is written when it fails
FAILING_TRAIN_NET = """
import os, sys, time
from pathlib import Path

sys.path.insert(0, os.getcwd())
import train_net
from detectron2.utils import comm
from knet.engine import KNetTrainer

run_step, main = KNetTrainer.run_step, train_net.main


def fail(where):
    if os.environ["FAIL_AT"] == where and comm.get_rank() == 1:
        Path(os.environ["FAIL_MARK"]).touch()
        raise OSError(28, "No space left on device")


def failing_run_step(self):
    if self.iter == 3:
        fail("step")
    run_step(self)


def failing_main(args):
    result = main(args)
    fail("after")
    time.sleep(300)
    return result


KNetTrainer.run_step, train_net.main = failing_run_step, failing_main
if __name__ == "__main__":
    train_net.run(train_net.parse_args_with_datasets(train_net.default_argument_parser()))
"""


def _start_machines(launcher: str, script: str, out: Path, **environ) -> list[subprocess.Popen]:
    """Two processes (rank 0's command first, where two) started by ``launcher``, their console
    in a file (``.console``); the second machine after the first listens, as the store is then held
    there (torchrun's agent on the rendezvous endpoint's machine, rank 0 by hand), as on separate
    machines."""
    port = _free_port()
    endpoint = f"127.0.0.1:{port}"
    by_hand = [script, "--num-machines", "2", "--dist-url", f"tcp://{endpoint}"]
    commands = {
        "torchrun 2 machines": [[*_torchrun(2, n, endpoint)[:-1], script] for n in range(2)],
        "2 machines": [[*by_hand, "--machine-rank", str(m)] for m in range(2)],
        "--num-gpus 2": [[script, "--num-gpus", "2"]],
    }[launcher]
    out.mkdir()
    consoles = [(out.parent / f"console{i}.txt").open("w") for i in range(len(commands))]
    first = _start(commands[0], out, consoles[0], **environ)
    while len(commands) > 1 and first.poll() is None:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.1)
    started = [
        first,
        *(_start(cmd, out, c, **environ) for cmd, c in zip(commands[1:], consoles[1:])),
    ]
    for command, console in zip(started, consoles):
        command.console = Path(console.name)
    return started


def _assert_stop_promptly(commands: list[subprocess.Popen], failed_at: float, named: str) -> None:
    """Every command exits with an error within 60 s of ``failed_at``, the first (the
    survivor's) saying ``named`` (a regular expression)."""
    for command in commands:
        command.wait(timeout=max(1, failed_at + 60 - time.monotonic()))
        assert command.returncode != 0, command.console.read_text()[-3000:]
    assert time.monotonic() - failed_at < 60
    output = commands[0].console.read_text()
    assert re.search(named, output), output[-3000:]


def _wait_for(path: Path, commands: list[subprocess.Popen]) -> float:
    deadline = time.monotonic() + 300
    while not path.exists():
        assert all(c.poll() is None for c in commands) and time.monotonic() < deadline
        time.sleep(0.05)
    return time.monotonic()


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun 2 machines", "2 machines", "--num-gpus 2"])
@pytest.mark.parametrize("fail_at", ["step", "after"])
def test_a_failing_rank_stops_every_process_promptly(launcher, fail_at, tmp_path, toy_root):
    """Rank 1 raises (mid-training, or after training while rank 0 is busy for 5 minutes without
    a collective): every process exits within a minute, with "rank 1 on host H ... failed: ..."."""
    script = tmp_path / "failing_train_net.py"
    script.write_text(FAILING_TRAIN_NET)
    mark = tmp_path / "failed"
    environ = {"FAIL_AT": fail_at, "FAIL_MARK": str(mark)}
    out = tmp_path / "out"
    commands = _start_machines(launcher, str(script), out, **environ)
    failed_at = _wait_for(mark, commands)
    host = re.escape(socket.gethostname())
    named = rf"rank 1 on host {host} \(pid \d+\) failed: OSError: \[Errno 28\]"
    _assert_stop_promptly(commands, failed_at, named)


def _worker_of(pid: int) -> int:
    """The training process of the command ``pid``: torchrun's worker, or the one it spawned."""
    for child in _descendants(pid):
        if re.search(rb"spawn_main|train_net", Path(f"/proc/{child}/cmdline").read_bytes()):
            return child
    raise AssertionError("the run ended before a worker was killed")


@pytest.mark.slow
@pytest.mark.parametrize("launcher, killed", [("torchrun 2 machines", 1), ("2 machines", 0)])
def test_a_killed_rank_stops_every_machine_promptly(launcher, killed, tmp_path, toy_root):
    """Two "machines" of one process each: SIGKILL to the worker of one (rank 1, or rank 0,
    which holds the store of the hand-started run) makes both commands exit with an error within
    a minute, not at the 30-minute collective timeout, the survivor naming the killed rank and
    its host."""
    out = tmp_path / "out"
    machines = _start_machines(launcher, "train_net.py", out)
    _wait_for(out / "last_checkpoint", machines)
    os.kill(_worker_of(machines[killed].pid), signal.SIGKILL)
    killed_at = time.monotonic()
    named = rf"rank {killed} on host {re.escape(socket.gethostname())} \(pid \d+\) failed"
    _assert_stop_promptly([machines[1 - killed], machines[killed]], killed_at, named)
