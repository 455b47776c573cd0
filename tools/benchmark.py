#!/usr/bin/env python
"""Inference speed and peak memory of K-Net (eager, TorchScript, ONNX Runtime) against a floor.

    python tools/benchmark.py --threads 2                        # R-50 panoptic as shipped, CPU
    python tools/benchmark.py --threads 2 --outputs panoptic     # panoptic output only
    python tools/benchmark.py --threads 2 --engines eager torchscript onnx --breakdown
    python tools/benchmark.py --amp --train                      # + mixed precision, training
    python tools/benchmark.py --device cuda --batch-size 8 --iters 20 --warmup 5

Models get random weights (``--weights``: a checkpoint) and run in eval mode as
``DefaultPredictor`` runs them, post-processing included, on Grace Hopper's photo (matplotlib)
resized to ``--size``; ``torchscript`` / ``onnx`` time the ``knet.export`` file, one call per
image. Every ratio is to Detectron2's R50-FPN backbone timed in the same run (NCHW; on the CPU
also channels-last, for reference). ``--amp`` adds ``MODEL.KNET.TEST.AMP_DTYPE auto`` (accuracy:
``tests/test_amp.py``), ``--train`` a ``SimpleTrainer`` step on toy scenes. Peak memory: CUDA
``max_memory_allocated`` or the CPU resident set's high-water mark, above the level before.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import itertools
import json
import os
import statistics
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
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
from fvcore.nn import parameter_count
from make_toy_dataset import render_scene  # run as a script: tools/ is on sys.path
from matplotlib import cbook
from tabulate import tabulate

import knet  # noqa: F401  (registers K-Net's meta-architecture and datasets)
from knet.collect_env import machine_info
from knet.data.datasets.panoptic import contiguous_id_map
from knet.data.datasets.toy import TOY_CATEGORIES, TOY_NUM_THING_CLASSES
from knet.engine import get_knet_cfg
from knet.engine.solver import build_optimizer
from knet.export import ExportedKNet, KNetExportModule, export_onnx, export_torchscript

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(REPO_ROOT, "configs/coco/panoptic-segmentation/knet_R50_bs16_1x.yaml")
OUTPUT_FLAGS = ("PANOPTIC_ON", "INSTANCE_ON", "SEMANTIC_ON")
OUTPUT_NAMES = {"panoptic_seg": "panoptic", "instances": "instance", "sem_seg": "semantic"}
PARTS = ("backbone", "pixel_decoder", "kernel_head", "postprocessor")  # timed by --breakdown
EXPORT_SIZE = (480, 640)
TOY_CLASS = contiguous_id_map(TOY_CATEGORIES)  # toy category id -> class, things first


def parse_size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"--size must be HxW, e.g. 800x1216, got {text!r}") from e
    if h <= 0 or w <= 0:
        raise argparse.ArgumentTypeError(f"--size must be positive, got {text!r}")
    return h, w


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
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
    image = rgb if input_format == "RGB" else rgb[:, :, ::-1]
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))


# --------------------------------------------------------------------------- measuring
def _malloc_trim() -> None:
    """Return freed heap memory to the OS, so that a measurement starts from the floor."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _resident_high_water_kib() -> int | None:
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration, ValueError):
        return None


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA), so that a timer reads the work done."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def peak_memory(device: torch.device) -> Iterator[dict[str, float | None]]:
    """``["mib"]`` holds, after the block, its peak memory above the level at entry (None where
    not measurable): CUDA ``max_memory_allocated``; on the CPU the kernel's high-water mark of
    the resident set (``VmHWM``, restarted at entry from the current resident set)."""
    gc.collect()
    result: dict[str, float | None] = {"mib": None}
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        yield result
        synchronize(device)
        result["mib"] = (torch.cuda.max_memory_allocated(device) - base) / 1024**2
        return
    _malloc_trim()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS (Linux >= 4.0)
        base = _resident_high_water_kib()
    except OSError:
        base = None
    yield result
    high = _resident_high_water_kib()
    if base is not None and high is not None:
        result["mib"] = (high - base) / 1024


def measure(name: str, fn: Callable[[], Any], device, args, part_timers=None) -> dict[str, Any]:
    """Run ``fn`` ``--warmup`` times untimed, then ``--iters`` times timed; ``part_timers``
    (see :func:`timed_parts`) are reset to count the timed runs only."""
    times = []
    with peak_memory(device) as memory:
        for _ in range(args.warmup):
            fn()
        synchronize(device)
        for timer in (part_timers or {}).values():
            timer.reset()
            timer.pause()
        for _ in range(args.iters):
            timer = Timer()
            fn()
            synchronize(device)
            times.append(timer.seconds())
    median = statistics.median(times)
    return {
        "name": name,
        "median_s": median,
        "times_s": times,
        "images_per_s": args.batch_size / median,
        "peak_mem_mib": memory["mib"],
    }


@contextmanager
def timed_parts(model: torch.nn.Module | None, device: torch.device) -> Iterator[dict[str, Timer]]:
    """A paused fvcore ``Timer`` per part of ``model`` in :data:`PARTS` (those it has; none for
    None), running from each forward pre-hook of the part to its forward hook while the block
    runs: the seconds spent in every call of the part."""
    timers: dict[str, Timer] = {}
    handles = []
    for name in PARTS if model is not None else ():
        module = getattr(model, name, None)
        if not isinstance(module, torch.nn.Module):
            continue
        timer = timers[name] = Timer()
        timer.pause()

        def start(*_, timer: Timer = timer) -> None:
            synchronize(device)
            timer.resume()

        def stop(*_, timer: Timer = timer) -> None:
            synchronize(device)
            timer.pause()

        handles += [module.register_forward_pre_hook(start), module.register_forward_hook(stop)]
    try:
        yield timers
    finally:
        for handle in handles:
            handle.remove()


# --------------------------------------------------------------------------- what is timed
def build_model(config_file: str, args: argparse.Namespace, weights: str, extra=()):
    """(config, model of Detectron2's predictor) with ``--outputs``, ``--opts``, ``--device``,
    ``weights`` ("": random initialisation, the same for every model of a config), ``extra``."""
    opts = []
    for flag in OUTPUT_FLAGS if args.outputs != "as-shipped" else ():
        opts += [f"MODEL.KNET.TEST.{flag}", str(flag == f"{args.outputs.upper()}_ON")]
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


def exported_runner(model, cfg, engine: str, folder: str, threads: int) -> ExportedKNet:
    module = KNetExportModule(model)
    sample = torch.randint(0, 256, (3, *EXPORT_SIZE), dtype=torch.uint8)
    export = export_onnx if engine == "onnx" else export_torchscript
    path = os.path.join(folder, "model.onnx" if engine == "onnx" else "model.ts")
    extra = () if engine == "onnx" else ("tracing",)
    path = export(module, sample, path, module.metadata(cfg), *extra)
    return ExportedKNet(path, num_threads=threads)


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
        things = [s for s in things if not s["iscrowd"]]
        instances = Instances((height, width))
        instances.gt_classes = torch.from_numpy(label[[s["category_id"] for s in things]])
        masks = np.array([pan == s["id"] for s in things], dtype=bool).reshape(-1, height, width)
        instances.gt_masks = torch.from_numpy(masks)
        sem_seg = torch.from_numpy(label[pan // 1000])  # segment id = category id * 1000 + k
        image = image_tensor(rgb, cfg.INPUT.FORMAT)
        batch.append({"image": image, "instances": instances, "sem_seg": sem_seg})
    return batch


# --------------------------------------------------------------------------- benchmark
def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but CUDA is not available")
    height, width = args.size
    photo = read_image(str(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)), "RGB")
    rgb = cv2.resize(photo, (width, height), interpolation=cv2.INTER_LINEAR)
    settings = {
        "input": f"{height}x{width} (grace_hopper.jpg), batch {args.batch_size}",
        "weights": args.weights or "random init",
        "warmup / iters": f"{args.warmup} / {args.iters}",
        "outputs": args.outputs,
    }
    results = {"machine": machine_info(args.device), "settings": settings}
    results.update(models=[], inference=[], breakdown=[])
    floors = {False: "backbone (floor)", True: "backbone, channels-last (reference)"}
    with torch.no_grad():
        for channels_last in [False, True] if device.type == "cpu" else [False]:
            floor = floor_backbone(rgb, device, channels_last)
            name = f"Detectron2 R50-FPN {floors[channels_last]}"
            results["inference"].append(measure(name, floor, device, args))
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
    outputs: dict[str, None] = {}  # the output keys of the first image, in order
    handle = model.register_forward_hook(lambda m, i, out: outputs.update(dict.fromkeys(out[0])))
    with timed_parts(model if first and args.breakdown else None, device) as part_timers:
        full = measure(f"{name}: eager", lambda: model(inputs), device, args, part_timers)
    handle.remove()
    outputs_text = "+".join(OUTPUT_NAMES.get(k, k) for k in outputs) or "none"
    params = round(parameter_count(model)[""] / 1e6, 2)
    results["models"].append(
        {"config": os.path.relpath(config_file), "outputs": outputs_text, "params (M)": params}
    )
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
        with tempfile.TemporaryDirectory() as folder:
            runner = exported_runner(model.cpu(), cfg, engine, folder, args.threads)
            model.to(device)
            calls = lambda run=runner, x=cpu_image: [run(x) for _ in range(args.batch_size)]
            results["inference"].append(measure(f"{name}: {engine}", calls, cpu, args))
    if first and args.train:  # Detectron2's step: forward, backward, optimizer step
        batch = training_batch(cfg, *args.size, args.batch_size)
        optimizer = build_optimizer(cfg, model)
        trainer = SimpleTrainer(model, itertools.repeat(batch), optimizer)  # training mode
        step = f"training iteration (batch {args.batch_size})"
        with EventStorage() as trainer.storage, torch.enable_grad():
            results["train"] = measure(step, trainer.run_step, device, args)
        model.eval()


# --------------------------------------------------------------------------- report
def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def format_report(results: dict[str, Any]) -> str:
    info = list(results["machine"].items()) + list(results["settings"].items())
    for i, model in enumerate(results["models"]):
        info += [(f"model {i + 1}: {k}", v) for k, v in model.items()]
    table = lambda rows, headers: tabulate(rows, headers, "github", disable_numparse=True)
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
