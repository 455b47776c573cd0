#!/usr/bin/env python
"""Train and evaluate K-Net with Detectron2.

    python train_net.py --config-file configs/coco/panoptic-segmentation/knet_R50_bs16_1x.yaml \
        --num-gpus 8
    python train_net.py --config-file ... --eval-only MODEL.WEIGHTS /path/to/model.pth
    python train_net.py --config-file ... --resume  # continue from OUTPUT_DIR/last_checkpoint

Without a GPU, ``--num-gpus N`` starts N CPU processes (gloo) running the same code path.
"""

import logging

import detectron2.utils.comm as comm
from detectron2.engine import default_argument_parser, default_setup, hooks
from detectron2.evaluation import verify_results
from detectron2.utils.logger import setup_logger

from knet.checkpoint import KNetCheckpointer
from knet.distributed import launch
from knet.engine import KNetTrainer as Trainer
from knet.engine import get_knet_cfg


def setup(args):
    cfg = get_knet_cfg(args.config_file, args.opts)
    cfg.freeze()
    default_setup(cfg, args)
    setup_logger(output=cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="knet")
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
    trainer.resume_or_load(resume=args.resume)
    if cfg.TEST.AUG.ENABLED:
        trainer.register_hooks(
            [hooks.EvalHook(0, lambda: trainer.test_with_TTA(cfg, trainer.model))]
        )
    return trainer.train()


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    logging.getLogger("knet").info("Command line arguments: %s", args)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
