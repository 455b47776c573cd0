#!/usr/bin/env python
"""Inference speed and peak memory of K-Net (eager, TorchScript, ONNX Runtime) against a floor.

    python tools/benchmark.py --threads 2                        # R-50 panoptic as shipped, CPU
    python tools/benchmark.py --threads 2 --outputs panoptic     # panoptic output only
    python tools/benchmark.py --threads 2 --engines eager torchscript onnx --breakdown
    python tools/benchmark.py --amp --photos 'photos/*.jpg'      # + mixed precision and its error
    python tools/benchmark.py --device cuda --batch-size 8 --iters 20 --warmup 5

Every model is built from its config with random weights (``--weights`` loads a checkpoint) and
run in eval mode on one photo resized to ``--size`` (matplotlib's Grace Hopper when available),
fed as ``DefaultPredictor`` feeds it after its resize: the whole forward, normalisation, padding
and the post-processing of every output that ``--outputs`` enables included (``as-shipped``:
those the config enables). ``torchscript`` / ``onnx`` export the model (``knet.export``, traced
at 480x640) and time the saved file on the same image; TorchScript and ONNX Runtime take one
image per call, so ``--batch-size B`` is B calls for them.

The floor, timed in the same run, is Detectron2's ResNet-50 + FPN backbone
(``build_resnet_fpn_backbone`` with the settings of ``knet_R50_bs16_1x.yaml``) on the normalised,
padded image in PyTorch's default (NCHW) layout; every ratio is to it. K-Net runs channels-last
on the CPU (``MODEL.KNET.CHANNELS_LAST``), so the floor is timed channels-last too, for
reference. ``--breakdown`` times the parts of the first model with forward hooks during the timed
runs: ``backbone``, ``pixel_decoder``, ``kernel_head`` and ``postprocessor`` (those the model
has). ``--amp`` adds the model under ``MODEL.KNET.TEST.AMP_DTYPE auto`` and its output
differences from float32 on the ``--photos`` (through ``DefaultPredictor``). ``--train`` adds one
training iteration (Detectron2's ``SimpleTrainer.run_step``) on synthetic ground truth.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` above the allocation before the
measurement; on CPU the peak resident set size (sampled every millisecond) above the RSS before
it, after returning freed heap memory to the OS (``malloc_trim``).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import glob
import itertools
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections import defaultdict
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
from tabulate import tabulate

import knet  # noqa: F401  (registers K-Net's meta-architecture and datasets)
from knet.engine import get_knet_cfg
from knet.export import ExportedKNet, KNetExportModule, export_onnx, export_torchscript
from knet.solver import build_optimizer

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(
    REPO_ROOT, "configs", "coco", "panoptic-segmentation", "knet_R50_bs16_1x.yaml"
)
MIB = 1024.0**2
OUTPUT_FLAGS = ("PANOPTIC_ON", "INSTANCE_ON", "SEMANTIC_ON")
OUTPUT_NAMES = {"panoptic_seg": "panoptic", "instances": "instance", "sem_seg": "semantic"}
PARTS = ("backbone", "pixel_decoder", "kernel_head", "postprocessor")  # timed by --breakdown
EXPORT_SIZE = (480, 640)


# --------------------------------------------------------------------------- arguments
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
    parser.add_argument(
        "--config-file", nargs="+", default=[DEFAULT_CONFIG], metavar="FILE", help="model(s)"
    )
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="cpu or cuda[:i] (default: cuda if available)",
    )
    parser.add_argument("--size", type=parse_size, default=(800, 1216), help="input HxW")
    parser.add_argument(
        "--outputs",
        choices=["as-shipped", "panoptic", "instance", "semantic"],
        default="as-shipped",
        help="outputs to compute (default: those the config enables)",
    )
    parser.add_argument(
        "--engines",
        nargs="+",
        choices=["eager", "torchscript", "onnx"],
        default=["eager"],
        help="how to run the first model (torchscript / onnx: CPU, exported files)",
    )
    parser.add_argument("--batch-size", type=int, default=1, help="images per forward")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs before timing")
    parser.add_argument("--iters", type=int, default=3, help="timed runs")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    parser.add_argument("--weights", default="", help="checkpoint for the first model")
    parser.add_argument("--breakdown", action="store_true", help="time the parts of the model")
    parser.add_argument("--amp", action="store_true", help="also time mixed precision")
    parser.add_argument("--photos", nargs="+", default=[], help="images for the --amp error")
    parser.add_argument("--train", action="store_true", help="also time a training iteration")
    parser.add_argument("--output-json", metavar="FILE", help="save the results as JSON")
    parser.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="KEY VALUE overrides")
    args = parser.parse_args(argv)
    if args.iters < 1 or args.warmup < 0 or args.batch_size < 1:
        parser.error("--iters and --batch-size must be >= 1, --warmup >= 0")
    return args


# --------------------------------------------------------------------------- machine and input
def machine_info(device: torch.device) -> dict[str, Any]:
    import detectron2

    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    info = {
        "cpu": cpu,
        "cpus available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 0,
        "torch threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "detectron2": detectron2.__version__,
        "python": platform.python_version(),
        "device": str(device),
    }
    if hasattr(os, "getloadavg"):
        info["load average (1 min) at start"] = round(os.getloadavg()[0], 2)
    if device.type == "cuda":
        info["device name"] = torch.cuda.get_device_name(device)
    return info


def benchmark_image(height: int, width: int) -> tuple[np.ndarray, str]:
    """(H, W, 3) uint8 RGB: matplotlib's Grace Hopper photo if available, else noise."""
    try:
        from matplotlib import cbook

        path = cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
        rgb = read_image(str(path), format="RGB")
        return cv2.resize(rgb, (width, height), interpolation=cv2.INTER_LINEAR), "grace_hopper.jpg"
    except (ImportError, OSError, ValueError, cv2.error):
        rng = np.random.default_rng(0)
        return rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "noise"


def image_tensor(rgb: np.ndarray, input_format: str) -> torch.Tensor:
    """(3, H, W) uint8 in ``input_format`` channel order."""
    image = rgb if input_format == "RGB" else rgb[:, :, ::-1]
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))


# --------------------------------------------------------------------------- measuring
def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class PeakMemory:
    """Peak memory above the level at entry (bytes in ``peak``; None if unmeasurable)."""

    def __init__(self, device: torch.device, interval_s: float = 0.001):
        self.device = device
        self.interval_s = interval_s
        self.peak: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        _malloc_trim()
        self._base = _rss_bytes()
        if self._base is not None:
            self._max = self._base
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            rss = _rss_bytes()
            if rss is not None and rss > self._max:
                self._max = rss
            time.sleep(self.interval_s)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._base
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.peak = max(self._max - self._base, 0)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA), so that a timer reads the work done."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    name: str,
    fn: Callable[[], Any],
    device: torch.device,
    args: argparse.Namespace,
    part_timers: dict[str, Timer] | None = None,
) -> dict[str, Any]:
    """Run ``fn`` ``--warmup`` times untimed, then ``--iters`` times timed; ``part_timers``
    (see :func:`timed_parts`) are reset to count the timed runs only."""
    times = []
    with PeakMemory(device) as memory:
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
        "peak_mem_mib": None if memory.peak is None else memory.peak / MIB,
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


# --------------------------------------------------------------------------- models
def model_cfg(config_file: str, args: argparse.Namespace, weights: str, extra: Sequence[str] = ()):
    """The config of one model: ``--outputs``, ``--opts``, ``--device``, ``weights`` ("": random
    initialisation), then ``extra``."""
    outputs = []
    if args.outputs != "as-shipped":
        wanted = f"{args.outputs.upper()}_ON"
        for flag in OUTPUT_FLAGS:
            outputs += [f"MODEL.KNET.TEST.{flag}", str(flag == wanted)]
    opts = [*outputs, *args.opts, "MODEL.DEVICE", args.device, "MODEL.WEIGHTS", weights, *extra]
    cfg = get_knet_cfg(config_file, opts)
    cfg.freeze()
    return cfg


def build_predictor(cfg) -> DefaultPredictor:
    """Detectron2's predictor of ``cfg`` (eval mode: weights that do not fit are an error); the
    same random initialisation for every model of the same config."""
    torch.manual_seed(0)
    return DefaultPredictor(cfg)


def floor_backbone(rgb: np.ndarray, device: torch.device, channels_last: bool):
    """Detectron2's R50-FPN (P2-P6) with the settings of the R50 COCO config (random weights)
    and its input, the normalised image padded to a multiple of 32."""
    cfg = get_knet_cfg(DEFAULT_CONFIG)
    torch.manual_seed(0)
    backbone = build_resnet_fpn_backbone(cfg, ShapeSpec(channels=3)).to(device).eval()
    image = image_tensor(rgb, cfg.INPUT.FORMAT).to(device).float()
    mean, std = (
        torch.tensor(v, device=device).view(-1, 1, 1)
        for v in (cfg.MODEL.PIXEL_MEAN, cfg.MODEL.PIXEL_STD)
    )
    padded = ImageList.from_tensors([(image - mean) / std], 32).tensor
    if channels_last:
        padded = padded.contiguous(memory_format=torch.channels_last)
    return lambda: backbone(padded)


def exported_runner(model, cfg, engine: str, folder: str, threads: int) -> ExportedKNet:
    module = KNetExportModule(model)
    sample = torch.randint(0, 256, (3, *EXPORT_SIZE), dtype=torch.uint8)
    if engine == "onnx":
        path = export_onnx(module, sample, os.path.join(folder, "model.onnx"), module.metadata(cfg))
    else:
        path = export_torchscript(
            module, sample, os.path.join(folder, "model.ts"), module.metadata(cfg), "tracing"
        )
    return ExportedKNet(path, num_threads=threads)


# --------------------------------------------------------------------------- accuracy of --amp
def amp_differences(
    predictor: DefaultPredictor, amp_predictor: DefaultPredictor, photos: Sequence[str]
) -> dict[str, Any]:
    """Output differences of ``amp_predictor`` from ``predictor`` (float32) on photos."""
    rows = defaultdict(list)
    for path in photos:
        bgr = read_image(path, format="BGR")
        ref, got = predictor(bgr), amp_predictor(bgr)
        if "panoptic_seg" in ref:
            rows["panoptic id map: pixels differing"].append(
                float((ref["panoptic_seg"][0] != got["panoptic_seg"][0]).float().mean())
            )
        if "instances" in ref:
            rows["instances: max score difference"].append(
                float((ref["instances"].scores - got["instances"].scores).abs().max())
            )
            rows["instances: mask pixels differing"].append(
                float((ref["instances"].pred_masks != got["instances"].pred_masks).float().mean())
            )
        if "sem_seg" in ref:
            rows["sem_seg: max abs difference"].append(
                float((ref["sem_seg"] - got["sem_seg"]).abs().max())
            )
            rows["sem_seg: argmax pixels differing"].append(
                float((ref["sem_seg"].argmax(0) != got["sem_seg"].argmax(0)).float().mean())
            )
    return {"photos": list(photos), **{k: max(v) for k, v in rows.items()}}


# --------------------------------------------------------------------------- training
def training_batch(cfg, rgb: np.ndarray, batch_size: int) -> list[dict[str, Any]]:
    """Synthetic panoptic-style ground truth: elliptical things over horizontal stuff bands."""
    num_classes = cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
    # semantic configs keep the default thing count, which may exceed their class count
    num_things = min(cfg.MODEL.KNET.NUM_THING_CLASSES, num_classes)
    height, width = rgb.shape[:2]
    yy, xx = np.mgrid[0:height, 0:width]
    batch = []
    for b in range(batch_size):
        rng = np.random.default_rng(b)
        sem_seg = np.zeros((height, width), dtype=np.int64)
        if num_classes > num_things:
            stuff = rng.choice(np.arange(num_things, num_classes), size=3)
            sem_seg[:] = stuff[np.minimum(yy * 3 // height, 2)]
        masks, classes = [], []
        for _ in range(5):
            cy, cx = rng.uniform(0.1, 0.9) * height, rng.uniform(0.1, 0.9) * width
            ry, rx = rng.uniform(0.05, 0.25) * height, rng.uniform(0.05, 0.25) * width
            mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
            for m in masks:  # later things occlude earlier ones
                m &= ~mask
            masks.append(mask)
            classes.append(int(rng.integers(num_things)))
        for mask, cls in zip(masks, classes):
            sem_seg[mask] = cls
        instances = Instances((height, width))
        instances.gt_classes = torch.tensor(classes, dtype=torch.int64)
        instances.gt_masks = torch.from_numpy(np.stack(masks))
        batch.append(
            {
                "image": image_tensor(rgb, cfg.INPUT.FORMAT),
                "instances": instances,
                "sem_seg": torch.from_numpy(sem_seg),
            }
        )
    return batch


def time_training(cfg, model, rgb, device, args) -> dict[str, Any]:
    """Detectron2's training step (forward, backward, optimizer step) on :func:`training_batch`."""
    batch = training_batch(cfg, rgb, args.batch_size)
    # SimpleTrainer puts the model in training mode
    trainer = SimpleTrainer(model, itertools.repeat(batch), build_optimizer(cfg, model))
    name = f"training iteration (batch {args.batch_size})"
    with EventStorage() as trainer.storage, torch.enable_grad():
        result = measure(name, trainer.run_step, device, args)
    model.eval()
    return result


# --------------------------------------------------------------------------- benchmark
def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but CUDA is not available")
    height, width = args.size
    rgb, source = benchmark_image(height, width)
    results: dict[str, Any] = {
        "machine": machine_info(device),
        "settings": {
            "input": f"{height}x{width} ({source}), batch {args.batch_size}",
            "weights": args.weights or "random init",
            "warmup / iters": f"{args.warmup} / {args.iters}",
            "outputs": args.outputs,
        },
        "models": [],
        "inference": [],
        "breakdown": [],
    }
    with torch.no_grad():
        floor = measure(
            "Detectron2 R50-FPN backbone (floor)", floor_backbone(rgb, device, False), device, args
        )
        results["inference"].append(floor)
        if device.type == "cpu":
            results["inference"].append(
                measure(
                    "Detectron2 R50-FPN backbone, channels-last (reference)",
                    floor_backbone(rgb, device, True),
                    device,
                    args,
                )
            )
        for i, config_file in enumerate(args.config_file):
            gc.collect()
            _malloc_trim()
            benchmark_model(config_file, i == 0, rgb, device, args, results)
    for m in results["inference"]:
        m["ratio_to_floor"] = m["median_s"] / floor["median_s"]
    return results


def benchmark_model(config_file: str, first: bool, rgb, device, args, results: dict) -> None:
    """Time one model (and, for the first, the breakdown, AMP, exported engines, training)."""
    cfg = model_cfg(config_file, args, args.weights if first else "")
    predictor = build_predictor(cfg)
    model = predictor.model
    name = os.path.splitext(os.path.basename(config_file))[0]
    image = image_tensor(rgb, cfg.INPUT.FORMAT).to(device)
    inputs = [{"image": image}] * args.batch_size
    outputs: dict[str, None] = {}  # the output keys of the first image, in order

    def record_outputs(_module, _inputs, results: list[dict]) -> None:
        outputs.update(dict.fromkeys(results[0]))

    handle = model.register_forward_hook(record_outputs)
    with timed_parts(model if first and args.breakdown else None, device) as part_timers:
        full = measure(f"{name}: eager", lambda: model(inputs), device, args, part_timers)
    handle.remove()
    results["models"].append(
        {
            "config": os.path.relpath(config_file),
            "outputs": "+".join(OUTPUT_NAMES.get(k, k) for k in outputs) or "none",
            "params (M)": round(parameter_count(model)[""] / 1e6, 2),
        }
    )
    if part_timers:
        results["breakdown"] = breakdown_rows(part_timers, full, args)
    images = model.preprocess_image(inputs).tensor
    results["inference"] += [
        full,
        measure(f"{name}: its backbone alone", lambda: model.backbone(images), device, args),
    ]
    if not first:
        return
    if args.amp:
        amp_cfg = model_cfg(config_file, args, args.weights, ["MODEL.KNET.TEST.AMP_DTYPE", "auto"])
        amp_predictor = build_predictor(amp_cfg)
        amp_model = amp_predictor.model
        amp_name = f"{name}: eager, {amp_model.amp_dtype} autocast"
        results["inference"].append(measure(amp_name, lambda: amp_model(inputs), device, args))
        photos = [p for pattern in args.photos for p in sorted(glob.glob(pattern))]
        if photos:
            results["amp"] = amp_differences(predictor, amp_predictor, photos)
    cpu_image = image.cpu()
    for engine in [e for e in args.engines if e != "eager"]:
        with tempfile.TemporaryDirectory() as folder:
            runner = exported_runner(model.cpu(), cfg, engine, folder, args.threads)
            model.to(device)
            calls = lambda run=runner: [run(cpu_image) for _ in range(args.batch_size)]
            results["inference"].append(
                measure(f"{name}: {engine}", calls, torch.device("cpu"), args)
            )
    if args.train:
        results["train"] = time_training(cfg, model, rgb, device, args)


def breakdown_rows(part_timers: dict[str, Timer], full: dict, args) -> list[dict[str, Any]]:
    """Seconds per timed run spent in each part (all its calls), and the rest of the model."""
    rows = []
    for part, timer in part_timers.items():
        per_run = timer.seconds() / args.iters
        rows.append(
            {"name": part, "median_s": per_run, "share_of_full": per_run / full["median_s"]}
        )
    rest = full["median_s"] - sum(r["median_s"] for r in rows)
    rows.append(
        {
            "name": "rest (preprocessing, output conversion)",
            "median_s": rest,
            "share_of_full": rest / full["median_s"],
        }
    )
    return rows


# --------------------------------------------------------------------------- report
def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def format_report(results: dict[str, Any]) -> str:
    info = list(results["machine"].items()) + list(results["settings"].items())
    for i, model in enumerate(results["models"]):
        info += [(f"model {i + 1}: {k}", v) for k, v in model.items()]
    lines = [tabulate(info, tablefmt="github", headers=["machine / settings", ""])]
    rows = [
        (
            m["name"],
            _num(m["median_s"] * 1000, ".1f"),
            _num(m["images_per_s"], ".2f"),
            _num(m["peak_mem_mib"], ".0f"),
            _num(m.get("ratio_to_floor"), ".2f"),
        )
        for m in results["inference"] + ([results["train"]] if "train" in results else [])
    ]
    headers = ["measurement", "median ms", "images/s", "peak mem MiB", "ratio to floor"]
    lines += ["", tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)]
    if results["breakdown"]:
        rows = [
            (m["name"], _num(m["median_s"] * 1000, ".1f"), f"{100 * m['share_of_full']:.1f}")
            for m in results["breakdown"]
        ]
        headers = ["part of the first model (eager)", "ms", "% of the model"]
        lines += ["", tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)]
    if results.get("amp"):
        rows = [
            (k, v if isinstance(v, str) else f"{v:.3g}")
            for k, v in results["amp"].items()
            if k != "photos"
        ]
        lines += [
            "",
            f"mixed precision vs float32 (largest over {len(results['amp']['photos'])} photos):",
        ]
        lines += [tabulate(rows, tablefmt="github", headers=["output", "difference"])]
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
