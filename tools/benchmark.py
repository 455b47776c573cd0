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
reference. ``--breakdown`` times the parts of the first model with forward hooks (backbone,
pixel decoder, kernel head, post-processing) during the timed runs. ``--amp`` adds the model
under ``MODEL.KNET.TEST.AMP_DTYPE auto`` and its output differences from float32 on the
``--photos``. ``--train`` adds one training iteration (forward, backward, step) on synthetic
ground truth.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` above the allocation before the
measurement; on CPU the peak resident set size (sampled every millisecond) above the RSS before
it, after returning freed heap memory to the OS (``malloc_trim``).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import glob
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
from functools import partial
from typing import Any

import cv2
import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from detectron2.modeling.backbone.fpn import build_resnet_fpn_backbone
from detectron2.structures import ImageList, Instances
from detectron2.utils.events import EventStorage
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
        rgb = cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
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


def measure(
    name: str, fn: Callable[[], Any], device: torch.device, args: argparse.Namespace
) -> dict[str, Any]:
    """Run ``fn`` ``--warmup`` times untimed, then ``--iters`` times timed."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    times = []
    with PeakMemory(device) as memory:
        for _ in range(args.warmup):
            fn()
        sync()
        for _ in range(args.iters):
            start = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return {
        "name": name,
        "median_s": median,
        "times_s": times,
        "images_per_s": args.batch_size / median,
        "peak_mem_mib": None if memory.peak is None else memory.peak / MIB,
    }


@contextmanager
def part_timer(
    model: torch.nn.Module | None, device: torch.device
) -> Iterator[dict[str, list[float]]]:
    """Seconds spent in each top-level part of ``model`` while the block runs, from forward
    hooks (pre-hook to hook) on the parts every K-Net has (nothing timed for None)."""
    parts = ["backbone", "pixel_decoder", "kernel_head", "postprocessor"] if model else []
    spent: dict[str, list[float]] = defaultdict(list)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    handles = []
    for name in parts:
        module = getattr(model, name, None)
        if module is None:
            continue
        start: list[float] = []

        def before(*_, start=start):
            sync()
            start.append(time.perf_counter())

        def after(*_, start=start, name=name):
            sync()
            spent[name].append(time.perf_counter() - start.pop())

        handles += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
    try:
        yield spent
    finally:
        for handle in handles:
            handle.remove()


# --------------------------------------------------------------------------- models
def model_cfg(config_file: str, args: argparse.Namespace, extra: Sequence[str] = ()):
    outputs = []
    if args.outputs != "as-shipped":
        wanted = f"{args.outputs.upper()}_ON"
        for flag in OUTPUT_FLAGS:
            outputs += [f"MODEL.KNET.TEST.{flag}", str(flag == wanted)]
    opts = [*outputs, *args.opts, "MODEL.DEVICE", args.device, *extra]
    cfg = get_knet_cfg(config_file, opts)
    cfg.freeze()
    return cfg


def build(cfg, weights: str = "") -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(cfg).eval()  # eval mode: weights that do not fit are an error
    if weights:
        DetectionCheckpointer(model).load(weights)
    return model


def enabled_outputs(model) -> str:
    post = getattr(model, "postprocessor", None)
    if post is None:
        return "semantic"
    flags = {"panoptic": post.panoptic_on, "instance": post.instance_on}
    flags["semantic"] = post.semantic_on
    return "+".join(name for name, on in flags.items() if on) or "none"


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
def amp_differences(model, amp_model, photos: Sequence[str], input_format: str) -> dict[str, Any]:
    """Output differences of ``amp_model`` from ``model`` (float32) on photos (as
    ``DefaultPredictor`` feeds them, short side 800)."""
    from detectron2.data import transforms as T

    resize = T.ResizeShortestEdge(800, 1333)
    rows = defaultdict(list)
    for path in photos:
        rgb = cv2.cvtColor(cv2.imread(path), cv2.COLOR_BGR2RGB)
        rgb = resize.get_transform(rgb).apply_image(rgb)
        inputs = [{"image": image_tensor(rgb, input_format)}]
        with torch.no_grad():
            ref, got = model(inputs)[0], amp_model(inputs)[0]
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
    num_things = cfg.MODEL.KNET.NUM_THING_CLASSES
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
    model.train()
    optimizer = build_optimizer(cfg, model)
    batch = training_batch(cfg, rgb, args.batch_size)

    def train_step() -> None:
        with EventStorage(), torch.enable_grad():
            total = sum(model(batch).values())
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()

    result = measure(f"training iteration (batch {args.batch_size})", train_step, device, args)
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
    cfg = model_cfg(config_file, args)
    model = build(cfg, args.weights if first else "")
    name = os.path.splitext(os.path.basename(config_file))[0]
    image = image_tensor(rgb, cfg.INPUT.FORMAT).to(device)
    inputs = [{"image": image}] * args.batch_size
    results["models"].append(
        {
            "config": os.path.relpath(config_file),
            "outputs": enabled_outputs(model),
            "params (M)": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        }
    )
    with part_timer(model if first and args.breakdown else None, device) as spent:
        full = measure(f"{name}: eager", lambda: model(inputs), device, args)
    if first and args.breakdown:
        results["breakdown"] = breakdown_rows(spent, full, args)
    images = model.preprocess_image(inputs).tensor
    results["inference"] += [
        full,
        measure(f"{name}: its backbone alone", lambda: model.backbone(images), device, args),
    ]
    if not first:
        return
    if args.amp:
        amp_cfg = model_cfg(config_file, args, ["MODEL.KNET.TEST.AMP_DTYPE", "auto"])
        amp_model = build(amp_cfg, args.weights)
        amp_name = f"{name}: eager, {amp_model.amp_dtype} autocast"
        results["inference"].append(measure(amp_name, lambda: amp_model(inputs), device, args))
        photos = [p for pattern in args.photos for p in sorted(glob.glob(pattern))]
        if photos:
            results["amp"] = amp_differences(model, amp_model, photos, cfg.INPUT.FORMAT)
    cpu_image = image.cpu()
    for engine in [e for e in args.engines if e != "eager"]:
        with tempfile.TemporaryDirectory() as folder:
            runner = exported_runner(model.cpu(), cfg, engine, folder, args.threads)
            model.to(device)
            calls = partial(_repeat, runner, cpu_image, args.batch_size)
            results["inference"].append(
                measure(f"{name}: {engine}", calls, torch.device("cpu"), args)
            )
    if args.train:
        results["train"] = time_training(cfg, model, rgb, device, args)


def _repeat(fn: Callable[[Any], Any], value: Any, times: int) -> None:
    for _ in range(times):
        fn(value)


def breakdown_rows(spent: dict[str, list[float]], full: dict, args) -> list[dict[str, Any]]:
    """Median seconds per part over the timed runs (the last ``--iters`` calls of each hook)."""
    rows = []
    for part, seconds in spent.items():
        timed = seconds[-args.iters * (args.batch_size if part == "postprocessor" else 1) :]
        per_run = sum(timed) / args.iters
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
