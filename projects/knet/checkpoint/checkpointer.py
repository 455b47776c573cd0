"""Checkpoint loading and saving for training, evaluation and inference: :class:`KNetCheckpointer`.

It is Detectron2's ``DetectionCheckpointer`` with these differences:

* files are read by :func:`knet.checkpoint.safe_load.load_weights_file`: tensors, numpy arrays and
  plain containers only, never code from the file;
* for a K-Net model, a ``MODEL.WEIGHTS`` file that does not exist or cannot be downloaded raises
  :class:`WeightsNotFoundError`, whose message names, for the files of README's tables, the URL
  to download and the one command that converts it (for any other file, the two converters);
* for a K-Net model in eval mode, a checkpoint that leaves a parameter at its initial value
  (missing key or shape mismatch) is an error naming the parameters: an evaluation of a partly
  random head is never reported; in training mode (fine-tuning) what fits is loaded and the rest
  is summarised in one log line;
* checkpoints and the ``last_checkpoint`` tag are written atomically (temporary file + rename),
  and ``resume_or_load`` falls back to the newest readable checkpoint, with a warning, when the
  tagged one cannot be read.

The project's entry points build it (``KNetTrainer``, ``train_net.py --eval-only``); Detectron2's
``DefaultPredictor`` and ``DefaultTrainer`` build it once
:func:`use_knet_checkpointer_in_detectron2_defaults` has run, which ``import knet`` does.
"""

import glob
import logging
import os
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import IO, Any

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import defaults

from .safe_load import CorruptCheckpointError, load_weights_file

__all__ = [
    "CheckpointMismatchError",
    "KNetCheckpointer",
    "WeightsNotFoundError",
    "use_knet_checkpointer_in_detectron2_defaults",
]

logger = logging.getLogger("knet")
_PACKAGE = __name__.split(".")[0]


class CheckpointMismatchError(RuntimeError):
    """A checkpoint loaded for evaluation leaves some of the model's parameters unset."""


class WeightsNotFoundError(FileNotFoundError):
    """``MODEL.WEIGHTS`` names a file that does not exist or cannot be downloaded."""


def _is_knet_model(model: torch.nn.Module) -> bool:
    model = getattr(model, "module", model)
    return type(model).__module__.startswith(_PACKAGE + ".")


def _short_list(names: Iterable[str], limit: int = 6) -> str:
    """'a.b.weight, a.b.bias, ... (+N more)' grouped by module."""
    groups: dict[str, list[str]] = defaultdict(list)
    for name in sorted(names):
        module, _, leaf = name.rpartition(".")
        groups[module].append(leaf)
    items = [
        f"{m}.{{{','.join(leaves)}}}" if len(leaves) > 1 else f"{m}.{leaves[0]}"
        for m, leaves in groups.items()
    ]
    more = f" (+{len(items) - limit} more modules)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def _weights_hint(path: str) -> str:
    """Where the missing weights file ``path`` comes from, and what else to set."""
    # the model-zoo table is imported only to word this error: ``import knet`` does not load it
    from .model_zoo import weights_help

    tail = " Or set MODEL.WEIGHTS to another file, or to '' to start from random weights."
    return weights_help(path) + tail


def _write_atomically(path: str, write: Callable[[IO[bytes]], object]) -> None:
    """Write through a temporary file renamed over ``path``: a run killed while writing never
    leaves a partial file under the real name."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _end_detectron2_load(checkpointer: DetectionCheckpointer) -> None:
    """Let a checkpointer load again after a load that raised (``resume_or_load`` then tries an
    older checkpoint)."""
    # Detectron2 main (after v0.6; v0.6 has no such attribute) keeps the URL of the file being
    # loaded in this attribute, asserts that it is None when a load starts, and resets it only
    # at the end of a load that succeeded. No public method resets it.
    if getattr(checkpointer, "_parsed_url_during_load", None) is not None:
        checkpointer._parsed_url_during_load = None


class KNetCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` with safe reading, the checks and the atomic saves of the module
    docstring."""

    def load(self, path: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
        if path and _is_knet_model(self.model):
            self._check_weights_file(path)
        try:
            return super().load(path, *args, **kwargs)
        finally:
            _end_detectron2_load(self)

    def _check_weights_file(self, path: str) -> None:
        """Raise :class:`WeightsNotFoundError` if ``path`` is neither a file nor downloadable."""
        if os.path.isfile(path):
            return
        save_dir = self.save_dir
        if save_dir and os.path.dirname(os.path.abspath(path)) == os.path.abspath(save_dir):
            raise WeightsNotFoundError(f"Checkpoint not found: {path}")  # written by training
        if "://" in path:
            try:
                local = self.path_manager.get_local_path(path)
            except Exception as e:  # network and HTTP errors of every kind
                raise WeightsNotFoundError(
                    f"MODEL.WEIGHTS {path} cannot be downloaded ({type(e).__name__}: {e}). "
                    + _weights_hint(path)
                ) from e
            if os.path.isfile(local):
                return
        raise WeightsNotFoundError(
            f"MODEL.WEIGHTS file not found: {path} (working directory {os.getcwd()}). "
            + _weights_hint(path)
        )

    def _load_file(self, filename: str) -> dict[str, Any]:
        """Detectron2's layouts (same return format), read by the restricted loader."""
        self._loading = filename  # named by _log_incompatible_keys
        data = load_weights_file(filename)
        if not isinstance(data, dict):
            raise CorruptCheckpointError(f"{filename} holds a {type(data).__name__}, not a dict")
        if filename.endswith(".pkl") and not ("model" in data and "__author__" in data):
            # Caffe2 / Detectron1 model zoo layout, read as Detectron2 reads it
            data = data.get("blobs", data)
            weights = {k: v for k, v in data.items() if not k.endswith("_momentum")}
            return {"model": weights, "__author__": "Caffe2", "matching_heuristics": True}
        if filename.endswith(".pyth"):  # pycls
            weights = {k: v for k, v in data["model_state"].items() if "num_batches" not in k}
            return {"model": weights, "__author__": "pycls", "matching_heuristics": True}
        return data if "model" in data else {"model": data}

    def _log_incompatible_keys(self, incompatible: Any) -> None:
        """For K-Net models: an error in eval mode, one summary line in training mode."""
        if not _is_knet_model(self.model):
            return super()._log_incompatible_keys(incompatible)
        model = getattr(self.model, "module", self.model)
        path = getattr(self, "_loading", "the checkpoint")
        shapes = {k: (tuple(c), tuple(m)) for k, c, m in incompatible.incorrect_shapes}
        # fvcore drops the mis-shaped keys before loading, so they also come back as missing
        missing = [k for k in incompatible.missing_keys if k not in shapes]
        unexpected = incompatible.unexpected_keys
        unset = sorted(set(missing) | set(shapes))
        details = []
        if shapes:
            # every module, then one example (e.g. the classifiers after a change of class count)
            key, (in_file, in_model) = next(iter(shapes.items()))
            details.append(
                f"{len(shapes)} with another shape ({_short_list(shapes)}; e.g. {key}: {in_file} "
                f"in the file, {in_model} in the model)"
            )
        if missing:
            details.append(f"{len(missing)} not in the file ({_short_list(missing)})")
        if unexpected:
            details.append(f"{len(unexpected)} in the file only ({_short_list(unexpected)})")
        details = ", ".join(details)
        if unset and not model.training:
            raise CheckpointMismatchError(
                f"{path} does not fit the model built from the config: {details}. Evaluating "
                "would use randomly initialised parameters. Check that the config matches the "
                "checkpoint (the converters print the config to use) or convert the checkpoint "
                "again."
            )
        if details:
            total = len(self.model.state_dict())
            logger.warning(
                "Loaded %d of %d parameters and buffers from %s; %s. Those left out keep their "
                "initialisation.",
                total - len(unset),
                total,
                path,
                details,
            )

    def save(self, name: str, **kwargs: Any) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        data.update({key: obj.state_dict() for key, obj in self.checkpointables.items()})
        data.update(kwargs)
        basename = f"{name}.pth"
        path = os.path.join(self.save_dir, basename)
        self.logger.info("Saving checkpoint to %s", path)
        _write_atomically(path, lambda f: torch.save(data, f))
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        tag = os.path.join(self.save_dir, "last_checkpoint")
        _write_atomically(tag, lambda f: f.write(last_filename_basename.encode()))

    def resume_or_load(self, path: str, *, resume: bool = True) -> dict[str, Any]:
        if not (resume and self.has_checkpoint()):
            return self.load(path, checkpointables=[])
        tagged = self.get_checkpoint_file()
        candidates = [tagged] + sorted(
            set(glob.glob(os.path.join(self.save_dir, "*.pth"))) - {tagged},
            key=os.path.getmtime,
            reverse=True,
        )
        for candidate in candidates:
            try:
                return self.load(candidate)
            except (CorruptCheckpointError, FileNotFoundError, AssertionError) as e:
                logger.warning(
                    "Cannot resume from %s (%s); trying an older checkpoint", candidate, e
                )
        raise CorruptCheckpointError(
            f"No readable checkpoint in {self.save_dir} to resume from (tried "
            f"{', '.join(candidates)}); start without --resume or restore a checkpoint"
        )


def use_knet_checkpointer_in_detectron2_defaults() -> None:
    """Make Detectron2's ``DefaultPredictor`` and ``DefaultTrainer`` build a
    :class:`KNetCheckpointer` instead of a ``DetectionCheckpointer``.

    This is the one change ``import knet`` makes to Detectron2. Both classes create their
    checkpointer by the name ``DetectionCheckpointer`` of the module ``detectron2.engine.defaults``
    and offer no option for another class, so that name is bound to the subclass:
    ``DefaultPredictor(cfg)`` then never runs code from a weight file (``.pkl`` or ``.pth``) and
    reports missing, corrupt or mismatching weights as the project's entry points do. The class
    ``DetectionCheckpointer`` itself, and what other modules import under that name, stay as
    Detectron2 wrote them.
    """
    # Detectron2 v0.6 and main: DefaultPredictor.__init__ and DefaultTrainer.__init__ call
    # ``DetectionCheckpointer(...)``, looked up in this module's namespace at each call.
    defaults.DetectionCheckpointer = KNetCheckpointer
