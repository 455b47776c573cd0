#!/usr/bin/env python
"""K-Net behind HTTP: a REST API and a web page on one app (FastAPI, Gradio, uvicorn).

    python demo/server.py --config-file CONFIG --opts MODEL.WEIGHTS model.pth   # eager
    python demo/server.py --model output/export/model.onnx                      # exported file(s)

serves, on ``--host`` (default 127.0.0.1) and ``--port``:

* ``POST /v1/predict`` (``?outputs=panoptic,instances,semantic&threshold=0.5``): an image as the
  multipart field ``file`` or as the raw body -> JSON: the panoptic segmentation as a COCO
  panoptic PNG (base64, id = R + 256 G + 256^2 B) and its segments, the instances as COCO RLE,
  the semantic labels as a PNG (base64);
* ``GET /v1/model`` (config, classes, outputs, engine, limits), ``GET /healthz``, ``GET /docs``
  (the OpenAPI schema, by FastAPI);
* ``/``: the web page (upload or pick an image, choose the output, a confidence slider, the
  drawing, the table of segments, downloads).

One model serves every request: at most ``--max-concurrent`` inferences run at once, at most
``--max-queue`` more wait, and the requests beyond get 503 with ``Retry-After``. Uploads over
``--max-upload-mb``, images over ``--max-pixels`` (read from the header, before decoding), bad
or truncated files get a 4xx that says what was wrong. Every request is logged as one JSON line
with its latency. More in README ("Web demo and server").
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import concurrent.futures
import dataclasses
import io
import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Sequence
from typing import Any

import cv2
import gradio as gr
import numpy as np
import torch
import uvicorn
from detectron2.engine import DefaultPredictor
from detectron2.utils.logger import setup_logger
from detectron2.utils.visualizer import Visualizer
from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse
from panopticapi.utils import id2rgb
from PIL import Image, ImageOps, UnidentifiedImageError

# ``python demo/server.py`` puts demo/ on sys.path, so the sibling module imports directly.
from predictor import build_demo_cfg
from pycocotools import mask as mask_util
from starlette.datastructures import Headers
from starlette.formparsers import MultiPartException, MultiPartParser

from knet.engine.arguments import parse_args_with_datasets
from knet.export import ExportedKNet
from knet.modeling.postprocessing import detectron2_outputs
from knet.visualization import above_threshold, draw_predictions

logger = logging.getLogger("knet.server")
# API output name -> Detectron2's key
OUTPUT_KEYS = {"panoptic": "panoptic_seg", "instances": "instances", "semantic": "sem_seg"}
CONTENT_TYPES = ("image/", "application/octet-stream")


@dataclasses.dataclass(frozen=True)
class Limits:
    max_upload_bytes: int = 20 << 20
    max_pixels: int = 40_000_000
    max_concurrent: int = 1
    max_queue: int = 8
    timeout_s: float = 60.0


class BadInput(Exception):
    """A request the server refuses: an HTTP status and a message for the client."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


# ----------------------------------------------------------------------------- engines
class Engine:
    """One shared model: (H, W, 3) uint8 RGB image -> Detectron2's outputs at that size."""

    name: str
    metadata: Any
    outputs: list[str]  # API output names the model gives

    def __call__(self, rgb: np.ndarray, outputs: Sequence[str]) -> dict[str, Any]:
        """The outputs of ``rgb``: at least the API ``outputs`` asked for."""
        raise NotImplementedError


class EagerEngine(Engine):
    """The model in PyTorch through Detectron2's ``DefaultPredictor``."""

    def __init__(self, cfg):
        self.predictor = DefaultPredictor(cfg)
        self.metadata = self.predictor.metadata  # (the model's classes: ``import knet``)
        self.name = f"pytorch ({cfg.MODEL.DEVICE})"
        test = cfg.MODEL.KNET.TEST
        on = {"panoptic": test.PANOPTIC_ON, "instances": test.INSTANCE_ON}
        on["semantic"] = test.SEMANTIC_ON or cfg.MODEL.META_ARCHITECTURE == "SemanticKNet"
        if cfg.MODEL.META_ARCHITECTURE == "SemanticKNet":
            on.update(panoptic=False, instances=False)
        self.outputs = [name for name in OUTPUT_KEYS if on[name]]

    def __call__(self, rgb: np.ndarray, outputs: Sequence[str]) -> dict[str, Any]:
        return self.predictor(rgb[:, :, ::-1])  # (Detectron2's predictors take BGR)


class ExportedEngine(Engine):
    """Exported files of one model (``knet.export``: ONNX Runtime or TorchScript), run by
    ``ExportedKNet.run_on_image`` (resized like the test loader, outputs at the image size).

    Given files with different output sets (e.g. one exported with only the panoptic output),
    a request runs the one with the fewest outputs that covers it: the semantic scores of 133
    COCO classes at full size dominate the time and memory of a graph with every output."""

    def __init__(self, paths: Sequence[str], threads: int = 0):
        models = [ExportedKNet(path, num_threads=threads) for path in paths]
        if any(m.tracker is not None for m in models):
            raise ValueError(
                "a Video K-Net file tracks objects over the frames of one video, in order; this "
                "server segments independent images: export the image model's config instead"
            )
        given = {"panoptic": "panoptic_seg", "instances": "pred_masks", "semantic": "sem_seg"}
        self.models = sorted(
            (([name for name, key in given.items() if key in m.output_names], m) for m in models),
            key=lambda pair: len(pair[0]),
        )  # fewest outputs first
        self.metadata = self.models[-1][1].class_metadata()
        self.name = "onnxruntime" if paths[0].endswith(".onnx") else "torchscript"
        self.outputs = [name for name in OUTPUT_KEYS if any(name in o for o, _ in self.models)]

    def __call__(self, rgb: np.ndarray, outputs: Sequence[str]) -> dict[str, Any]:
        model = next(m for given, m in self.models if set(outputs) <= set(given))
        image = rgb if model.metadata["input_format"] == "RGB" else rgb[:, :, ::-1]
        return detectron2_outputs(model.run_on_image(image))


# ----------------------------------------------------------------------------- inputs, outputs
def decode_image(data: bytes, content_type: str | None, limits: Limits) -> np.ndarray:
    """An uploaded file -> (H, W, 3) uint8 RGB, EXIF orientation applied; the pixel count is
    checked from the header, before the pixels are decoded."""
    if not data:
        raise BadInput(400, "empty upload: send an image file (JPEG, PNG, ...)")
    if content_type and not content_type.startswith(CONTENT_TYPES):
        raise BadInput(415, f"content type {content_type!r}: send image/* or a file")
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        message = f"{e} (this server takes at most {limits.max_pixels}, --max-pixels)"
        raise BadInput(413, message) from e
    except (UnidentifiedImageError, OSError) as e:
        raise BadInput(400, "not an image, or cut off in its header (Pillow cannot read it)") from e
    width, height = image.size
    if width * height == 0:
        raise BadInput(400, f"image of {width}x{height} pixels: nothing to segment")
    if width * height > limits.max_pixels:
        raise BadInput(
            413,
            f"image of {width}x{height} = {width * height} pixels; this server takes at most "
            f"{limits.max_pixels} (--max-pixels)",
        )
    try:
        image = ImageOps.exif_transpose(image).convert("RGB")
    except (OSError, ValueError, SyntaxError) as e:
        raise BadInput(400, f"truncated or corrupt {image.format} image: {e}") from e
    return np.asarray(image)


def _png(array: np.ndarray) -> str:
    ok, encoded = cv2.imencode(".png", array)
    assert ok, "PNG encoding failed"
    return base64.b64encode(encoded.tobytes()).decode("ascii")


def class_name(metadata: Any, category: int, thing: bool) -> str:
    names = metadata.get("thing_classes" if thing else "stuff_classes", None) or []
    return names[category] if category < len(names) else str(category)


def encode_outputs(predictions: dict[str, Any], outputs: Sequence[str], metadata) -> dict:
    """Detectron2's outputs -> the API's JSON (COCO panoptic PNG + segments, COCO RLE instances,
    semantic label PNG), for the ``outputs`` asked for."""
    result: dict[str, Any] = {}
    if "panoptic" in outputs:
        ids, segments = predictions["panoptic_seg"]
        rgb = id2rgb(ids.cpu().numpy().astype(np.int64))
        result["panoptic"] = {
            "png": _png(np.ascontiguousarray(rgb[:, :, ::-1])),
            "segments_info": [
                {**s, "name": class_name(metadata, s["category_id"], False)} for s in segments
            ],
        }
    if "instances" in outputs:
        instances = predictions["instances"].to("cpu")
        masks = np.asfortranarray(instances.pred_masks.permute(1, 2, 0).numpy().astype(np.uint8))
        rles = mask_util.encode(masks) if len(instances) else []
        boxes = instances.pred_boxes.tensor.numpy()
        result["instances"] = [
            {
                "category_id": int(c),
                "name": class_name(metadata, int(c), True),
                "score": float(score),
                "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])],
                "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")},
            }
            for c, score, b, rle in zip(instances.pred_classes, instances.scores, boxes, rles)
        ]
    if "semantic" in outputs:
        labels = predictions["sem_seg"].argmax(0).cpu().numpy()
        labels = labels.astype(np.uint8 if labels.max(initial=0) < 256 else np.uint16)
        names = [class_name(metadata, i, False) for i in range(predictions["sem_seg"].shape[0])]
        result["semantic"] = {"png": _png(labels), "classes": names}
    return result


# ----------------------------------------------------------------------------- serving
class Server:
    """The shared engine behind a bounded queue: ``max_concurrent`` inferences in threads, at
    most ``max_queue`` more waiting; ``predict`` refuses the rest with 503."""

    def __init__(self, engine: Engine, limits: Limits, config: str = ""):
        self.engine, self.limits, self.config = engine, limits, config
        self.pool = concurrent.futures.ThreadPoolExecutor(limits.max_concurrent, "knet-infer")
        self.lock = threading.Lock()
        self.admitted = 0

    def describe(self) -> dict[str, Any]:
        meta = self.engine.metadata
        return {
            "config": self.config,
            "engine": self.engine.name,
            "outputs": self.engine.outputs,
            "classes": {
                "thing": list(meta.get("thing_classes", None) or []),
                "stuff": list(meta.get("stuff_classes", None) or []),
            },
            "limits": dataclasses.asdict(self.limits),
        }

    def parse_outputs(self, outputs: str | None) -> list[str]:
        wanted = [o.strip() for o in outputs.split(",") if o.strip()] if outputs else []
        unknown = [o for o in wanted if o not in self.engine.outputs]
        if unknown:
            raise BadInput(400, f"outputs {unknown}: this model gives {self.engine.outputs}")
        return wanted or list(self.engine.outputs)

    async def predict(self, rgb: np.ndarray, outputs: Sequence[str]) -> dict[str, Any]:
        """The engine's outputs of one image, run in the pool once a slot is free."""
        with self.lock:
            if self.admitted >= self.limits.max_concurrent + self.limits.max_queue:
                raise BadInput(503, "the server is busy: try again shortly")
            self.admitted += 1
        future = self.pool.submit(self.infer, rgb, outputs)
        future.add_done_callback(self._release)  # the slot is held until the work ends
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), self.limits.timeout_s)
        except TimeoutError:
            raise BadInput(504, f"inference took over {self.limits.timeout_s} s") from None

    def infer(self, rgb: np.ndarray, outputs: Sequence[str]) -> dict[str, Any]:
        with torch.no_grad():
            return self.engine(rgb, outputs)

    def _release(self, _future) -> None:
        with self.lock:
            self.admitted -= 1


async def read_upload(request, limits: Limits) -> tuple[bytes, str | None]:
    """The image bytes of a request (multipart field ``file``, or the raw body) and their
    content type, refused beyond ``max_upload_bytes`` while reading."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limits.max_upload_bytes + (64 << 10):
        raise BadInput(413, f"upload of {declared} bytes; at most {limits.max_upload_bytes}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limits.max_upload_bytes + (64 << 10):
            raise BadInput(413, f"upload over {limits.max_upload_bytes} bytes")
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        return bytes(body), content_type or None

    async def replay():
        yield bytes(body)
        yield b""

    try:
        form = await MultiPartParser(Headers(raw=request.headers.raw), replay()).parse()
    except MultiPartException as e:
        raise BadInput(400, f"malformed multipart body: {e}") from e
    upload = form.get("file")
    if upload is None or isinstance(upload, str):
        raise BadInput(400, "multipart body without a file field named 'file'")
    data = await upload.read()
    if len(data) > limits.max_upload_bytes:
        raise BadInput(413, f"file of {len(data)} bytes; at most {limits.max_upload_bytes}")
    return data, upload.content_type


def build_app(server: Server, examples: Sequence[str] = ()):
    """The FastAPI app: the API, the access log and the web page at ``/``."""
    app = FastAPI(title="K-Net", description=__doc__.split("\n\n")[0], version="1")

    @app.middleware("http")
    async def access_log(request: Request, call_next):
        start = time.perf_counter()
        response = await call_next(request)
        entry = {
            "method": request.method,
            "path": request.url.path,
            "status": response.status_code,
            "latency_ms": round(1000 * (time.perf_counter() - start), 1),
            "client": request.client.host if request.client else None,
        }
        logger.info(json.dumps(entry))
        return response

    @app.exception_handler(BadInput)
    async def refused(_request: Request, error: BadInput):
        headers = {"Retry-After": "1"} if error.status == 503 else None
        return JSONResponse({"error": str(error)}, error.status, headers=headers)

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/v1/model")
    async def model() -> dict:
        return server.describe()

    @app.post(
        "/v1/predict",
        openapi_extra={
            "requestBody": {
                "content": {
                    "multipart/form-data": {
                        "schema": {
                            "type": "object",
                            "properties": {"file": {"type": "string", "format": "binary"}},
                        }
                    },
                    "image/*": {"schema": {"type": "string", "format": "binary"}},
                }
            }
        },
    )
    async def predict(
        request: Request,
        outputs: str | None = Query(
            None, description="comma-separated: panoptic, instances, semantic"
        ),
        threshold: float = Query(0.5, ge=0.0, le=1.0, description="instance / thing score"),
    ) -> dict:
        wanted = server.parse_outputs(outputs)
        data, content_type = await read_upload(request, server.limits)
        rgb = decode_image(data, content_type, server.limits)
        predictions = above_threshold(await server.predict(rgb, wanted), threshold)
        height, width = rgb.shape[:2]
        encoded = encode_outputs(predictions, wanted, server.engine.metadata)
        return {"height": height, "width": width, "engine": server.engine.name, **encoded}

    return gr.mount_gradio_app(app, build_page(server, examples), path="/")


# ----------------------------------------------------------------------------- web page
def build_page(server: Server, examples: Sequence[str] = ()):
    """The Gradio page: image in, drawing + segment table + downloads out."""
    engine = server.engine
    columns = ["id", "class", "score", "area"]

    def show(predictions, rgb, output: str, threshold: float):
        if predictions is None or rgb is None:
            return None, [], None
        kept = above_threshold(predictions, threshold)
        key = OUTPUT_KEYS[output]
        drawing = draw_predictions(Visualizer(rgb, engine.metadata), {key: kept[key]})
        folder = tempfile.mkdtemp(prefix="knet-")
        encoded = encode_outputs(kept, [output], engine.metadata)[output]
        files = []
        if output == "instances":
            rows = [
                [i + 1, d["name"], round(d["score"], 3), int(mask_util.area(d["segmentation"]))]
                for i, d in enumerate(encoded)
            ]
            files.append(_write(folder, "instances.json", json.dumps(encoded)))
        elif output == "panoptic":
            info = encoded["segments_info"]
            rows = [[s["id"], s["name"], round(s["score"], 3), s["area"]] for s in info]
            files.append(_write(folder, "panoptic.png", base64.b64decode(encoded["png"])))
            files.append(_write(folder, "segments_info.json", json.dumps(info)))
        else:
            labels, counts = np.unique(kept["sem_seg"].argmax(0).numpy(), return_counts=True)
            rows = [[int(c), encoded["classes"][c], None, int(n)] for c, n in zip(labels, counts)]
            files.append(_write(folder, "semantic.png", base64.b64decode(encoded["png"])))
        return drawing.get_image(), rows, files

    def run(rgb, output: str, threshold: float):
        if rgb is None:
            return None, None, [], None
        rgb = np.ascontiguousarray(rgb[:, :, :3])
        try:  # the page's requests wait in the same queue as the API's
            predictions = asyncio.run(server.predict(rgb, engine.outputs))
        except BadInput as e:
            raise gr.Error(str(e)) from e  # (shown on the page)
        return (predictions, *show(predictions, rgb, output, threshold))

    with gr.Blocks(title="K-Net") as page:
        gr.Markdown(f"# K-Net\nEngine: {engine.name}. Upload or drop an image.")
        predictions = gr.State(None)
        with gr.Row():
            image = gr.Image(type="numpy", label="Image", elem_id="image")
            overlay = gr.Image(label="Result", interactive=False, elem_id="overlay")
        with gr.Row():
            output = gr.Radio(
                engine.outputs, value=engine.outputs[0], label="Output", elem_id="output"
            )
            threshold = gr.Slider(
                0, 1, value=0.5, step=0.05, label="Confidence threshold", elem_id="threshold"
            )
        table = gr.Dataframe(headers=columns, label="Segments", elem_id="segments")
        files = gr.File(label="Downloads", file_count="multiple")
        if examples:
            gr.Examples(list(examples), inputs=image)
        image.change(run, [image, output, threshold], [predictions, overlay, table, files])
        for control in (output.change, threshold.change):
            control(show, [predictions, image, output, threshold], [overlay, table, files])
    return page


def _write(folder: str, name: str, data: str | bytes) -> str:
    path = os.path.join(folder, name)
    with open(path, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    return path


# ----------------------------------------------------------------------------- command line
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--config-file", metavar="FILE", help="eager model: its config")
    model.add_argument(
        "--model", nargs="+", metavar="FILE", help="exported model.onnx or model.ts (several: "
        "files of one model with different outputs; each request runs the smallest that fits)"
    )  # fmt: skip
    add("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    add("--port", type=int, default=8000)
    add("--max-concurrent", type=int, default=1, help="inferences at once (one shared model)")
    add("--max-queue", type=int, default=8, help="requests waiting; beyond: 503")
    add("--max-upload-mb", type=float, default=20.0)
    add("--max-pixels", type=int, default=40_000_000, help="largest image accepted (W x H)")
    add("--timeout", type=float, default=60.0, help="seconds an inference may take (504)")
    add("--threads", type=int, default=0, help="CPU threads of the engine (0: default)")
    add("--examples", nargs="*", default=[], help="images offered on the page")
    add("--opts", nargs=argparse.REMAINDER, default=[], help="config overrides (KEY VALUE ...)")
    return parse_args_with_datasets(parser, argv)


def build_server(args: argparse.Namespace) -> Server:
    limits = Limits(
        int(args.max_upload_mb * (1 << 20)), args.max_pixels, args.max_concurrent,
        args.max_queue, args.timeout,
    )  # fmt: skip
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.model:
        return Server(ExportedEngine(args.model, args.threads), limits, " ".join(args.model))
    # every instance comes out of the model; ``?threshold`` (default 0.5) filters per request
    opts = ["MODEL.KNET.TEST.INSTANCES_SCORE_THRESH", "0.0", *args.opts]
    cfg = build_demo_cfg(args.config_file, opts, datasets=args.dataset)
    return Server(EagerEngine(cfg), limits, args.config_file)


def main(argv: Sequence[str] | None = None) -> None:
    setup_logger(name="knet")
    args = parse_args(argv)
    server = build_server(args)
    app = build_app(server, args.examples)
    logger.info(
        "Serving %s (%s) on http://%s:%d", server.config, server.engine.name, args.host, args.port
    )

    uvicorn.run(app, host=args.host, port=args.port, access_log=False, log_level="warning")


if __name__ == "__main__":
    main()
