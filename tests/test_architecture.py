"""The package's layering: no import circle, and ``import knet`` stays free of offline code."""

from __future__ import annotations

import json
import subprocess
import sys

import grimp


def _cycle(graph: grimp.ImportGraph) -> list[str] | None:
    """One import circle among the package's modules (every import counts, also one inside a
    function), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for imported in sorted(graph.find_modules_directly_imported_by(module)):
            if state.get(imported) == 1:
                return path[path.index(imported) :] + [imported]
            if imported not in state and (found := visit(imported)):
                return found
        state[module] = 2
        path.pop()
        return None

    for module in sorted(graph.modules):
        if module not in state and (found := visit(module)):
            return found
    return None


def test_no_import_circle_in_the_package():
    graph = grimp.build_graph("knet", include_external_packages=False)
    cycle = _cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_import_knet_loads_no_conversion_and_no_training_code():
    code = "import json, sys, knet; print(json.dumps(sorted(sys.modules)))"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = json.loads(run.stdout.splitlines()[-1])
    assert not [m for m in loaded if m.startswith(("knet.conversion", "knet.engine"))]
