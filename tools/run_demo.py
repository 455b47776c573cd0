#!/usr/bin/env python
"""The main job: train K-Net on the built-in toy dataset on CPU, evaluate, visualise, plot.

    python tools/run_demo.py                 # panoptic K-Net on knet_toy (`make demo`)
    python tools/run_demo.py --task semantic # semantic K-Net (`make demo TASK=semantic`)
    python tools/run_demo.py --task video    # Video K-Net: STQ / VPQ (`make demo TASK=video`)
    python tools/run_demo.py --max-iter 200  # quicker, lower scores
    python tools/run_demo.py --opts SOLVER.IMS_PER_BATCH 8

It creates the data its config needs first (generates the toy dataset, or prepares the shared
sample, when absent or stale), trains with ``train_net.py``'s trainer, evaluates PQ, mask AP
and mIoU (STQ and VPQ for video, also of the untrained model) on the validation split with
Detectron2's evaluators, and writes into the output folder:
``metrics.json`` and TensorBoard events (Detectron2's writers), ``model_final.pth``,
``vis/*.png`` (ground truth | prediction, drawn with Detectron2's Visualizer), ``curves.png``
(loss and PQ during training) and ``summary.json``.
"""

import argparse
import json
import logging
import os
import sys
import time

import cv2
import numpy as np
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.detection_utils import read_image
from detectron2.engine import DefaultPredictor, default_setup
from detectron2.utils.logger import setup_logger
from detectron2.utils.visualizer import Visualizer
from make_toy_dataset import ensure_toy_dataset  # run as a script: tools/ is on sys.path
from make_toy_video_dataset import generate_toy_video_dataset
from prepare_samples import prepare_ade20k_sample, prepare_coco_sample, register_samples
from tabulate import tabulate

from knet.data.datasets import read_panoptic_frame
from knet.data.datasets.toy import TOY_DIRNAME
from knet.engine import KNetTrainer, get_knet_cfg
from knet.visualization import draw_predictions

TASK_CONFIGS = {
    "panoptic": "configs/toy/knet_R18_toy_panoptic.yaml",
    "semantic": "configs/toy/knet_upernet_R18_toy_semantic.yaml",
    # train on the 2 images of the shared ADE20K sample, evaluate on its validation image
    "ade20k_sample": "configs/toy/knet_upernet_R18_ade20k_sample.yaml",
    # train and evaluate on the 2 real COCO images of the shared sample
    "coco_sample_overfit": "configs/toy/knet_R18_coco_sample_overfit.yaml",
    # Video K-Net on the synthetic videos: tracks objects from frame to frame
    "video": "configs/toy/video_knet_R18_toy.yaml",
}
REPORTED_METRICS = [
    ("panoptic_seg", ["PQ", "SQ", "RQ", "PQ_th", "PQ_st"]),
    ("segm", ["AP", "AP50", "AP75"]),
    ("sem_seg", ["mIoU", "pACC"]),
    ("video_panoptic_seg", ["STQ", "AQ", "SQ", "VPQ", "VPQ@1", "VPQ@2", "VPQ@4", "VPQ@6"]),
]
logger = logging.getLogger("knet.demo")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="panoptic", choices=sorted(TASK_CONFIGS))
    parser.add_argument("--config-file", help="default: the toy config of --task")
    parser.add_argument("--output-dir", help="default: the config's OUTPUT_DIR")
    parser.add_argument("--max-iter", type=int, help="override SOLVER.MAX_ITER (steps scale along)")
    parser.add_argument("--num-vis", type=int, default=6, help="validation images to draw")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="KEY VALUE overrides")
    return parser.parse_args(argv)


def build_cfg(args):
    cfg = get_knet_cfg(args.config_file, args.opts)
    if args.max_iter:
        scale = args.max_iter / cfg.SOLVER.MAX_ITER
        # increasing and inside the run, as the LR schedule requires (short runs merge steps)
        steps = {int(s * scale) for s in cfg.SOLVER.STEPS}
        cfg.SOLVER.STEPS = tuple(sorted(s for s in steps if 0 < s < args.max_iter))
        cfg.SOLVER.WARMUP_ITERS = min(cfg.SOLVER.WARMUP_ITERS, args.max_iter // 5)
        cfg.SOLVER.MAX_ITER = args.max_iter
        cfg.TEST.EVAL_PERIOD = max(args.max_iter // 3, 1)
        cfg.SOLVER.CHECKPOINT_PERIOD = cfg.TEST.EVAL_PERIOD
    if args.output_dir:
        cfg.OUTPUT_DIR = args.output_dir
    cfg.freeze()
    return cfg


def results_table(results: dict[str, dict[str, float]], baseline: dict | None = None) -> str:
    """The reported metrics; with ``baseline``, a column with the untrained model's."""
    rows = []
    for task, metrics in REPORTED_METRICS:
        for m in metrics if task in results else ():
            if m in results[task]:
                row = [task, m, f"{results[task][m]:.2f}"]
                rows.append(row + ([f"{baseline[task][m]:.2f}"] if baseline else []))
    headers = ["task", "metric", "value"] + (["untrained"] if baseline else [])
    return tabulate(rows, headers=headers, tablefmt="github")


def save_visualisations(cfg, weights: str, num: int) -> list[str]:
    """Ground truth | prediction for the first ``num`` validation images."""
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.WEIGHTS = weights
    predictor = DefaultPredictor(cfg)
    dataset = cfg.DATASETS.TEST[0]
    metadata = MetadataCatalog.get(dataset)
    out_dir = os.path.join(cfg.OUTPUT_DIR, "vis")
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for record in DatasetCatalog.get(dataset)[:num]:  # a video's frames in order: tracked
        bgr = read_image(record["file_name"], format="BGR")
        rgb = bgr[:, :, ::-1]
        if "label_file_name" in record:  # a video frame: its classes (ids are in the labels)
            semantic = read_panoptic_frame(record)[0]
            truth = Visualizer(rgb, metadata).draw_sem_seg(semantic)
        else:
            truth = Visualizer(rgb, metadata).draw_dataset_dict(record)
        drawn = draw_predictions(Visualizer(rgb, metadata), predictor(bgr))
        panel = np.concatenate([truth.get_image(), drawn.get_image()], axis=1)
        stem = os.path.splitext(os.path.basename(record["file_name"]))[0]
        path = os.path.join(out_dir, stem + ".png")
        cv2.imwrite(path, panel[:, :, ::-1])
        paths.append(path)
    return paths


def plot_curves(output_dir: str) -> str:
    """Total loss per logged iteration and PQ / mIoU / mask AP at each evaluation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(os.path.join(output_dir, "metrics.json")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    loss = [(r["iteration"], r["total_loss"]) for r in records if "total_loss" in r]
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(11, 4))
    if loss:
        ax_loss.plot(*zip(*loss))
    ax_loss.set(xlabel="iteration", ylabel="total loss", title="training loss", yscale="log")
    for key, label in [
        ("panoptic_seg/PQ", "PQ"),
        ("segm/AP", "mask AP"),
        ("sem_seg/mIoU", "mIoU"),
        ("video_panoptic_seg/STQ", "STQ"),
        ("video_panoptic_seg/VPQ", "VPQ"),
    ]:
        points = [(r["iteration"], r[key]) for r in records if key in r]
        if points:
            ax_metric.plot(*zip(*points), marker="o", label=label)
    ax_metric.set(xlabel="iteration", ylabel="score", title="validation", ylim=(0, 100))
    ax_metric.legend()
    fig.tight_layout()
    path = os.path.join(output_dir, "curves.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.time()
    args.config_file = args.config_file or TASK_CONFIGS[args.task]
    cfg = build_cfg(args)
    # Detectron2's and K-Net's loggers (console + OUTPUT_DIR/log.txt), config.yaml, the seed
    setup_logger(output=cfg.OUTPUT_DIR, name="knet")
    default_setup(cfg, args)
    # the only place where the demo's data is created: loading never generates or prepares it
    register_samples()
    names = cfg.DATASETS.TRAIN + cfg.DATASETS.TEST
    creators = {
        TOY_DIRNAME + "_video": generate_toy_video_dataset,
        TOY_DIRNAME: ensure_toy_dataset,
        "coco_sample": prepare_coco_sample,
        "ade20k_sample": prepare_ade20k_sample,
    }
    # each dataset's creator: that of its longest prefix (knet_toy_video is not knet_toy)
    wanted = {max((p for p in creators if n.startswith(p)), key=len, default=None) for n in names}
    ready = {p: creators[p]() for p in creators if p in wanted}
    for prefix, folder in ready.items():
        logger.info("%s data ready at %s (%.1f s)", prefix, folder, time.time() - start)
    trainer = KNetTrainer(cfg)
    trainer.resume_or_load(resume=False)
    baseline = None
    if cfg.MODEL.META_ARCHITECTURE == "VideoKNet":  # what tracking learns: the untrained model's
        baseline = KNetTrainer.test(cfg, trainer.model)
        baseline = baseline.get(cfg.DATASETS.TEST[0], baseline)
    train_start = time.time()
    trainer.train()
    train_time = time.time() - train_start
    # DefaultTrainer's evaluation hook evaluates after the last iteration and keeps the result.
    results = getattr(trainer, "_last_eval_results", None) or KNetTrainer.test(cfg, trainer.model)
    if len(cfg.DATASETS.TEST) == 1:  # a single dataset's results may be keyed by its name
        results = results.get(cfg.DATASETS.TEST[0], results)

    weights = os.path.join(cfg.OUTPUT_DIR, "model_final.pth")
    vis_paths = save_visualisations(cfg, weights, args.num_vis)
    curves = plot_curves(cfg.OUTPUT_DIR)
    total = time.time() - start
    summary = {
        "task": args.task,
        "config": args.config_file,
        "iterations": cfg.SOLVER.MAX_ITER,
        "train_seconds": round(train_time, 1),
        "total_seconds": round(total, 1),
        "torch_threads": torch.get_num_threads(),
        "results": results,
        "untrained_results": baseline,
    }
    with open(os.path.join(cfg.OUTPUT_DIR, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)

    print()
    print(f"K-Net ({args.task}) on {cfg.DATASETS.TEST[0]} after {cfg.SOLVER.MAX_ITER} iterations")
    print(results_table(results, baseline))
    print(f"\ntraining: {train_time / 60:.1f} min, total: {total / 60:.1f} min")
    print(f"model:           {weights}")
    print(f"metrics:         {os.path.join(cfg.OUTPUT_DIR, 'metrics.json')} (+ TensorBoard events)")
    print(f"curves:          {curves}")
    vis_dir = os.path.dirname(vis_paths[0]) if vis_paths else "-"
    print(f"visualisations:  {vis_dir} ({len(vis_paths)} files)")
    print(f"summary:         {os.path.join(cfg.OUTPUT_DIR, 'summary.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
