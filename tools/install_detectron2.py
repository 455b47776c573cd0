#!/usr/bin/env python
"""Install Detectron2 into the running Python environment.

Detectron2's authors do not publish it on PyPI. Two routes are supported:

* ``--source pypi-sdist`` (default): the ``pb1-detectron2==0.6`` sdist from PyPI (upstream v0.6's
  ``detectron2/`` without the C++ sources), sha256-checked, with the compatibility FIXES below,
  built into a pure-Python wheel ``detectron2==0.6+purepython`` (model-zoo configs and
  ``detectron2.projects.*`` included). The ops of the compiled extension, none of them used by
  K-Net, raise an error saying so.
* ``--source git[=COMMIT]``: ``pip install`` upstream Detectron2 from GitHub (needs internet, a
  compiler and CUDA for its GPU ops). Recommended for GPU users.

An already-installed Detectron2 is kept unless ``--force`` is given.
"""

from __future__ import annotations

import argparse
import hashlib
import html
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path

SDIST_NAME = "pb1-detectron2"
SDIST_VERSION = "0.6"
SDIST_FILE = f"{SDIST_NAME}-{SDIST_VERSION}.tar.gz"
SDIST_SHA256 = "5d2e9e51e523ec72f6a31cca04b0a515492e9514b773a3d134cedc0677170b29"
WHEEL_VERSION = "0.6+purepython"
GIT_URL = "https://github.com/facebookresearch/detectron2.git"
# Source folders of the projects that Detectron2 installs as ``detectron2.projects.<name>``.
PROJECTS = {
    "point_rend": "projects/PointRend/point_rend",
    "deeplab": "projects/DeepLab/deeplab",
    "panoptic_deeplab": "projects/Panoptic-DeepLab/panoptic_deeplab",
}
MISSING_EXT_MODULE = '''\
"""Placeholder for the compiled extension of a pure-Python Detectron2 build."""


class _MissingExtension:
    def __getattr__(self, name):
        raise RuntimeError(
            f"detectron2._C.{name} is not available: this Detectron2 was built without its "
            "compiled C++/CUDA extension (pure-Python build of the PyPI sdist). Operations such as "
            "rotated boxes, detectron2.layers.DeformConv and the fast COCO evaluator need it. "
            "Install Detectron2 from source with a C++ compiler (and CUDA for GPU ops): "
            "python tools/install_detectron2.py --source git --force"
        )


_C = _MissingExtension()
'''
SETUP_PY = f'''from setuptools import find_packages, setup

setup(
    name="detectron2",
    version="{WHEEL_VERSION}",
    description="Detectron2 v0.6, pure-Python build (no compiled extension)",
    url="https://github.com/facebookresearch/detectron2",
    license="Apache-2.0",
    packages=find_packages(include=["detectron2", "detectron2.*"]),
    package_data={{"detectron2.model_zoo": ["configs/**/*.yaml", "configs/**/*.py"]}},
    python_requires=">=3.7",
)
'''
_C_IMPORT = r"^from detectron2 import _C\n"
_C_IMPORT_FIXED = (
    "try:\n"
    "    from detectron2 import _C\n"
    "except ImportError:  # pure-Python build without the compiled extension\n"
    "    from detectron2._missing_extension import _C\n"
)

# (file below detectron2/, regex, replacement, expected number of matches). Every fix must match
# exactly this often, so a different sdist fails loudly instead of being half-patched.
FIXES: list[tuple[str, str, str, int]] = [
    # Pillow 10 removed Image.LINEAR (an alias of BILINEAR).
    ("data/transforms/transform.py", r"interp=Image\.LINEAR\b", "interp=Image.BILINEAR", 1),
    # numpy 1.24 removed the np.int / np.float aliases of the builtins.
    ("evaluation/sem_seg_evaluation.py", r"\bnp\.int\b(?![\d_])", "int", 2),
    ("evaluation/sem_seg_evaluation.py", r"\bnp\.float\b(?![\d_])", "float", 5),
    ("data/build.py", r"\bnp\.int\b(?![\d_])", "int", 2),
    # The compiled extension is absent: import it lazily and fail only when an op is used.
    ("layers/deform_conv.py", _C_IMPORT, _C_IMPORT_FIXED, 1),
    ("layers/rotated_boxes.py", _C_IMPORT, _C_IMPORT_FIXED, 1),
    ("layers/roi_align_rotated.py", _C_IMPORT, _C_IMPORT_FIXED, 1),
    ("evaluation/fast_eval_api.py", _C_IMPORT, _C_IMPORT_FIXED, 1),
]


class InstallError(RuntimeError):
    pass


def log(msg: str) -> None:
    print(f"[install_detectron2] {msg}", flush=True)


def pip(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", *args]
    log("$ " + " ".join(cmd))
    subprocess.run(cmd, check=True)


def installed_detectron2() -> str | None:
    """Version string of the importable Detectron2, or None."""
    if importlib.util.find_spec("detectron2") is None:
        return None
    code = "import detectron2; print(detectron2.__version__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode != 0:
        raise InstallError(
            "A detectron2 package is present but does not import:\n"
            f"{out.stderr.strip()}\nRe-run with --force to replace it."
        )
    return out.stdout.strip()


def sha256_of(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def download_sdist(cache_dir: Path, index_url: str) -> Path:
    """Fetch the sdist from a PEP 503 simple index into ``cache_dir`` and verify its sha256.

    ``pip download`` cannot be used: recent pip refuses the sdist's metadata (it declares a
    direct-URL extra), and preparing that metadata would run its setup.py.
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    target = cache_dir / SDIST_FILE
    if not target.exists():
        page_url = f"{index_url.rstrip('/')}/{SDIST_NAME}/"
        log(f"looking up {SDIST_FILE} in {page_url}")
        with urllib.request.urlopen(page_url, timeout=60) as r:
            page = r.read().decode("utf-8", "replace")
        hrefs = [h for h in re.findall(r'href="([^"]+)"', page) if SDIST_FILE in h]
        links = [urllib.parse.urljoin(page_url, html.unescape(h)) for h in hrefs]
        if not links:
            raise InstallError(f"{SDIST_FILE} is not listed at {page_url}")
        log(f"downloading {links[0].split('#')[0]}")
        partial = target.with_suffix(".part")
        with urllib.request.urlopen(links[0], timeout=300) as r, open(partial, "wb") as f:
            shutil.copyfileobj(r, f)
        partial.rename(target)
    found = sha256_of(target)
    if found != SDIST_SHA256:
        raise InstallError(
            f"{target} has sha256 {found}, expected {SDIST_SHA256}. Delete the file and retry; "
            "if it persists, the upload changed and the compatibility fixes must be re-checked."
        )
    log(f"verified {target.name} (sha256 {found[:12]}...)")
    return target


def apply_fixes(src_root: Path) -> list[str]:
    """Apply FIXES below ``src_root`` (the folder holding ``detectron2/``). Returns a log."""
    applied = []
    for rel, pattern, replacement, expected in FIXES:
        rel, path = f"detectron2/{rel}", src_root / "detectron2" / rel
        text, count = re.subn(pattern, replacement, path.read_text(), flags=re.MULTILINE)
        if count != expected:
            raise InstallError(
                f"fix for {rel}: expected {expected} match(es) of {pattern!r}, found {count}. "
                "This is not the pb1-detectron2 0.6 sdist these fixes were made for."
            )
        path.write_text(text)
        applied.append(f"{rel}: {pattern!r} x{count}")
    (src_root / "detectron2" / "_missing_extension.py").write_text(MISSING_EXT_MODULE)
    return applied


def stage_package(sdist: Path, work: Path) -> Path:
    """Extract the sdist and lay out a pure-Python project ready for ``pip wheel``."""
    with tarfile.open(sdist) as tar:
        # The "data" filter refuses absolute paths and links out of the tree (Python >= 3.8.17).
        tar.extractall(work, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    src = work / f"{SDIST_NAME}-{SDIST_VERSION}"
    stage = work / "stage"
    shutil.copytree(src / "detectron2", stage / "detectron2")
    for name, rel in PROJECTS.items():
        dst = stage / "detectron2" / "projects" / name
        if dst.exists():
            raise InstallError(f"unexpected {dst} in the sdist")
        shutil.copytree(src / rel, dst)
    configs = stage / "detectron2" / "model_zoo" / "configs"
    if not any(configs.rglob("*.yaml")):
        raise InstallError("the sdist has no model_zoo configs")
    for fix in apply_fixes(stage):
        log(f"fixed {fix}")
    (stage / "setup.py").write_text(SETUP_PY)
    shutil.copy(src / "LICENSE", stage / "LICENSE")
    return stage


def install_from_sdist(cache_dir: Path, index_url: str, sdist: Path | None) -> None:
    if sdist is None:
        sdist = download_sdist(cache_dir, index_url)
    elif sha256_of(sdist) != SDIST_SHA256:
        raise InstallError(f"{sdist} is not the expected {SDIST_FILE} (sha256 mismatch)")
    with tempfile.TemporaryDirectory(prefix="d2build-") as tmp:
        stage = stage_package(sdist, Path(tmp))
        wheel_dir = Path(tmp) / "wheels"
        pip("wheel", "--no-deps", "--no-build-isolation", "-w", str(wheel_dir), str(stage))
        wheels = list(wheel_dir.glob("detectron2-*.whl"))
        if len(wheels) != 1:
            raise InstallError(f"expected one detectron2 wheel, found {wheels}")
        pip("install", "--no-deps", "--force-reinstall", str(wheels[0]))


def default_cache_dir() -> Path:
    """``$KNET_CACHE/downloads`` (default ``~/.cache/knet/downloads``)."""
    return Path(os.environ.get("KNET_CACHE", Path.home() / ".cache" / "knet")) / "downloads"


def parse_source(value: str) -> tuple[str, str | None]:
    if value in ("pypi-sdist", "git") or value.startswith("git="):
        source, _, commit = value.partition("=")
        return source, commit or None
    raise argparse.ArgumentTypeError(f"unknown source {value!r}: use pypi-sdist or git[=COMMIT]")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    source = "pypi-sdist (default, offline-friendly) or git[=COMMIT] (upstream, needs internet)"
    add("--source", type=parse_source, default=("pypi-sdist", None), help=source)
    add("--force", action="store_true", help="replace an installed Detectron2")
    cache = "where the downloaded sdist is kept (default: $KNET_CACHE/downloads)"
    add("--cache-dir", type=Path, default=default_cache_dir(), help=cache)
    index = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple")
    add("--index-url", default=index, help="PEP 503 index of the sdist ($PIP_INDEX_URL or PyPI)")
    add("--sdist", type=Path, help=f"use this local {SDIST_FILE} instead")
    args = parser.parse_args(argv)
    source, commit = args.source

    try:
        version = installed_detectron2()
        if version is not None and not args.force:
            log(f"Detectron2 {version} is already installed; keeping it (use --force to replace)")
            return 0
        if importlib.util.find_spec("torch") is None:
            raise InstallError("install torch and torchvision first: Detectron2 needs them")
        if source == "git":
            url = f"git+{GIT_URL}" + (f"@{commit}" if commit else "")
            pip("install", "--no-build-isolation", url)
        else:
            install_from_sdist(args.cache_dir, args.index_url, args.sdist)
        log(f"installed Detectron2 {installed_detectron2()} from {source}")
    except (InstallError, subprocess.CalledProcessError) as e:
        print(f"[install_detectron2] ERROR: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
