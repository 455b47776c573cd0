"""Run K-Net on images and videos and draw the results with Detectron2's visualizers.

``VisualizationDemo`` follows Detectron2's demo: a ``DefaultPredictor`` (or, with
``parallel=True``, an :class:`AsyncPredictor`) plus ``Visualizer`` / ``VideoVisualizer`` with the
class names and colours of the model (:func:`knet.data.kinds.model_metadata`).
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing as mp
from collections import deque
from collections.abc import Iterator, Sequence
from itertools import takewhile
from typing import Any

import cv2
import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.engine import DefaultPredictor
from detectron2.structures import Instances
from detectron2.utils.video_visualizer import VideoVisualizer
from detectron2.utils.visualizer import ColorMode, VisImage, Visualizer

from knet.config import load_knet_config  # importing knet registers its models and datasets
from knet.data.kinds import model_metadata
from knet.engine.arguments import DatasetSpec, register_dataset_specs
from knet.engine.dataset_config import configure_for_datasets
from knet.visualization import draw_predictions, draw_tracked_objects

logger = logging.getLogger("knet.demo")


def build_demo_cfg(
    config_file: str,
    opts: Sequence[str] = (),
    confidence_threshold: float | None = None,
    datasets: Sequence[DatasetSpec] = (),
) -> CfgNode:
    """A frozen K-Net config for inference, ``MODEL.DEVICE`` ``cpu`` when CUDA is asked for but
    absent. ``config_file`` may be a run's output folder (``knet.config.load_knet_config``: its
    config and last checkpoint). ``datasets`` (``--dataset`` options) are registered first:
    unset class counts are taken from them (``knet.engine.dataset_config``, inference mode).
    ``confidence_threshold`` sets the instance and panoptic-thing score thresholds before
    ``opts``, which still win."""
    thresholds = []
    if confidence_threshold is not None:
        for key in ["INSTANCES_SCORE_THRESH", "PANOPTIC_THING_SCORE_THRESH"]:
            thresholds += [f"MODEL.KNET.TEST.{key}", str(float(confidence_threshold))]
    cfg, explicit_keys = load_knet_config(config_file, thresholds + list(opts))
    register_dataset_specs(datasets, cfg)
    configure_for_datasets(cfg, explicit_keys, mode="inference")
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        logger.info("CUDA is not available: running on CPU (MODEL.DEVICE cpu).")
        cfg.MODEL.DEVICE = "cpu"
    cfg.freeze()
    return cfg


def count_predictions(predictions: dict[str, Any]) -> str:
    """A short human-readable summary of one image's outputs, e.g. ``"12 segments (5 things)"``."""
    parts = []
    if "panoptic_seg" in predictions:
        segments_info = predictions["panoptic_seg"][1] or []
        things = sum(1 for s in segments_info if s.get("isthing", False))
        parts.append(f"{len(segments_info)} segments ({things} things)")
    if "instances" in predictions:
        parts.append(f"{len(predictions['instances'])} instances")
    if "sem_seg" in predictions:
        num_classes = int(predictions["sem_seg"].argmax(dim=0).unique().numel())
        parts.append(f"{num_classes} semantic classes")
    return ", ".join(parts) if parts else "no outputs"


def _to_cpu(predictions: dict[str, Any]) -> dict[str, Any]:
    """Move one image's outputs to the CPU (panoptic tuple, Instances, tensors)."""
    out = dict(predictions)
    for key, value in predictions.items():
        if key == "panoptic_seg":
            out[key] = (value[0].cpu(), value[1])
        elif isinstance(value, (torch.Tensor, Instances)):
            out[key] = value.to("cpu")
    return out


class VisualizationDemo:
    """Predict and visualise K-Net outputs for single images or video streams."""

    def __init__(
        self, cfg: CfgNode, instance_mode: ColorMode = ColorMode.IMAGE, parallel: bool = False
    ):
        """``parallel``: predict in worker processes (one per GPU, or one on CPU), video frames
        while earlier ones are drawn; ``instance_mode``: Detectron2's colour mode."""
        self.metadata = model_metadata(cfg)
        self.instance_mode = instance_mode
        # a video model (VideoKNet) tracks across the frames it sees: in order, in one process
        self.tracking = cfg.MODEL.META_ARCHITECTURE == "VideoKNet"
        # the clip-level model (VideoKNetClip) segments a whole video at once
        self.clip = cfg.MODEL.META_ARCHITECTURE == "VideoKNetClip"
        self.threshold = cfg.MODEL.KNET.TEST.INSTANCES_SCORE_THRESH
        workers = 1 if self.tracking else None
        self.parallel = parallel = parallel and not self.clip
        self.predictor: Any = AsyncPredictor(cfg, workers) if parallel else DefaultPredictor(cfg)

    def _refuse_clip_model(self) -> None:
        if self.clip:
            raise ValueError(
                "VideoKNetClip segments whole videos (its objects are those of the clip): give "
                "--video-input, or use a frame-by-frame model (VideoKNet, KNet)"
            )

    def run_on_image(self, image: np.ndarray) -> tuple[dict[str, Any], VisImage | None]:
        """(H, W, 3) uint8 BGR image -> (the model's outputs, their RGB drawing at that size, as
        :func:`knet.visualization.draw_predictions` draws them)."""
        self._refuse_clip_model()
        predictions = self.predictor(image)
        visualizer = Visualizer(image[:, :, ::-1], self.metadata, instance_mode=self.instance_mode)
        vis_output = draw_predictions(visualizer, predictions)
        return predictions, vis_output

    def run_on_clip(self, frames: list[np.ndarray]) -> Iterator[np.ndarray]:
        """A clip-level model on (H, W, 3) uint8 BGR ``frames``, the whole video in one batch
        (resized like the test loader); yields each frame's BGR drawing: the objects scoring at
        least the confidence threshold, each in the colour of its id in every frame."""
        predictor = self.predictor
        inputs = []
        for frame in frames:
            image = frame[:, :, ::-1] if predictor.input_format == "RGB" else frame
            resized = predictor.aug.get_transform(image).apply_image(image)
            tensor = torch.as_tensor(np.ascontiguousarray(resized.transpose(2, 0, 1)))
            inputs.append({"image": tensor, "height": frame.shape[0], "width": frame.shape[1]})
        if not inputs:
            return
        with torch.no_grad():
            (video,) = predictor.model([{"frames": inputs}])
        keep = (video["pred_scores"] >= self.threshold).nonzero().squeeze(1).cpu()
        classes = video["pred_labels"].cpu()[keep].tolist()
        ids = (keep + 1).tolist()  # an object's id is its rank in the video
        for t, frame in enumerate(frames):
            visualizer = Visualizer(frame[:, :, ::-1], self.metadata)
            masks = video["pred_masks"][keep.to(video["pred_masks"].device), t]
            drawing = draw_tracked_objects(visualizer, masks, classes, ids)
            yield cv2.cvtColor(drawing.get_image(), cv2.COLOR_RGB2BGR)

    def run_on_video(self, video: cv2.VideoCapture) -> Iterator[np.ndarray]:
        """Predict and draw every frame of an opened ``cv2.VideoCapture``; yields (H, W, 3) uint8
        BGR drawings in input order."""
        visualizer = VideoVisualizer(self.metadata, self.instance_mode)

        def draw(frame: np.ndarray, predictions: dict[str, Any]) -> np.ndarray:
            rgb = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
            if tracking:  # colours by track id: the same object keeps its colour
                vis = draw_predictions(Visualizer(rgb, self.metadata), predictions)
                return cv2.cvtColor(vis.get_image(), cv2.COLOR_RGB2BGR)
            if "panoptic_seg" in predictions:
                panoptic_seg, segments = predictions["panoptic_seg"]
                vis = visualizer.draw_panoptic_seg_predictions(rgb, panoptic_seg.cpu(), segments)
            elif "instances" in predictions:
                vis = visualizer.draw_instance_predictions(rgb, predictions["instances"].to("cpu"))
            elif "sem_seg" in predictions:
                vis = visualizer.draw_sem_seg(rgb, predictions["sem_seg"].argmax(dim=0).cpu())
            else:
                return frame
            return cv2.cvtColor(vis.get_image(), cv2.COLOR_RGB2BGR)

        frames = (frame for _, frame in takewhile(lambda read: read[0], iter(video.read, None)))
        if self.clip:
            yield from self.run_on_clip(list(frames))
            return
        tracking = self.tracking
        if tracking and not self.parallel:
            self.predictor.model.reset()  # a new video
        if not self.parallel:
            for frame in frames:
                yield draw(frame, self.predictor(frame))
            return

        # Keep up to ``buffer_size`` frames in flight, yield them in order as results arrive.
        pending: deque = deque()
        for frame in frames:
            pending.append(frame)
            self.predictor.put(frame)
            if len(pending) >= self.predictor.default_buffer_size:
                yield draw(pending.popleft(), self.predictor.get())
        while pending:
            yield draw(pending.popleft(), self.predictor.get())


def _predictor_worker(cfg: CfgNode, task_queue: Any, result_queue: Any) -> None:
    """A worker process's loop: one ``DefaultPredictor``, (index, image) in, (index, outputs) out
    until a None task."""
    predictor = DefaultPredictor(cfg)
    for index, image in iter(task_queue.get, None):
        result_queue.put((index, _to_cpu(predictor(image))))


class AsyncPredictor:
    """``DefaultPredictor`` run in worker processes (one per GPU, or a single CPU worker).

    ``put(image)`` queues an image, ``get()`` returns the outputs of the images in the order they
    were put; ``predictor(image)`` does both. Outputs come back on the CPU.
    """

    def __init__(self, cfg: CfgNode, num_workers: int | None = None):
        num_gpus = torch.cuda.device_count() if cfg.MODEL.DEVICE.startswith("cuda") else 0
        num_workers = max(num_gpus, 1) if num_workers is None else num_workers
        ctx = mp.get_context("spawn")
        self.task_queue, self.result_queue = ctx.Queue(), ctx.Queue()
        self.workers: list[mp.Process] = []
        for i in range(num_workers):
            worker_cfg = cfg.clone()
            worker_cfg.defrost()
            worker_cfg.MODEL.DEVICE = f"cuda:{i % num_gpus}" if num_gpus else "cpu"
            args = (worker_cfg, self.task_queue, self.result_queue)
            self.workers.append(mp.Process(target=_predictor_worker, args=args, daemon=True))
            self.workers[-1].start()
        self._next_put = self._next_get = 0
        self._ready: dict[int, dict[str, Any]] = {}  # results that came back before their turn
        self._closed = False
        atexit.register(self.shutdown)

    @property
    def default_buffer_size(self) -> int:
        """How many frames a video loop should keep in flight."""
        return len(self.workers) * 5

    def __len__(self) -> int:
        return self._next_put - self._next_get

    def put(self, image: np.ndarray) -> None:
        self.task_queue.put((self._next_put, image))
        self._next_put += 1

    def get(self) -> dict[str, Any]:
        if len(self) == 0:
            raise RuntimeError("AsyncPredictor.get() called with no image queued")
        wanted = self._next_get
        self._next_get += 1
        while wanted not in self._ready:
            index, result = self.result_queue.get()
            self._ready[index] = result
        return self._ready.pop(wanted)

    def __call__(self, image: np.ndarray) -> dict[str, Any]:
        self.put(image)
        return self.get()

    def shutdown(self) -> None:
        """Stop the workers (also called at interpreter exit)."""
        if self._closed:
            return
        self._closed = True
        for _ in self.workers:
            self.task_queue.put(None)
        for worker in self.workers:
            worker.join(timeout=10)
            if worker.is_alive():
                worker.terminate()
