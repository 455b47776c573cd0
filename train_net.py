#!/usr/bin/env python
"""Train and evaluate K-Net with Detectron2.

    python train_net.py --config-file configs/coco/panoptic-segmentation/knet_R50_bs16_1x.yaml \
        --num-gpus 8
    python train_net.py --config-file ... --eval-only MODEL.WEIGHTS /path/to/model.pth
    python train_net.py --config-file ... --resume  # continue from OUTPUT_DIR/last_checkpoint
    python train_net.py --config-file configs/custom/knet_R18_instance_cpu.yaml \
        --dataset my_dataset_train coco-instances train.json images/ \
        --dataset my_dataset_val coco-instances val.json images/

``--dataset`` registers your own data from files in every process (the forms: ``--help`` and
datasets/README.md, "Your own data"); class counts and outputs the config leaves unset come from
the training dataset (``knet.engine.dataset_config``). Without a GPU, ``--num-gpus N`` starts N
CPU processes (gloo) running the same code path. SIGTERM / SIGINT during training write a
checkpoint, then the run exits (status 128 + signal); ``--resume`` continues it. Under torchrun or
SLURM the processes of the launcher are joined (``knet.engine.launch``), and a run the launcher
restarts (``--max-restarts``, a requeued job) resumes by itself.
"""

import contextlib
import logging
import os
import sys

import detectron2.utils.comm as comm
from detectron2.engine import default_argument_parser, default_setup, hooks
from detectron2.evaluation import verify_results
from detectron2.utils.logger import setup_logger
from torch.multiprocessing import ProcessExitedException

from knet.checkpoint import CheckpointMismatchError, KNetCheckpointer, WeightsNotFoundError
from knet.config import load_knet_config
from knet.data import DatasetClassError, DatasetNotRegisteredError
from knet.engine import KNetTrainer as Trainer
from knet.engine import launch
from knet.engine.arguments import (
    DatasetArgumentError,
    parse_args_with_datasets,
    register_dataset_specs,
)
from knet.engine.dataset_config import configure_for_datasets
from knet.engine.launch import (
    ExternalLauncherError,
    ProcessGroupError,
    fit_threads_to_cores,
    launcher_restart,
)
from knet.engine.preemption import (
    PREEMPTION_SIGNALS,
    forward_signals_to_workers,
    interrupted_exit_code,
)
from knet.evaluation import TrainingSetError

# errors whose message says all (no traceback): bad datasets, class counts, weights, launchers,
# networks
USER_ERRORS = (
    CheckpointMismatchError,
    DatasetArgumentError,
    DatasetClassError,
    DatasetNotRegisteredError,
    ExternalLauncherError,
    ProcessGroupError,
    TrainingSetError,
    WeightsNotFoundError,
)


def setup(args):
    cfg, explicit_keys = load_knet_config(args.config_file, args.opts)
    setup_logger(output=cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="knet")
    fit_threads_to_cores(cfg)
    register_dataset_specs(args.dataset, cfg)  # DATASETS.DROP_* first
    mode = "eval" if args.eval_only else "train"
    configure_for_datasets(cfg, explicit_keys, mode)
    cfg.freeze()
    if os.path.isdir(args.config_file):  # a run's folder: Detectron2 logs the file it names
        args.config_file = os.path.join(args.config_file, "config.yaml")
    default_setup(cfg, args)  # writes OUTPUT_DIR/config.yaml, with the class counts chosen
    return cfg


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg).eval()  # eval mode: a checkpoint must fit exactly
        KNetCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        res = Trainer.test(cfg, model)
        if cfg.TEST.AUG.ENABLED:
            res.update(Trainer.test_with_TTA(cfg, model))
        if comm.is_main_process():
            verify_results(cfg, res)
        return res
    trainer = Trainer(cfg)
    restart = launcher_restart()
    if restart and not args.resume:
        logging.getLogger("knet").info("Restarted by the launcher (%s): resuming", restart)
    trainer.resume_or_load(resume=args.resume or restart is not None)
    if cfg.TEST.AUG.ENABLED:
        trainer.register_hooks(
            [hooks.EvalHook(0, lambda: trainer.test_with_TTA(cfg, trainer.model))]
        )
    return trainer.train()


def run(args):
    """``launch(main)``; a signalled multi-process run exits with the signal's status."""
    spawns = args.num_gpus * args.num_machines > 1
    with contextlib.ExitStack() as stack:
        received = stack.enter_context(forward_signals_to_workers()) if spawns else []
        try:
            launch(
                main,
                args.num_gpus,
                num_machines=args.num_machines,
                machine_rank=args.machine_rank,
                dist_url=args.dist_url,
                args=(args,),
            )
        except USER_ERRORS as e:
            sys.exit(f"error: {e}")
        except ProcessExitedException as e:
            codes = {interrupted_exit_code(s) for s in PREEMPTION_SIGNALS}
            if received or e.exit_code in codes:
                sys.exit(interrupted_exit_code(received[0]) if received else e.exit_code)
            raise


if __name__ == "__main__":
    args = parse_args_with_datasets(default_argument_parser())  # args.dataset: DatasetSpec list
    logging.getLogger("knet").info("Command line arguments: %s", args)
    run(args)
