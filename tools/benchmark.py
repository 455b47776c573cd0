#!/usr/bin/env python
"""Inference speed and peak memory of K-Net (eager, TorchScript, ONNX Runtime) against a floor.

    python tools/benchmark.py --threads 2 --outputs panoptic --engines eager torchscript onnx

Models (random weights unless ``--weights``) run in eval mode as ``DefaultPredictor`` runs them,
post-processing included, on Grace Hopper's photo (matplotlib) resized to ``--size``; exported
engines run the ``knet.export`` file, one call per image; ``--amp`` sets
``MODEL.KNET.TEST.AMP_DTYPE auto`` (accuracy: ``tests/test_amp.py``), ``--train`` times a
``SimpleTrainer`` step on toy scenes. Every ratio is to Detectron2's R50-FPN backbone timed in the
same run (NCHW; on the CPU also channels-last, for reference).
"""

import argparse
import ctypes
import gc
import itertools
import json
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from contextlib import suppress
from functools import partial
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from detectron2.data.detection_utils import read_image
from detectron2.engine import DefaultPredictor, SimpleTrainer
from detectron2.layers import ShapeSpec
from detectron2.modeling.backbone.fpn import build_resnet_fpn_backbone
from detectron2.structures import ImageList, Instances
from detectron2.utils.events import EventStorage
from fvcore.common.timer import Timer
from make_toy_dataset import render_scene  # run as a script: tools/ is on sys.path
from matplotlib import cbook
from tabulate import tabulate

from knet.collect_env import machine_info  # importing knet registers its models and datasets
from knet.data.dataset_mappers.common import image_to_tensor
from knet.data.datasets.toy import TOY_CATEGORIES, TOY_NUM_THING_CLASSES
from knet.engine import get_knet_cfg
from knet.engine.solver import build_optimizer
from knet.export import ExportedKNet, KNetExportModule, export_onnx, export_torchscript

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(REPO_ROOT, "configs/coco/panoptic-segmentation/knet_R50_bs16_1x.yaml")
OUTPUT_NAMES = {"panoptic_seg": "panoptic", "instances": "instance", "sem_seg": "semantic"}
PARTS = ("backbone", "pixel_decoder", "kernel_head", "postprocessor")  # timed by --breakdown
TOY_CLASS = {c["id"]: k for k, c in enumerate(TOY_CATEGORIES)}  # category id -> class, things first


def parse_size(text: str) -> tuple[int, int]:
    with suppress(ValueError):
        h, w = (int(v) for v in text.lower().split("x"))
        if h > 0 and w > 0:
            return h, w
    raise argparse.ArgumentTypeError(f"--size must be positive HxW, e.g. 800x1216, got {text!r}")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--config-file", nargs="+", default=[DEFAULT_CONFIG], metavar="FILE", help="model(s)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    add("--device", default=device, help="cpu or cuda[:i] (default: cuda if available)")
    add("--size", type=parse_size, default=(800, 1216), help="input HxW")
    outputs = ["as-shipped", "panoptic", "instance", "semantic"]
    add("--outputs", choices=outputs, default="as-shipped", help="outputs to compute")
    engines = ["eager", "torchscript", "onnx"]
    add("--engines", nargs="+", choices=engines, default=["eager"], help="how to run model 1")
    add("--batch-size", type=int, default=1, help="images per forward")
    add("--warmup", type=int, default=1, help="untimed runs before timing")
    add("--iters", type=int, default=3, help="timed runs")
    add("--threads", type=int, default=0, help="torch threads (0: torch default)")
    add("--weights", default="", help="checkpoint for the first model")
    add("--breakdown", action="store_true", help="time the parts of the model")
    add("--amp", action="store_true", help="also time mixed precision")
    add("--train", action="store_true", help="also time a training iteration")
    add("--output-json", metavar="FILE", help="save the results as JSON")
    add("--opts", nargs=argparse.REMAINDER, default=[], help="KEY VALUE overrides")
    args = parser.parse_args(argv)
    if args.iters < 1 or args.warmup < 0 or args.batch_size < 1:
        parser.error("--iters and --batch-size must be >= 1, --warmup >= 0")
    return args


def image_tensor(rgb: np.ndarray, input_format: str) -> torch.Tensor:
    """(H, W, 3) uint8 RGB -> (3, H, W) uint8 in ``input_format`` channel order."""
    return image_to_tensor(rgb if input_format == "RGB" else rgb[:, :, ::-1])


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA), so that a timer reads the work done."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def memory_mib(device: torch.device, start: bool) -> float | None:
    """Start (``start``) or read a peak-memory measurement: CUDA ``max_memory_allocated``; on the
    CPU the kernel's high-water mark of the resident set (``VmHWM``), restarted from the current
    resident set once freed heap memory is returned to the OS. None where not measurable."""
    if device.type == "cuda":
        synchronize(device)
        if start:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.max_memory_allocated(device) / 1024**2
    try:
        if start:
            with suppress(OSError, AttributeError):
                ctypes.CDLL("libc.so.6").malloc_trim(0)
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux >= 4.0)
        status = Path("/proc/self/status").read_text().splitlines()
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration, ValueError):
        return None


def measure(name: str, fn: Callable[[], Any], device, args, part_timers=None) -> dict[str, Any]:
    """Run ``fn`` ``--warmup`` times untimed, then ``--iters`` times timed, with the peak memory
    of all the runs above the level before; ``part_timers`` then count the timed runs only."""
    gc.collect()
    base = memory_mib(device, start=True)
    for _ in range(args.warmup):
        fn()
    synchronize(device)
    for timer in (part_timers or {}).values():
        timer.reset()
        timer.pause()
    times = []
    for _ in range(args.iters):
        timer = Timer()
        fn()
        synchronize(device)
        times.append(timer.seconds())
    high = memory_mib(device, start=False)
    median = float(np.median(times))
    result = {"name": name, "median_s": median, "times_s": times}
    result["images_per_s"] = args.batch_size / median
    result["peak_mem_mib"] = None if base is None or high is None else high - base
    return result


def timed_parts(model: torch.nn.Module, device: torch.device) -> tuple[dict[str, Timer], list]:
    """A paused fvcore ``Timer`` per part of ``model`` in :data:`PARTS` (those it has) that forward
    hooks run during every call of the part, and the hooks' handles."""

    def hook(*_, switch: Callable[[], None]) -> None:
        synchronize(device)
        switch()

    timers, handles = {}, []
    for name in PARTS:
        module = getattr(model, name, None)
        if isinstance(module, torch.nn.Module):
            timers[name] = timer = Timer()
            timer.pause()
            handles.append(module.register_forward_pre_hook(partial(hook, switch=timer.resume)))
            handles.append(module.register_forward_hook(partial(hook, switch=timer.pause)))
    return timers, handles


def build_model(config_file: str, args: argparse.Namespace, weights: str, extra=()):
    """(config, model of Detectron2's predictor) with ``--outputs``, ``--opts``, ``--device``,
    ``weights`` ("": random initialisation, the same for every model of a config), ``extra``."""
    opts = []
    for output in OUTPUT_NAMES.values() if args.outputs != "as-shipped" else ():
        opts += [f"MODEL.KNET.TEST.{output.upper()}_ON", str(output == args.outputs)]
    opts += [*args.opts, "MODEL.DEVICE", args.device, "MODEL.WEIGHTS", weights, *extra]
    cfg = get_knet_cfg(config_file, opts)
    cfg.freeze()
    torch.manual_seed(0)
    return cfg, DefaultPredictor(cfg).model  # eval mode; weights that do not fit are an error


def floor_backbone(rgb: np.ndarray, device: torch.device, channels_last: bool):
    """Detectron2's R50-FPN (P2-P6) with the settings of the R50 COCO config (random weights)
    on its input, the normalised image padded to a multiple of 32."""
    cfg = get_knet_cfg(DEFAULT_CONFIG)
    torch.manual_seed(0)
    backbone = build_resnet_fpn_backbone(cfg, ShapeSpec(channels=3)).to(device).eval()
    mean = torch.tensor(cfg.MODEL.PIXEL_MEAN, device=device)[:, None, None]
    std = torch.tensor(cfg.MODEL.PIXEL_STD, device=device)[:, None, None]
    image = image_tensor(rgb, cfg.INPUT.FORMAT).to(device).float()
    padded = ImageList.from_tensors([(image - mean) / std], 32).tensor
    if channels_last:
        padded = padded.contiguous(memory_format=torch.channels_last)
    return lambda: backbone(padded)


def training_batch(cfg, height: int, width: int, batch_size: int) -> list[dict[str, Any]]:
    """Toy scenes (seeds 0..B-1) and their panoptic ground truth: a toy thing keeps its class
    modulo the config's thing classes, toy stuff becomes the config's first stuff classes (void
    where it has none)."""
    num_classes = cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
    # semantic configs keep the default thing count, which may exceed their class count
    num_things = min(cfg.MODEL.KNET.NUM_THING_CLASSES, num_classes)
    num_stuff = num_classes - num_things
    label = np.full(max(TOY_CLASS) + 1, 255, dtype=np.int64)  # toy category id -> class
    for category_id, k in TOY_CLASS.items():
        if k < TOY_NUM_THING_CLASSES:
            label[category_id] = k % num_things
        elif num_stuff:
            label[category_id] = num_things + (k - TOY_NUM_THING_CLASSES) % num_stuff
    batch = []
    for b in range(batch_size):
        rgb, pan, segments = render_scene(b, (height, width))
        things = [s for s in segments if TOY_CLASS[s["category_id"]] < TOY_NUM_THING_CLASSES]
        ids = np.array([s["id"] for s in things if not s["iscrowd"]], dtype=np.int64)
        instances = Instances((height, width), gt_classes=torch.from_numpy(label[ids // 1000]))
        instances.gt_masks = torch.from_numpy(pan == ids[:, None, None])
        sem_seg = torch.from_numpy(label[pan // 1000])  # segment id = category id * 1000 + k
        image = image_tensor(rgb, cfg.INPUT.FORMAT)
        batch.append({"image": image, "instances": instances, "sem_seg": sem_seg})
    return batch


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but CUDA is not available")
    height, width = args.size
    photo = read_image(str(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)), "RGB")
    rgb = cv2.resize(photo, (width, height), interpolation=cv2.INTER_LINEAR)
    settings = {"input": f"{height}x{width} (grace_hopper.jpg), batch {args.batch_size}"}
    settings["weights"] = args.weights or "random init"
    settings["warmup / iters"] = f"{args.warmup} / {args.iters}"
    settings["outputs"] = args.outputs
    results = {"machine": machine_info(args.device), "settings": settings}
    results.update(models=[], inference=[], breakdown=[])
    with torch.no_grad():
        for channels_last in [False, True] if device.type == "cpu" else [False]:
            floor = floor_backbone(rgb, device, channels_last)
            kind = "backbone, channels-last (reference)" if channels_last else "backbone (floor)"
            results["inference"].append(measure(f"Detectron2 R50-FPN {kind}", floor, device, args))
        for i, config_file in enumerate(args.config_file):
            benchmark_model(config_file, i == 0, rgb, device, args, results)
    for m in results["inference"]:
        m["ratio_to_floor"] = m["median_s"] / results["inference"][0]["median_s"]
    return results


def benchmark_model(config_file: str, first: bool, rgb, device, args, results: dict) -> None:
    """Time one model (and, for the first, the breakdown, AMP, exported engines, training)."""
    cfg, model = build_model(config_file, args, args.weights if first else "")
    name = os.path.splitext(os.path.basename(config_file))[0]
    image = image_tensor(rgb, cfg.INPUT.FORMAT).to(device)
    inputs = [{"image": image}] * args.batch_size
    part_timers, handles = timed_parts(model, device) if first and args.breakdown else ({}, [])
    outputs: dict[str, None] = {}  # the output keys of the first image, in order
    handles.append(model.register_forward_hook(lambda m, i, o: outputs.update(dict.fromkeys(o[0]))))
    full = measure(f"{name}: eager", lambda: model(inputs), device, args, part_timers)
    for handle in handles:
        handle.remove()
    outputs_text = "+".join(OUTPUT_NAMES.get(k, k) for k in outputs) or "none"
    params = round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
    config = os.path.relpath(config_file)
    results["models"].append({"config": config, "outputs": outputs_text, "params (M)": params})
    if part_timers:  # seconds per timed run in each part (all its calls), then the rest
        seconds = {part: timer.seconds() / args.iters for part, timer in part_timers.items()}
        rest = full["median_s"] - sum(seconds.values())
        seconds["rest (preprocessing, output conversion)"] = rest
        results["breakdown"] = [
            {"name": part, "median_s": s, "share_of_full": s / full["median_s"]}
            for part, s in seconds.items()
        ]
    images = model.preprocess_image(inputs).tensor
    backbone = measure(f"{name}: its backbone alone", lambda: model.backbone(images), device, args)
    results["inference"] += [full, backbone]
    if first and args.amp:
        amp = ["MODEL.KNET.TEST.AMP_DTYPE", "auto"]
        _, amp_model = build_model(config_file, args, args.weights, amp)
        amp_name = f"{name}: eager, {amp_model.amp_dtype} autocast"
        results["inference"].append(measure(amp_name, lambda: amp_model(inputs), device, args))
    cpu_image, cpu = image.cpu(), torch.device("cpu")
    for engine in [e for e in args.engines if e != "eager"] if first else []:
        module = KNetExportModule(model.cpu())
        sample = torch.randint(0, 256, (3, 480, 640), dtype=torch.uint8)
        export, extra = (export_onnx, ()) if engine == "onnx" else (export_torchscript, ["tracing"])
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "model.onnx" if engine == "onnx" else "model.ts")
            path = export(module, sample, path, module.metadata(cfg), *extra)
            runner = ExportedKNet(path, num_threads=args.threads)
            model.to(device)
            calls = lambda run=runner, x=cpu_image: [run(x) for _ in range(args.batch_size)]
            results["inference"].append(measure(f"{name}: {engine}", calls, cpu, args))
    if first and args.train:  # Detectron2's step: forward, backward, optimizer step
        batch = training_batch(cfg, *args.size, args.batch_size)
        trainer = SimpleTrainer(model, itertools.repeat(batch), build_optimizer(cfg, model))
        step = f"training iteration (batch {args.batch_size})"
        with EventStorage() as trainer.storage, torch.enable_grad():
            results["train"] = measure(step, trainer.run_step, device, args)
        model.eval()  # SimpleTrainer set training mode


def format_report(results: dict[str, Any]) -> str:
    info = list(results["machine"].items()) + list(results["settings"].items())
    for i, model in enumerate(results["models"]):
        info += [(f"model {i + 1}: {k}", v) for k, v in model.items()]
    table = lambda rows, headers: tabulate(rows, headers, "github", disable_numparse=True)
    _num = lambda value, fmt: "-" if value is None else format(value, fmt)
    lines = [tabulate(info, tablefmt="github", headers=["machine / settings", ""]), ""]
    rows = [
        [m["name"], _num(m["median_s"] * 1000, ".1f"), _num(m["images_per_s"], ".2f")]
        + [_num(m["peak_mem_mib"], ".0f"), _num(m.get("ratio_to_floor"), ".2f")]
        for m in results["inference"] + ([results["train"]] if "train" in results else [])
    ]
    headers = ["measurement", "median ms", "images/s", "peak mem MiB", "ratio to floor"]
    lines.append(table(rows, headers))
    if results["breakdown"]:
        rows = [
            (m["name"], _num(m["median_s"] * 1000, ".1f"), f"{100 * m['share_of_full']:.1f}")
            for m in results["breakdown"]
        ]
        lines += ["", table(rows, ["part of the first model (eager)", "ms", "% of the model"])]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    results = run(args)
    print(format_report(results))
    if args.output_json:
        os.makedirs(os.path.dirname(os.path.abspath(args.output_json)), exist_ok=True)
        with open(args.output_json, "w") as f:
            json.dump(results, f, indent=2)
        print(f"saved {args.output_json}", file=sys.stderr)


if __name__ == "__main__":
    main()
