"""Every third-party import of the product code is a listed requirement, and the tested pins in
constraints.txt satisfy the requirements."""

import ast
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
PRODUCT = ["projects", "tools", "demo", "train_net.py"]
REQUIREMENTS = [
    "requirements.txt",
    "requirements-export.txt",
    "requirements-serve.txt",
    "requirements-nodeps.txt",
]
# the package, demo/predictor.py and demo/server.py (imported by demo/demo.py and
# tools/benchmark_server.py) and the tools' own modules, which
# the scripts next to them import
OWN = {"knet", "predictor", "server"} | {p.stem for p in (REPO / "tools").glob("*.py")}
# installed by tools/install_detectron2.py (not on PyPI); torch and torchvision: constraints.txt
INSTALLED_APART = {"detectron2", "torch", "torchvision"}


def requirements(path: Path) -> dict[str, Requirement]:
    reqs = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line and not line.startswith("-"):
            req = Requirement(line)
            reqs[canonicalize_name(req.name)] = req
    return reqs


def imported_modules() -> set[str]:
    """Top-level names of every absolute import in the product code."""
    files = [p for name in PRODUCT for p in ([REPO / name] if name.endswith(".py") else
             (REPO / name).rglob("*.py"))]  # fmt: skip
    names = set()
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - OWN


def test_every_import_is_a_requirement():
    listed = set(INSTALLED_APART)
    for name in REQUIREMENTS:
        listed |= set(requirements(REPO / name))
    distributions = metadata.packages_distributions()
    missing = {}
    for module in sorted(imported_modules()):
        dists = {canonicalize_name(d) for d in distributions.get(module, [module])}
        if not dists & listed:
            missing[module] = sorted(dists)
    assert missing == {}, f"imported but not in {REQUIREMENTS}: {missing}"


def test_constraints_satisfy_the_requirements():
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            req = Requirement(line)
            (version,) = [spec.version for spec in req.specifier if spec.operator == "=="]
            pins[canonicalize_name(req.name)] = version
    unpinned, outside = [], []
    for name in ["requirements.txt", "requirements-export.txt", "requirements-serve.txt"]:
        for dist, req in requirements(REPO / name).items():
            if dist not in pins:
                unpinned.append(dist)
            elif not req.specifier.contains(pins[dist], prereleases=True):
                outside.append(f"{req} (constraints.txt: {pins[dist]})")
    assert unpinned == [], f"not pinned in constraints.txt: {unpinned}"
    assert outside == [], f"pins outside the requirement: {outside}"
