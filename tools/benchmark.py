#!/usr/bin/env python
"""Inference (and optionally training) speed and peak memory of K-Net versus a ResNet backbone.

    python tools/benchmark.py --threads 2                      # R50 COCO panoptic, 800x1216, CPU
    python tools/benchmark.py --threads 2 --config-file configs/coco/panoptic-segmentation/\
{knet_R50_bs16_1x,knet_R101_DCN_bs16_ms3x,knet_swin_L_bs32_ms3x}.yaml   # several models
    python tools/benchmark.py --device cuda --iters 20 --warmup 5 --train --batch-size 2
    python tools/benchmark.py --breakdown --output-json bench.json

Each model is built from its config with random weights (``--weights`` loads a checkpoint into
the first) and run in eval mode under ``torch.no_grad()`` on one image ``{"image": (3, H, W)
float, "height": H, "width": W}`` (a photo resized to ``--size``, fed as is: no test-time
resize), i.e. the full forward including normalisation, padding and the post-processing of every
output enabled in ``MODEL.KNET.TEST``; its own backbone is timed alone too. The reference floor,
timed once in the same run, is Detectron2's ResNet-50 + FPN backbone (``build_resnet_fpn_backbone``
with the settings of ``knet_R50_bs16_1x.yaml``) on the normalised padded image; every ratio is
to it. ``--breakdown`` times the parts of the first model separately: each output's
post-processing alone and, when several are enabled, all of them together as the full model runs
them (with panoptic on, the instance masks come from the merge's maps). ``--train`` adds one
training iteration of the first model (forward, backward, optimizer step) on synthetic ground
truth.

The panoptic merge evaluates the full-resolution mask maps only where bounds from the stride-4
maps leave its result undecided, so its time depends on the predictions: with random weights
(nearly constant masks) it is lower than with a trained model.

Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` above the memory allocated before the
measurement; on CPU, the peak resident set size (sampled from ``/proc/self/statm`` every
millisecond by a background thread) above the RSS before the measurement, after returning freed
heap memory to the OS with ``malloc_trim``.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import statistics
import sys
import threading
import time
from contextlib import contextmanager
from functools import partial
from typing import Any, Callable, Dict, Iterator, List, Sequence, Tuple

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
from knet.solver import build_optimizer

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(
    REPO_ROOT, "configs", "coco", "panoptic-segmentation", "knet_R50_bs16_1x.yaml"
)
MIB = 1024.0**2


# --------------------------------------------------------------------------- arguments
def parse_size(text: str) -> Tuple[int, int]:
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
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs before timing")
    parser.add_argument("--iters", type=int, default=3, help="timed runs")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    parser.add_argument("--weights", default="", help="checkpoint to load (default: random init)")
    parser.add_argument("--breakdown", action="store_true", help="time the model's parts")
    parser.add_argument("--train", action="store_true", help="also time a training iteration")
    parser.add_argument("--batch-size", type=int, default=2, help="images per training iteration")
    parser.add_argument("--output-json", metavar="FILE", help="save the results as JSON")
    parser.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="KEY VALUE overrides")
    args = parser.parse_args(argv)
    if args.iters < 1 or args.warmup < 0 or args.batch_size < 1:
        parser.error("--iters and --batch-size must be >= 1, --warmup >= 0")
    return args


# --------------------------------------------------------------------------- machine
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> Dict[str, Any]:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 0
    import detectron2

    info = {
        "cpu": cpu_model(),
        "cpus available": cpus,
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
        info["cuda"] = torch.version.cuda
    else:
        info["device name"] = info["cpu"]
    return info


# --------------------------------------------------------------------------- input
def synthetic_photo(height: int, width: int) -> np.ndarray:
    """A deterministic natural-looking RGB image: sky/ground gradients, soft shapes, texture."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    y, x = yy / max(height - 1, 1), xx / max(width - 1, 1)
    horizon = 0.55 + 0.05 * np.sin(6.0 * x)
    sky = np.stack([0.45 + 0.3 * y, 0.65 + 0.2 * y, 0.95 - 0.1 * y], axis=-1)
    ground = np.stack([0.35 - 0.1 * y, 0.5 - 0.15 * y, 0.2 + 0.0 * y], axis=-1)
    img = np.where((y < horizon)[..., None], sky, ground)
    for _ in range(12):
        cy, cx = rng.uniform(0.2, 0.9), rng.uniform(0.0, 1.0)
        ry, rx = rng.uniform(0.03, 0.2), rng.uniform(0.03, 0.2)
        inside = ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2
        alpha = np.clip(1.5 - inside, 0.0, 1.0)[..., None]
        color = rng.uniform(0.1, 0.9, size=3).astype(np.float32)
        shade = (1.0 - 0.4 * np.clip(inside, 0.0, 1.0))[..., None]
        img = img * (1 - alpha) + color * shade * alpha
    noise = rng.normal(0.0, 0.02, size=(height, width, 1)).astype(np.float32)
    img = cv2.GaussianBlur(img + noise, (0, 0), 1.0)
    return (np.clip(img, 0.0, 1.0) * 255).astype(np.uint8)


def benchmark_image(height: int, width: int) -> Tuple[np.ndarray, str]:
    """(H, W, 3) uint8 RGB: matplotlib's Grace Hopper photo if available, else synthetic."""
    try:
        from matplotlib import cbook

        path = cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
        bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if bgr is None:
            raise OSError(path)
        rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        return cv2.resize(rgb, (width, height), interpolation=cv2.INTER_LINEAR), "grace_hopper.jpg"
    except (ImportError, OSError, ValueError):
        return synthetic_photo(height, width), "synthetic"


def model_input(rgb: np.ndarray, input_format: str) -> Dict[str, Any]:
    """The dict ``DefaultPredictor`` would build (float CHW on the CPU, no resize)."""
    image = rgb if input_format == "RGB" else rgb[:, :, ::-1]
    tensor = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)).astype("float32"))
    return {"image": tensor, "height": rgb.shape[0], "width": rgb.shape[1]}


def training_batch(cfg, rgb: np.ndarray, batch_size: int) -> List[Dict[str, Any]]:
    """Synthetic panoptic-style ground truth on ``rgb`` (uint8 CHW images, as a mapper gives):
    a few elliptical things over horizontal stuff bands."""
    num_classes = cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
    num_things = cfg.MODEL.KNET.NUM_THING_CLASSES
    height, width = rgb.shape[:2]
    image = rgb if cfg.INPUT.FORMAT == "RGB" else rgb[:, :, ::-1]
    image_t = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
    yy, xx = np.mgrid[0:height, 0:width]
    batch = []
    for b in range(batch_size):
        rng = np.random.default_rng(b)
        sem_seg = np.zeros((height, width), dtype=np.int64)
        if num_classes > num_things:
            stuff = rng.choice(np.arange(num_things, num_classes), size=3)
            bands = np.minimum(yy * 3 // height, 2)
            sem_seg[:] = stuff[bands]
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
                "image": image_t,
                "height": height,
                "width": width,
                "instances": instances,
                "sem_seg": torch.from_numpy(sem_seg),
            }
        )
    return batch


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
            return
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.peak = max(self._max - self._base, 0)


def measure(
    fn: Callable[[], Any], device: torch.device, warmup: int, iters: int
) -> Dict[str, float | None]:
    """Run ``fn`` ``warmup`` times untimed then ``iters`` times timed; seconds and peak memory."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    times = []
    with PeakMemory(device) as mem:
        for _ in range(warmup):
            fn()
        sync()
        for _ in range(iters):
            start = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - start)
    return {
        "median_s": statistics.median(times),
        "mean_s": statistics.mean(times),
        "times_s": times,
        "peak_mem_mib": None if mem.peak is None else mem.peak / MIB,
    }


@contextmanager
def only_output(model: torch.nn.Module, task: str) -> Iterator[None]:
    """Temporarily enable only one of the model's outputs ("panoptic", "instance", "semantic")."""
    flags = ("panoptic_on", "instance_on", "semantic_on")
    saved = {f: getattr(model, f) for f in flags}
    try:
        for f in flags:
            setattr(model, f, f == f"{task}_on")
        yield
    finally:
        for f, v in saved.items():
            setattr(model, f, v)


def describe_outputs(outputs: Dict[str, Any]) -> str:
    """e.g. ``"panoptic_seg: 12 segments, instances: 100, sem_seg: (133, 800, 1216)"``."""
    parts = []
    for key, value in outputs.items():
        if key == "panoptic_seg":
            parts.append(f"{key}: {len(value[1] or [])} segments")
        elif key == "instances":
            parts.append(f"{key}: {len(value)}")
        else:
            parts.append(f"{key}: {tuple(value.shape)}")
    return ", ".join(parts)


# --------------------------------------------------------------------------- benchmark
def build(config_file: str, args: argparse.Namespace, weights: str = ""):
    cfg = get_knet_cfg(config_file, list(args.opts) + ["MODEL.DEVICE", args.device])
    cfg.MODEL.WEIGHTS = weights
    cfg.freeze()
    torch.manual_seed(0)
    model = build_model(cfg).eval()  # eval mode: weights that do not fit are an error
    if weights:
        DetectionCheckpointer(model).load(weights)
    return cfg, model


def floor_backbone(rgb: np.ndarray, device: torch.device) -> Tuple[torch.nn.Module, torch.Tensor]:
    """Detectron2's R50-FPN (P2-P6) with the settings of the R50 COCO config (random weights)
    and its input: the normalised image padded to a multiple of 32."""
    cfg = get_knet_cfg(DEFAULT_CONFIG)
    torch.manual_seed(0)
    backbone = build_resnet_fpn_backbone(cfg, ShapeSpec(channels=3)).to(device).eval()
    image = model_input(rgb, cfg.INPUT.FORMAT)["image"].to(device)
    mean, std = (
        torch.tensor(v, device=device).view(-1, 1, 1)
        for v in (cfg.MODEL.PIXEL_MEAN, cfg.MODEL.PIXEL_STD)
    )
    return backbone, ImageList.from_tensors([(image - mean) / std], 32).tensor


def time_breakdown(model, inp, images, full_s: float, device, n) -> List[Dict[str, Any]]:
    """Preprocessing, backbone, pixel decoder, kernel head and each post-processing alone."""
    enabled = [t for t in ("panoptic", "instance", "semantic") if getattr(model, f"{t}_on")]
    features = model.backbone(images.tensor)
    decoded = model.pixel_decoder.forward_features(features)
    last = model.kernel_head(*decoded)["stages"][-1]
    parts: List[Tuple[str, Callable[[], Any]]] = [
        ("preprocess (normalise, pad)", lambda: model.preprocess_image([inp])),
        ("backbone", lambda: model.backbone(images.tensor)),
        ("pixel decoder", lambda: model.pixel_decoder.forward_features(features)),
        ("kernel head", lambda: model.kernel_head(*decoded)),
    ]
    if not getattr(model, "is_semantic", False):
        for task in enabled:

            def post(task: str = task) -> Any:
                with only_output(model, task):
                    return model.inference(last, [inp], images)

            parts.append((f"post-processing: {task} alone", post))
    in_sum = [True] * len(parts)
    if len(enabled) > 1:
        # As in the full model: with panoptic on, the instance masks come from the merge's
        # maps, so the outputs cost less together than one by one.
        in_sum[-len(enabled) :] = [False] * len(enabled)
        parts.append(
            (f"post-processing: {'+'.join(enabled)}", lambda: model.inference(last, [inp], images))
        )
        in_sum.append(True)
    rows = []
    for (name, fn), summed in zip(parts, in_sum):
        m = measure(fn, device, *n)
        m.update(name=name, share_of_full=m["median_s"] / full_s, in_sum=summed)
        rows.append(m)
    return rows


def time_training(cfg, model, rgb, args, device, n) -> Dict[str, Any]:
    model.train()
    optimizer = build_optimizer(cfg, model)
    batch = training_batch(cfg, rgb, args.batch_size)

    def train_step() -> None:
        with EventStorage():
            losses = model(batch)
            total = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()

    m = measure(train_step, device, *n)
    m.update(name=f"training iteration (batch {args.batch_size})", ratio_to_backbone=None)
    m["images_per_s"] = args.batch_size / m["median_s"]
    model.eval()
    return m


def run(args: argparse.Namespace) -> Dict[str, Any]:
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but CUDA is not available")
    height, width = args.size
    rgb, image_source = benchmark_image(height, width)
    n = (args.warmup, args.iters)
    results: Dict[str, Any] = {
        "machine": machine_info(device),
        "settings": {
            "input": f"{height}x{width} ({image_source})",
            "weights": args.weights or "random init",
            "warmup / iters": f"{args.warmup} / {args.iters}",
        },
        "models": [],
        "inference": [],
        "breakdown": [],
    }
    with torch.no_grad():
        floor_model, padded = floor_backbone(rgb, device)
        floor = measure(partial(floor_model, padded), device, *n)
        floor["name"] = "Detectron2 R50-FPN backbone (floor)"
        floor_model = None
        for i, config_file in enumerate(args.config_file):
            model = None
            gc.collect()
            _malloc_trim()
            cfg, model = build(config_file, args, args.weights if i == 0 else "")
            name = os.path.splitext(os.path.basename(config_file))[0]
            inp = model_input(rgb, cfg.INPUT.FORMAT)
            images = model.preprocess_image([inp])
            full = measure(partial(model, [inp]), device, *n)
            backbone = measure(partial(model.backbone, images.tensor), device, *n)
            full["name"], backbone["name"] = f"{name} (full model)", f"{name}: backbone alone"
            results["inference"] += [full, backbone]
            enabled = [t for t in ("panoptic", "instance", "semantic") if getattr(model, f"{t}_on")]
            results["models"].append(
                {
                    "config": os.path.relpath(config_file),
                    "outputs": "+".join(enabled) or "none",
                    "params (M)": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
                    "model output": describe_outputs(model([inp])[0]),
                }
            )
            if args.breakdown and i == 0:
                results["breakdown"] = time_breakdown(
                    model, inp, images, full["median_s"], device, n
                )
    results["inference"].append(floor)
    for m in results["inference"]:
        m["images_per_s"] = 1.0 / m["median_s"]
        m["ratio_to_backbone"] = m["median_s"] / floor["median_s"]
    if args.train:
        if len(args.config_file) > 1:
            model = None
            cfg, model = build(args.config_file[0], args, args.weights)
        results["train"] = time_training(cfg, model, rgb, args, device, n)
    return results


# --------------------------------------------------------------------------- report
def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f}"


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def format_report(results: Dict[str, Any]) -> str:
    info_rows = [(k, v) for k, v in results["machine"].items()]
    info_rows += [(k, v) for k, v in results["settings"].items()]
    for i, model in enumerate(results["models"]):
        info_rows += [(f"model {i + 1}: {k}", v) for k, v in model.items()]
    lines = [tabulate(info_rows, tablefmt="github", headers=["machine / settings", ""])]
    rows = []
    for m in results["inference"] + ([results["train"]] if "train" in results else []):
        rows.append(
            (
                m["name"],
                _ms(m["median_s"]),
                _ms(m["mean_s"]),
                _num(m["images_per_s"], ".2f"),
                _num(m["peak_mem_mib"], ".0f"),
                _num(m["ratio_to_backbone"], ".2f"),
            )
        )
    headers = ["measurement", "median ms", "mean ms", "images/s", "peak mem MiB", "ratio"]
    lines += ["", tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)]
    lines.append(
        "ratio: median time / median time of Detectron2's R50-FPN backbone. peak mem: "
        + (
            "max_memory_allocated above the baseline."
            if results["machine"]["device"].startswith("cuda")
            else "peak RSS above the pre-measurement RSS."
        )
    )
    if results["breakdown"]:
        rows = [
            (m["name"], _ms(m["median_s"]), _ms(m["mean_s"]), f"{100 * m['share_of_full']:.1f}")
            for m in results["breakdown"]
        ]
        total = sum(m["median_s"] for m in results["breakdown"] if m.get("in_sum", True))
        full = results["breakdown"][0]["median_s"] / results["breakdown"][0]["share_of_full"]
        rows.append(
            ("sum of parts (all outputs once)", _ms(total), "", f"{100 * total / full:.1f}")
        )
        headers = ["part", "median ms", "mean ms", "% of full model"]
        lines += ["", tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)]
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
