"""Environment report: Detectron2's, plus what this project depends on.

python -m knet.collect_env
"""

import importlib.metadata
import importlib.util
import json
import os
import platform
from typing import Any

from tabulate import tabulate


def detectron2_source() -> str:
    """How Detectron2 was installed: the pure-Python sdist build, a git/URL install, or other."""
    try:
        dist = importlib.metadata.distribution("detectron2")
    except importlib.metadata.PackageNotFoundError:
        return "not installed through pip (source tree on sys.path?)"
    if "purepython" in dist.version:
        return "PyPI sdist pb1-detectron2 0.6, pure-Python build (tools/install_detectron2.py)"
    direct_url = dist.read_text("direct_url.json")
    if direct_url:
        info = json.loads(direct_url)
        commit = info.get("vcs_info", {}).get("commit_id", "")
        return f"{info.get('url', '?')} {commit}".strip()
    return f"pip distribution {dist.version}"


def has_compiled_ops() -> bool:
    try:
        from detectron2 import _C  # noqa: F401
    except ImportError:
        return False
    return True


def machine_info(device: str = "cpu") -> dict[str, Any]:
    """What timings depend on: CPU model, usable CPUs, torch threads, versions, load, device."""
    import detectron2
    import torch

    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    info: dict[str, Any] = {
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
    if torch.device(device).type == "cuda":
        info["device name"] = torch.cuda.get_device_name(device)
    return info


def collect_knet_env() -> str:
    import detectron2
    import torch

    import knet  # noqa: F401  (registers datasets; fails loudly if the package is broken)

    rows = [
        ("knet", importlib.metadata.version("knet-detectron2")),
        ("detectron2", f"{detectron2.__version__} @ {detectron2.__file__}"),
        ("detectron2 source", detectron2_source()),
        (
            "detectron2._C (compiled ops)",
            "yes" if has_compiled_ops() else "no (not needed by K-Net)",
        ),
        ("panopticapi", "yes" if importlib.util.find_spec("panopticapi") else "no (needed for PQ)"),
        ("pycocotools", importlib.metadata.version("pycocotools")),
        ("torch", f"{torch.__version__}, CUDA available: {torch.cuda.is_available()}"),
    ]
    return tabulate(rows, tablefmt="simple")


def main() -> None:
    from detectron2.utils.collect_env import collect_env_info

    print(collect_env_info())
    print()
    print(collect_knet_env())


if __name__ == "__main__":
    main()
