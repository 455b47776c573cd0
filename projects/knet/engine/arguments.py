"""The command line of ``train_net.py`` and the demo: Detectron2's arguments plus ``--dataset``.

``--dataset NAME FORMAT PATH... [OPTION VALUE]...`` registers your own dataset from files; the
formats, their paths and options are the entries of ``DATASET_FORMATS`` in
``knet.data.datasets.custom`` (whose docstring lists them).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from detectron2.config import CfgNode
from detectron2.data.catalog import Metadata

from ..data.datasets.custom import DATASET_FORMATS, register_custom_dataset


class DatasetArgumentError(ValueError):
    """A malformed ``--dataset`` option (the message says what was expected)."""


@dataclass(frozen=True)
class DatasetSpec:
    """One ``--dataset`` option: the arguments of :func:`register_custom_dataset`."""

    name: str
    format: str
    paths: tuple[str, ...]
    options: tuple[tuple[str, Any], ...] = ()  # keyword arguments, sorted

    def register(self, drop_categories: Sequence[str] = (), drop_empty: bool = False) -> Metadata:
        options = dict(self.options, drop_categories=drop_categories, drop_empty=drop_empty)
        return register_custom_dataset(self.name, self.format, *self.paths, **options)


def _usage(fmt: str) -> str:
    spec = DATASET_FORMATS[fmt]
    required = [f"{o} {spec.keyword(o).upper()}" for o in spec.required]
    optional = [f"[{o} {spec.keyword(o).upper()}]" for o in spec.options if o not in spec.required]
    return " ".join(["--dataset NAME", fmt, *spec.positional, *required, *optional])


def dataset_usage() -> str:
    """The accepted forms of ``--dataset``, one per line."""
    return "\n".join(_usage(fmt) for fmt in DATASET_FORMATS)


def parse_dataset_args(argv: Sequence[str]) -> tuple[list[str], list[DatasetSpec]]:
    """(the remaining arguments, for ``argparse``; the groups in order): every ``--dataset NAME
    FORMAT PATH... [OPTION VALUE]...`` group taken out of ``argv``. The number of paths depends on
    FORMAT, so the groups can stand anywhere, also among Detectron2's ``KEY VALUE`` overrides.

    Raises:
        DatasetArgumentError: an unknown format, a missing path or option value, a repeated
            name, or a per-dataset option outside a group that takes it.
    """
    all_options = {o for f in DATASET_FORMATS.values() for o in f.options}
    rest: list[str] = []
    specs: list[DatasetSpec] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        if token.startswith("--dataset="):
            raise DatasetArgumentError("write --dataset NAME FORMAT PATH... without '='")
        if token in all_options:
            raise DatasetArgumentError(
                f"{token} belongs to a dataset: write it right after the paths of its "
                f"'--dataset NAME FORMAT ...' ({dataset_usage()})"
            )
        if token != "--dataset":
            rest.append(token)
            i += 1
            continue
        head = list(argv[i + 1 : i + 3])
        if len(head) < 2 or any(t.startswith("--") for t in head):
            raise DatasetArgumentError(
                f"--dataset needs NAME and FORMAT; one of:\n{dataset_usage()}"
            )
        name, fmt = head
        if fmt not in DATASET_FORMATS:
            raise DatasetArgumentError(
                f"--dataset {name}: unknown format {fmt!r}; one of: {', '.join(DATASET_FORMATS)}"
            )
        spec = DATASET_FORMATS[fmt]
        i += 3
        paths = list(argv[i : i + len(spec.positional)])
        if len(paths) < len(spec.positional) or any(p.startswith("--") for p in paths):
            raise DatasetArgumentError(f"--dataset {name} {fmt} expects: {_usage(fmt)}")
        i += len(paths)
        options: dict[str, Any] = {}
        while i < len(argv) and argv[i] in spec.options:
            option = argv[i]
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                raise DatasetArgumentError(f"--dataset {name}: {option} needs a value")
            value: Any = argv[i + 1]
            if option == "--ignore-label":
                try:
                    value = int(value)
                except ValueError:
                    raise DatasetArgumentError(
                        f"--dataset {name}: --ignore-label must be an integer, got {value!r}"
                    ) from None
            options[spec.keyword(option)] = value
            i += 2
        for option in spec.required:
            if spec.keyword(option) not in options:
                raise DatasetArgumentError(f"--dataset {name} {fmt} needs {option}: {_usage(fmt)}")
        if any(s.name == name for s in specs):
            raise DatasetArgumentError(f"--dataset {name} is given twice")
        specs.append(DatasetSpec(name, fmt, tuple(paths), tuple(sorted(options.items()))))
    return rest, specs


def parse_args_with_datasets(parser: Any, argv: Sequence[str] | None = None) -> Any:
    """``parser.parse_args`` of ``argv`` (default ``sys.argv[1:]``) with ``--dataset`` in its
    help and the ``--dataset`` groups taken out first, as ``args.dataset`` (DatasetSpec list);
    a malformed group is a usage error of ``parser``."""
    parser.add_argument(
        "--dataset",
        action="append",
        default=[],
        metavar="NAME FORMAT PATH",
        help="register a dataset under NAME (repeatable; DATASETS.TRAIN / DATASETS.TEST name "
        "it), one of: "
        + "; ".join(_usage(fmt)[len("--dataset ") :] for fmt in DATASET_FORMATS)
        + " (see datasets/README.md)",
    )
    try:
        rest, datasets = parse_dataset_args(sys.argv[1:] if argv is None else list(argv))
    except DatasetArgumentError as e:
        parser.error(str(e))
    args = parser.parse_args(rest)
    args.dataset = datasets
    return args


def register_dataset_specs(specs: Sequence[DatasetSpec], cfg: CfgNode) -> list[str]:
    """Register every spec (see :func:`register_custom_dataset`) without the categories of
    ``cfg.DATASETS.DROP_CATEGORIES``, those of ``DATASETS.TRAIN`` first; returns their names.
    With ``DATASETS.DROP_EMPTY_CATEGORIES`` the categories without annotations in the training
    datasets are dropped and added to ``DROP_CATEGORIES`` (``cfg`` unfrozen), so that the other
    datasets drop them too and the run's ``config.yaml`` lists them for later commands. Raises
    :class:`DatasetArgumentError` naming the ``--dataset`` whose files or arguments are wrong."""
    train = set(cfg.DATASETS.TRAIN)
    for spec in sorted(specs, key=lambda s: s.name not in train):
        drop = list(cfg.DATASETS.DROP_CATEGORIES)
        try:
            meta = spec.register(drop, cfg.DATASETS.DROP_EMPTY_CATEGORIES and spec.name in train)
        except DatasetArgumentError:
            raise
        except (OSError, ValueError, KeyError) as e:
            paths = " ".join(spec.paths)
            raise DatasetArgumentError(f"--dataset {spec.name} {spec.format} {paths}: {e}") from e
        dropped = meta.get("dropped_categories", [])
        cfg.DATASETS.DROP_CATEGORIES = drop + [n for n in dropped if n not in drop]
    return [s.name for s in specs]
