"""The web demo and server (demo/server.py), started on 127.0.0.1 as users start it: every output
format decodes back to the model's own outputs, the exported and eager engines agree, bad input
gets its 4xx, a full queue gets 503, a real browser drives the page, and a bounded load runs
without failures or a leak."""

import base64
import concurrent.futures
import io
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow  # a short training run, then servers in subprocesses
pytest.importorskip(
    "fastapi", reason="the server tests need `pip install -r requirements-serve.txt`"
)
httpx = pytest.importorskip("httpx")
from detectron2.engine import DefaultPredictor  # noqa: E402
from panopticapi.utils import rgb2id  # noqa: E402
from PIL import Image  # noqa: E402
from pycocotools import mask as mask_util  # noqa: E402

from knet.engine import KNetTrainer, get_knet_cfg  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TOY = str(REPO / "configs/toy/knet_R18_toy_panoptic.yaml")
# random weights score low: every thing kernel may make a panoptic segment
PANOPTIC = ["MODEL.KNET.TEST.PANOPTIC_THING_SCORE_THRESH", "0.0"]
# every instance out of the model (the server's own setting); ``?threshold`` filters
OPTS = [*PANOPTIC, "MODEL.KNET.TEST.INSTANCES_SCORE_THRESH", "0.0", "MODEL.DEVICE", "cpu"]
STARTUP_S = 120


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RunningServer:
    """``python demo/server.py ARGS --port P`` until the test module ends."""

    def __init__(self, args: list[str], log: Path):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "demo/server.py", "--port", str(self.port), *args]  # --opts last
        self.log = log
        self.proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + STARTUP_S
        while True:
            assert self.proc.poll() is None, log.read_text()[-3000:]
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)

    def post(self, data: bytes, content_type: str = "image/jpeg", **params) -> httpx.Response:
        headers = {"Content-Type": content_type}
        return httpx.post(f"{self.url}/v1/predict", content=data, headers=headers,
                          params=params, timeout=120)  # fmt: skip

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


@pytest.fixture(scope="module")
def weights(toy_root, tmp_path_factory) -> str:
    """The toy model after 80 iterations (segments of several classes), in a file that the
    server and the test both load."""
    out = tmp_path_factory.mktemp("toy_train")
    cfg = get_knet_cfg(
        TOY,
        [
            "INPUT.MIN_SIZE_TRAIN", "(128, 160)", "INPUT.MAX_SIZE_TRAIN", "213",
            "SOLVER.MAX_ITER", "80", "SOLVER.WARMUP_ITERS", "10", "SOLVER.STEPS", "()",
            "SOLVER.BASE_LR", "0.001", "SOLVER.CHECKPOINT_PERIOD", "100000",
            "TEST.EVAL_PERIOD", "0", "DATASETS.TEST", "()", "DATALOADER.NUM_WORKERS", "0",
            "OUTPUT_DIR", str(out),
        ],
    )  # fmt: skip
    trainer = KNetTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    return str(out / "model_final.pth")


@pytest.fixture(scope="module")
def eager_server(weights, tmp_path_factory):
    log = tmp_path_factory.mktemp("server") / "log.txt"
    server = RunningServer(
        ["--config-file", TOY, "--max-upload-mb", "1", "--max-pixels", "4000000",
         "--opts", *PANOPTIC, "MODEL.WEIGHTS", weights],
        log,
    )  # fmt: skip
    yield server
    server.stop()


@pytest.fixture(scope="module")
def predictor(weights) -> DefaultPredictor:
    cfg = get_knet_cfg(TOY, [*OPTS, "MODEL.WEIGHTS", weights])
    return DefaultPredictor(cfg)


@pytest.fixture(scope="module")
def photo(shared_data_root) -> bytes:
    path = Path(shared_data_root) / "coco_panoptic_sample/sample_data/input_images"
    return sorted(path.glob("*.jpg"))[0].read_bytes()


def _decode_png(data: str) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(base64.b64decode(data), np.uint8), cv2.IMREAD_UNCHANGED)


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height (8-bit gray) and holds no pixels."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body)
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


# ----------------------------------------------------------------------------- the API
def test_health_and_model_description(eager_server):
    assert httpx.get(f"{eager_server.url}/healthz").json() == {"status": "ok"}
    model = httpx.get(f"{eager_server.url}/v1/model").json()
    assert model["outputs"] == ["panoptic", "instances", "semantic"]
    assert model["classes"]["thing"] == ["circle", "rectangle", "triangle", "star"]
    assert model["classes"]["stuff"][-3:] == ["sky", "grass", "wall"]
    assert model["engine"] == "pytorch (cpu)" and model["limits"]["max_pixels"] == 4000000
    schema = httpx.get(f"{eager_server.url}/openapi.json").json()
    assert {"/v1/predict", "/v1/model", "/healthz"} <= set(schema["paths"])


@pytest.mark.parametrize("upload", ["multipart", "raw"])
def test_every_output_decodes_to_the_model_outputs(upload, eager_server, predictor, photo):
    """The JSON of one image against ``DefaultPredictor`` with the same weights: panoptic ids and
    segments, instance masks from RLE (threshold 0: all of them), semantic labels."""
    if upload == "multipart":
        files = {"file": ("photo.jpg", photo, "image/jpeg")}
        response = httpx.post(f"{eager_server.url}/v1/predict", files=files,
                              params={"threshold": 0.0}, timeout=120)  # fmt: skip
    else:
        response = eager_server.post(photo, threshold=0.0)
    assert response.status_code == 200, response.text
    got = response.json()
    bgr = np.asarray(Image.open(io.BytesIO(photo)).convert("RGB"))[:, :, ::-1]  # as Detectron2
    with torch.no_grad():
        ref = predictor(bgr)
    assert (got["height"], got["width"]) == bgr.shape[:2]

    ids, segments = ref["panoptic_seg"]
    got_ids = rgb2id(_decode_png(got["panoptic"]["png"])[:, :, ::-1])
    assert np.array_equal(got_ids, ids.numpy())
    keys = ["id", "category_id", "isthing", "area"]
    assert len(segments) > 1
    assert [[s[k] for k in keys] for s in got["panoptic"]["segments_info"]] == [
        [s[k] for k in keys] for s in segments
    ]
    for s, r in zip(got["panoptic"]["segments_info"], segments):
        assert s["score"] == pytest.approx(r["score"], abs=1e-6)
        assert s["name"] in ("circle", "rectangle", "triangle", "star", "sky", "grass", "wall")

    instances = ref["instances"]
    assert len(got["instances"]) == len(instances) > 0
    masks = np.stack([mask_util.decode(d["segmentation"]) for d in got["instances"]])
    assert np.array_equal(masks.astype(bool), instances.pred_masks.numpy())
    scores = [d["score"] for d in got["instances"]]
    np.testing.assert_allclose(scores, instances.scores.numpy(), atol=1e-6)
    assert [d["category_id"] for d in got["instances"]] == instances.pred_classes.tolist()

    labels = _decode_png(got["semantic"]["png"])
    assert np.array_equal(labels, ref["sem_seg"].argmax(0).numpy())
    assert got["semantic"]["classes"][-1] == "wall"


def test_outputs_and_threshold_select(eager_server, photo):
    got = eager_server.post(photo, outputs="instances", threshold=0.9).json()
    assert set(got) == {"height", "width", "engine", "instances"}
    assert all(d["score"] >= 0.9 for d in got["instances"])
    low = eager_server.post(photo, outputs="instances,panoptic", threshold=0.0).json()
    assert len(low["instances"]) >= len(got["instances"]) and "panoptic" in low


@pytest.mark.parametrize(
    "case, status, words",
    [
        ("not an image", 400, "not an image"),
        ("truncated", 400, "truncated"),
        ("content type", 415, "content type"),
        ("empty", 400, "empty"),
        ("0 pixels", 400, "not an image"),  # (Pillow refuses a 0-pixel header)
        ("gigantic", 413, "--max-pixels"),
        ("too large upload", 413, "at most"),
        ("unknown output", 400, "this model gives"),
        ("bad threshold", 422, "threshold"),
    ],
)
def test_bad_input_gets_a_4xx_that_says_what_was_wrong(case, status, words, eager_server, photo):
    ok, png = cv2.imencode(".png", np.full((40, 60, 3), 128, np.uint8))
    data, content_type, params = photo, "image/jpeg", {}
    if case == "not an image":
        data = b"%PDF-1.4 not an image"
    elif case == "truncated":
        data, content_type = png.tobytes()[:-30], "image/png"
    elif case == "content type":
        content_type = "text/plain"
    elif case == "empty":
        data = b""
    elif case == "0 pixels":
        data, content_type = _png_header(0, 10), "image/png"
    elif case == "gigantic":  # 2.5 gigapixels declared: refused from the header
        data, content_type = _png_header(50000, 50000), "image/png"
    elif case == "too large upload":
        data = os.urandom(2 << 20)
    elif case == "unknown output":
        params = {"outputs": "depth"}
    elif case == "bad threshold":
        params = {"threshold": 2}
    response = eager_server.post(data, content_type, **params)
    assert response.status_code == status, response.text
    assert words in response.text
    # the server lives on
    assert httpx.get(f"{eager_server.url}/healthz").status_code == 200


def test_access_log_is_one_json_line_per_request(eager_server):
    httpx.get(f"{eager_server.url}/healthz")
    lines = [line for line in eager_server.log.read_text().splitlines() if '"latency_ms"' in line]
    entry = json.loads(lines[-1][lines[-1].index("{") :])
    assert entry["path"] == "/healthz" and entry["status"] == 200 and entry["latency_ms"] >= 0


# ----------------------------------------------------------------------------- exported engine
@pytest.fixture(scope="module")
def onnx_server(weights, tmp_path_factory):
    pytest.importorskip("onnxruntime")
    folder = tmp_path_factory.mktemp("export")
    result = subprocess.run(
        [sys.executable, "tools/deploy/export_model.py", "--config-file", TOY, "--format", "onnx",
         "--output", str(folder), "--opts", *OPTS, "MODEL.WEIGHTS", weights],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    # and the same model with its panoptic output only, for the requests that ask for no more
    only = ["MODEL.KNET.TEST.INSTANCE_ON", "False", "MODEL.KNET.TEST.SEMANTIC_ON", "False"]
    result = subprocess.run(
        [sys.executable, "tools/deploy/export_model.py", "--config-file", TOY, "--format", "onnx",
         "--output", str(folder / "panoptic"), "--opts", *OPTS, *only, "MODEL.WEIGHTS", weights],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    files = [str(folder / "model.onnx"), str(folder / "panoptic/model.onnx")]
    server = RunningServer(["--model", *files], folder / "log.txt")
    yield server
    server.stop()


def test_exported_and_eager_engines_return_the_same_json(onnx_server, eager_server, photo):
    """An image at the test size (no resizing: the two engines then compute the same thing):
    the same segments and instances, id maps, masks and labels differing on at most 1e-4 of
    the pixels, scores to 1e-4 (the export tolerance of tests/test_export.py)."""
    bgr = cv2.imdecode(np.frombuffer(photo, np.uint8), cv2.IMREAD_COLOR)
    ok, png = cv2.imencode(".png", cv2.resize(bgr, (384, 256), interpolation=cv2.INTER_AREA))
    model = httpx.get(f"{onnx_server.url}/v1/model").json()
    assert model["engine"] == "onnxruntime" and model["classes"]["thing"][0] == "circle"
    eager = eager_server.post(png.tobytes(), "image/png", threshold=0.0).json()
    exported = onnx_server.post(png.tobytes(), "image/png", threshold=0.0).json()
    assert (
        (exported["height"], exported["width"]) == (eager["height"], eager["width"]) == (256, 384)
    )
    pixels = 256 * 384

    ids = [rgb2id(_decode_png(r["panoptic"]["png"])[:, :, ::-1]) for r in (eager, exported)]
    assert int((ids[0] != ids[1]).sum()) <= 1e-4 * pixels
    keys = ["id", "category_id", "isthing", "name"]
    segments = [r["panoptic"]["segments_info"] for r in (eager, exported)]
    assert [[s[k] for k in keys] for s in segments[1]] == [
        [s[k] for k in keys] for s in segments[0]
    ]
    for got, ref in zip(*segments[::-1]):
        assert got["score"] == pytest.approx(ref["score"], abs=1e-4)

    instances = [sorted(r["instances"], key=lambda d: -d["score"]) for r in (eager, exported)]
    assert len(instances[0]) == len(instances[1]) > 0
    for ref, got in zip(*instances):
        assert got["score"] == pytest.approx(ref["score"], abs=1e-4)
        if abs(got["score"] - ref["score"]) < 1e-5 and got["category_id"] == ref["category_id"]:
            differing = mask_util.decode(got["segmentation"]) != mask_util.decode(
                ref["segmentation"]
            )
            assert int(differing.sum()) <= 1e-4 * pixels

    labels = [_decode_png(r["semantic"]["png"]) for r in (eager, exported)]
    assert int((labels[0] != labels[1]).sum()) <= 1e-4 * pixels

    # the panoptic-only file answers a panoptic request: the same segments as the full file
    alone = onnx_server.post(png.tobytes(), "image/png", outputs="panoptic", threshold=0.0)
    alone = alone.json()["panoptic"]
    assert alone["segments_info"] == exported["panoptic"]["segments_info"]
    assert alone["png"] == exported["panoptic"]["png"]


# ----------------------------------------------------------------------------- serving
def test_requests_over_the_queue_get_503_with_retry_after(weights, tmp_path, photo):
    """One inference at a time and no queue: of 6 simultaneous requests, the first is served
    and those arriving while it runs are refused with 503 and ``Retry-After``."""
    server = RunningServer(
        ["--config-file", TOY, "--max-concurrent", "1", "--max-queue", "0",
         "--opts", *PANOPTIC, "MODEL.WEIGHTS", weights],
        tmp_path / "log.txt",
    )  # fmt: skip
    try:
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            responses = list(pool.map(lambda _: server.post(photo), range(6)))
        statuses = sorted(r.status_code for r in responses)
        assert set(statuses) == {200, 503} and statuses.count(200) >= 1, statuses
        busy = [r for r in responses if r.status_code == 503]
        assert all(r.headers["Retry-After"] == "1" and "busy" in r.text for r in busy)
        assert server.post(photo).status_code == 200  # served again once idle
    finally:
        server.stop()


def test_bounded_load_has_no_failure_and_no_leak(weights, tmp_path, shared_data_root):
    """8 clients x 25 requests on the toy model (tools/benchmark_server.py): every request
    served, latency percentiles reported, and the server's memory after the load within 10%
    of its memory after warm-up."""
    images = Path(shared_data_root) / "coco_panoptic_sample/sample_data/input_images"
    report = tmp_path / "load.json"
    result = subprocess.run(
        [sys.executable, "tools/benchmark_server.py", "--images", str(images), "--clients", "8",
         "--requests", "25", "--json", str(report), "--",
         "--config-file", TOY, "--opts", *PANOPTIC, "MODEL.WEIGHTS", weights],
        cwd=REPO, capture_output=True, text=True, timeout=900,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    numbers = json.loads(report.read_text())
    (run,) = numbers["runs"]
    assert run["statuses"] == {"200": 200}, run
    assert 0 < run["p50_ms"] <= run["p95_ms"] and run["images_per_second"] > 0
    assert numbers["after_mb"] <= 1.1 * numbers["warm_mb"], numbers
    print(result.stdout)


# ----------------------------------------------------------------------------- a real browser
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture
def browser():
    """Headless Chromium (Debian's ``chromium`` and ``chromedriver``, installed by
    tools/setup_env.sh) driven by Selenium, which then downloads nothing."""
    webdriver = pytest.importorskip("selenium.webdriver")
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("needs Debian's chromium and chromium-driver (tools/setup_env.sh)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                 "--window-size=1400,1100"]:  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def _table(driver) -> list[list[str]]:
    """The (id, class) columns of the page's segment table, read in one script (the table
    re-renders while the page updates)."""
    return driver.execute_script(
        "return [...document.querySelectorAll('#segments [role=row].virtual-row')].map(row =>"
        " [...row.querySelectorAll('[role=gridcell]')].slice(0, 2)"
        ".map(cell => cell.textContent.trim()))"
    )


def _idle(driver) -> bool:
    """No component of the page is updating (Gradio hides every status tracker)."""
    busy = "[data-testid=status-tracker]:not(.hide)"
    return driver.execute_script(f"return document.querySelectorAll('{busy}').length") == 0


def _wait_for(condition, timeout: float = 90.0, shown=lambda: ""):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"the page did not show the result in time {shown()}"
        time.sleep(0.3)
    return value


def test_the_page_in_a_real_browser(browser, eager_server, shared_data_root, tmp_path):
    """Upload a COCO sample photo, wait for the drawing, check that the table lists the model's
    segments (as the API gives them), switch to instances, move the slider, take a screenshot."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    path = sorted((Path(shared_data_root) / "coco_panoptic_sample/sample_data/input_images")
                  .glob("*.jpg"))[0]  # fmt: skip
    api = {
        (output, threshold): eager_server.post(
            path.read_bytes(), outputs=output, threshold=threshold
        ).json()[output]
        for output, threshold in [("panoptic", 0.5), ("instances", 0.5), ("instances", 0.9)]
    }
    browser.get(eager_server.url)
    upload = _wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#image input[type=file]"))
    upload[0].send_keys(str(path))
    _wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#overlay img[src]"))

    expected = [[str(s["id"]), s["name"]] for s in api["panoptic", 0.5]["segments_info"]]
    assert expected, "the trained toy model finds segments on the photo"
    _wait_for(lambda: _table(browser) == expected, shown=lambda: (_table(browser), expected))

    _wait_for(lambda: _idle(browser))
    browser.save_screenshot(str(tmp_path / "web_demo.png"))
    assert cv2.imread(str(tmp_path / "web_demo.png")).shape[1] == 1400

    browser.find_element(By.CSS_SELECTOR, "#output input[value=instances]").click()
    expected = [[str(i + 1), d["name"]] for i, d in enumerate(api["instances", 0.5])]
    _wait_for(lambda: _table(browser) == expected, shown=lambda: (_table(browser), expected))

    box = browser.find_element(By.CSS_SELECTOR, "#threshold input[type=number]")
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys("0.9", Keys.ENTER)
    expected = [[str(i + 1), d["name"]] for i, d in enumerate(api["instances", 0.9])]
    _wait_for(lambda: _table(browser) == expected, shown=lambda: (_table(browser), expected))
    _wait_for(lambda: _idle(browser))
    assert browser.find_element(By.CSS_SELECTOR, "#overlay img").get_attribute("src")
