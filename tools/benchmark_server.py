#!/usr/bin/env python
"""Throughput of the server (demo/server.py) against its engine, on the same images and outputs.

    python tools/benchmark_server.py --images photos/ --clients 1 2 --requests 25 \\
        [--outputs panoptic] -- --config-file CONFIG --opts MODEL.WEIGHTS model.pth
    python tools/benchmark_server.py --images photos/ -- --model output/export/model.onnx

The arguments after ``--`` are the server's. It first times the engine alone in this process
(images decoded beforehand; each image once as warm-up), then starts the server on 127.0.0.1
and, for each number of clients, sends ``--requests`` requests per client (each client cycles
through the images), and prints images per second, the ratio to the engine, p50 / p95
latency, the status codes, and the server's resident memory after warm-up and after the run.
``--json FILE`` writes the same numbers.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "demo"))

import server as knet_server  # noqa: E402  (demo/server.py)

from knet.visualization import expand_inputs  # noqa: E402


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--images", nargs="+", required=True, help="images, globs or folders")
    add("--clients", type=int, nargs="+", default=[1, 2], help="concurrent clients, per run")
    add("--requests", type=int, default=25, help="requests per client")
    add("--outputs", default="", help="outputs asked for (default: all the model gives)")
    add("--json", help="also write the results to this file")
    return parser.parse_args(argv[:split]), argv[split + 1 :]


def resident_mb(pid: int) -> float:
    """Resident memory of a process (Linux), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def engine_images_per_second(server_argv: list[str], images: list[bytes], outputs: str) -> float:
    """The engine alone: decoded images in, the requested outputs encoded (as the server does)."""
    server = knet_server.build_server(knet_server.parse_args(server_argv))
    decoded = [knet_server.decode_image(data, None, server.limits) for data in images]
    wanted = server.parse_outputs(outputs)

    def one(rgb: np.ndarray) -> None:
        knet_server.encode_outputs(server.infer(rgb, wanted), wanted, server.engine.metadata)

    for rgb in decoded:
        one(rgb)
    start = time.perf_counter()
    for rgb in decoded:
        one(rgb)
    return len(decoded) / (time.perf_counter() - start)


def start_server(server_argv: list[str]) -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    args = [sys.executable, str(REPO / "demo/server.py"), "--port", str(port), "--max-queue", "64"]
    proc = subprocess.Popen([*args, *server_argv], stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise SystemExit("the server did not start within 300 s")
        time.sleep(0.5)


def load(url: str, images: list[bytes], clients: int, requests: int, outputs: str) -> dict:
    """``clients`` threads, each sending ``requests`` requests in turn."""

    def client(index: int) -> list[tuple[int, float]]:
        results = []
        with httpx.Client(timeout=300) as session:
            for i in range(requests):
                data = images[(index + i) % len(images)]
                start = time.perf_counter()
                response = session.post(
                    f"{url}/v1/predict", content=data,
                    headers={"Content-Type": "application/octet-stream"},
                    params={"outputs": outputs} if outputs else None,
                )  # fmt: skip
                results.append((response.status_code, time.perf_counter() - start))
        return results

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = [r for rs in pool.map(client, range(clients)) for r in rs]
    wall = time.perf_counter() - start
    ok = [seconds for status, seconds in results if status == 200]
    return {
        "clients": clients,
        "requests": len(results),
        "statuses": dict(Counter(status for status, _ in results)),
        "images_per_second": len(ok) / wall,
        "p50_ms": 1000 * float(np.percentile(ok, 50)) if ok else None,
        "p95_ms": 1000 * float(np.percentile(ok, 95)) if ok else None,
    }


def main(argv: Sequence[str] | None = None) -> dict:
    args, server_argv = parse_args(argv)
    images = [Path(p).read_bytes() for p in expand_inputs(args.images)]
    engine = engine_images_per_second(server_argv, images, args.outputs)
    print(f"engine alone: {engine:.2f} images/s ({len(images)} images)")
    proc, url = start_server(server_argv)
    try:
        load(url, images, 1, len(images), args.outputs)  # warm-up
        report = {"engine_images_per_second": engine, "warm_mb": resident_mb(proc.pid)}
        report["runs"] = []
        for clients in args.clients:
            run = load(url, images, clients, args.requests, args.outputs)
            run["of_engine"] = run["images_per_second"] / engine
            report["runs"].append(run)
            print(
                f"{clients} client(s): {run['images_per_second']:.2f} images/s "
                f"({100 * run['of_engine']:.0f}% of the engine), p50 {run['p50_ms']:.0f} ms, "
                f"p95 {run['p95_ms']:.0f} ms, statuses {run['statuses']}"
            )
        report["after_mb"] = resident_mb(proc.pid)
        print(f"server memory: {report['warm_mb']:.0f} MB after warm-up, "
              f"{report['after_mb']:.0f} MB after the runs")  # fmt: skip
    finally:
        proc.terminate()
        proc.wait(30)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
