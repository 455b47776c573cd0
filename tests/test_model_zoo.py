"""The model zoo: each of the 14 released K-Net checkpoints converts into its config.

For every row of ``MODEL_ZOO`` a full-size synthetic checkpoint with the real key names and
shapes (stride-0 tensors: no memory) is written by ``references.layouts``; its architecture must
be detected from the keys, select that row and config, and convert with no missing, unexpected
or mis-shaped key against the model the config builds. README's tables are the ones
``knet.checkpoint.model_zoo`` generates, and ``import knet`` loads neither that table nor the
converters (``knet.conversion``).
"""

import re
import subprocess
import sys

import pytest
import torch
from references.layouts import make_released_checkpoint
from scripts import REPO, load_script

from knet.checkpoint.model_zoo import MODEL_ZOO, PRETRAINED_BACKBONES, find_model_zoo_entry
from knet.conversion import (
    convert_official_knet_state_dict,
    describe_official_knet_state_dict,
    model_state_shapes,
)
from knet.engine import get_knet_cfg


def test_the_zoo_has_the_14_released_checkpoints():
    assert len(MODEL_ZOO) == len({e.file for e in MODEL_ZOO}) == 14
    by_task = [e.task for e in MODEL_ZOO]
    assert (by_task.count("panoptic"), by_task.count("instance"), by_task.count("semantic")) == (
        5,
        2,
        7,
    )
    for entry in MODEL_ZOO:
        assert (REPO / entry.config).is_file(), entry.config
        assert re.fullmatch(r"\w[\w.-]+_\d{8}_\d{6}-[0-9a-f]{8}", entry.file), entry.file
        assert entry.url.startswith("https://download.openmmlab.com/") and entry.url.endswith(
            f"/{entry.file}.pth"
        )


@pytest.mark.parametrize("entry", MODEL_ZOO, ids=[e.file.split("_20")[0] for e in MODEL_ZOO])
def test_released_checkpoint_converts_into_its_config(entry):
    checkpoint = make_released_checkpoint(entry)
    info = describe_official_knet_state_dict(checkpoint)
    assert info.architecture == entry.architecture
    assert find_model_zoo_entry(info.architecture, entry.file + ".pth") == entry
    shapes = model_state_shapes(get_knet_cfg(str(REPO / entry.config)))
    converted = convert_official_knet_state_dict(checkpoint, shapes)  # strict both ways
    bn_counters = {k for k in shapes if k.endswith("num_batches_tracked")}
    assert set(converted) | bn_counters == set(shapes)
    assert all(tuple(v.shape) == shapes[k] for k, v in converted.items())


def test_readme_lists_every_checkpoint_with_its_config_and_command(capsys):
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Model zoo") :]
    section = section[: section.index("\n## ", 4)]
    # the tables are the generated ones, to the character
    assert load_script("tools/convert_official_knet.py").main(["--markdown"]) == 0
    for table in capsys.readouterr().out.strip().split("\n\n"):
        lines = section[section.index(table.split("\n")[0]) :].split("\n")
        in_readme = "\n".join(lines[: next(i for i, x in enumerate(lines) if x[:1] != "|")])
        assert in_readme == table, "paste `python tools/convert_official_knet.py --markdown`"
    for entry in MODEL_ZOO:
        row = next((line for line in section.splitlines() if entry.file in line), None)
        assert row is not None, f"{entry.file} missing from README's model zoo"
        assert entry.config in row and f"{entry.result:.2f}".rstrip("0").rstrip(".") in row
    assert "python tools/convert_official_knet.py" in section
    for pretrained in PRETRAINED_BACKBONES:
        assert pretrained.url in section and pretrained.converted in section


def test_cli_picks_the_config_from_the_file(tmp_path, capsys):
    """The documented command alone converts a released file (here the R-50 instance one)."""
    entry = next(e for e in MODEL_ZOO if e.task == "instance" and e.backbone == "R-50")
    src, dst = tmp_path / f"{entry.file}.pth", tmp_path / "converted.pth"
    torch.save(make_released_checkpoint(entry), src)
    assert load_script("tools/convert_official_knet.py").main([str(src), str(dst)]) == 0
    out = capsys.readouterr().out
    assert f"model zoo: {entry.file} (mask AP 34.0), config {entry.config}" in out
    assert f"--config-file {REPO / entry.config} --eval-only" in out
    assert dst.stat().st_size > 100e6  # the full-size model


def test_1x_and_3x_files_of_one_architecture_select_their_own_config():
    arch = ("panoptic", "R-50", "", 256)
    one_x, three_x = (e for e in MODEL_ZOO if e.architecture == arch)
    assert find_model_zoo_entry(arch, f"{one_x.file}.pth") == one_x
    assert find_model_zoo_entry(arch, f"{three_x.file}.pth") == three_x
    assert find_model_zoo_entry(arch, "renamed.pth") == one_x
    assert find_model_zoo_entry(("panoptic", "R-50", "", 32)) == one_x  # narrower: same row
    assert find_model_zoo_entry(("panoptic", "R-18", "", 256)) is None


def test_import_knet_loads_neither_the_converters_nor_the_model_zoo():
    offline = "('knet.conversion', 'knet.checkpoint.model_zoo')"
    code = f"import sys, knet; print([m for m in sys.modules if m.startswith({offline})])"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"
