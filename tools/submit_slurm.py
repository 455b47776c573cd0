#!/usr/bin/env python
"""Submit ``train_net.py`` to SLURM with submitit: requeued on preemption and time-out, resumed
exactly.

    python tools/submit_slurm.py --nodes 2 --gpus-per-node 8 --partition PART --time 4320 -- \\
        --config-file configs/coco/panoptic-segmentation/knet_swin_L_bs32_ms3x.yaml

Everything after ``--`` goes to ``train_net.py``. Each SLURM task runs one training process,
which joins the others through ``knet.engine.launch`` (the variables of submitit's job
environment). When SLURM signals a time-out or preemption (submitit asks for the signal 90 s
before the end), submitit requeues the job with ``--resume``, and it continues from its last
checkpoint (exactly, with ``SEED >= 0``). ``--cluster local`` runs the tasks on this machine
through the same path.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import submitit

from knet.engine.launch import job_port

REPO = Path(__file__).resolve().parents[1]


class TrainingJob:
    """One task of the job: ``train_net.py ARGV`` as the process of its SLURM task."""

    def __init__(self, argv: Sequence[str]):
        self.argv = list(argv)

    def __call__(self) -> None:
        env = submitit.JobEnvironment()
        on_this_machine = env.cluster == "local"
        os.environ.update(
            RANK=str(env.global_rank),
            WORLD_SIZE=str(env.num_tasks),
            LOCAL_RANK=str(env.local_rank),
            LOCAL_WORLD_SIZE=str(env.num_tasks // env.num_nodes),
            MASTER_ADDR="127.0.0.1" if on_this_machine else env.hostnames[0],
            MASTER_PORT=os.environ.get("MASTER_PORT") or str(job_port(env.raw_job_id)),
        )
        spec = importlib.util.spec_from_file_location("train_net", REPO / "train_net.py")
        train_net = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(train_net)
        parser = train_net.default_argument_parser()
        train_net.run(train_net.parse_args_with_datasets(parser, self.argv))

    def checkpoint(self) -> submitit.helpers.DelayedSubmission:
        """Called by submitit on time-out or preemption: the requeued job resumes."""
        argv = self.argv if "--resume" in self.argv else ["--resume", *self.argv]
        return submitit.helpers.DelayedSubmission(TrainingJob(argv))


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--nodes", type=int, default=1)
    add("--gpus-per-node", type=int, default=8, help="0 trains on CPUs")
    add("--tasks-per-node", type=int, help="training processes per node (default: the GPUs)")
    add("--cpus-per-task", type=int, default=10)
    add("--partition", help="SLURM partition")
    add("--time", type=int, default=72 * 60, help="minutes per allocation (requeued after)")
    add("--job-name", default="knet")
    add("--folder", default="output/submitit/%j", help="submitit's logs and pickles")
    add("--max-requeues", type=int, default=10, help="time-outs to requeue after")
    add("--cluster", choices=("slurm", "local"), help="default: SLURM where it is installed")
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    return parser.parse_args(argv[:split]), argv[split + 1 :]


def main(argv: Sequence[str] | None = None) -> submitit.Job:
    args, train_args = parse_args(argv)
    tasks = args.tasks_per_node or max(args.gpus_per_node, 1)
    executor = submitit.AutoExecutor(
        folder=args.folder,
        cluster=args.cluster,
        slurm_max_num_timeout=args.max_requeues,
        local_max_num_timeout=args.max_requeues,
    )
    executor.update_parameters(
        name=args.job_name,
        nodes=args.nodes,
        tasks_per_node=tasks,
        gpus_per_node=args.gpus_per_node,
        cpus_per_task=args.cpus_per_task,
        timeout_min=args.time,
        slurm_partition=args.partition,
    )
    job = executor.submit(TrainingJob(train_args))
    print(f"Submitted job {job.job_id}: logs in {job.paths.folder}")
    return job


if __name__ == "__main__":
    main()
