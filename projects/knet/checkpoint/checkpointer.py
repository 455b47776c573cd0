"""Checkpoint loading and saving for training, evaluation and inference.

Importing ``knet`` calls :func:`install_safe_loading`, which makes Detectron2's
``DetectionCheckpointer`` (used by ``DefaultTrainer``, ``DefaultPredictor``, the demo and
``--eval-only``) behave as follows:

* files are read by :func:`knet.checkpoint.safe_load.load_weights_file`: tensors, numpy arrays and
  plain containers only, never code from the file;
* for a K-Net model in eval mode, a checkpoint that leaves a parameter at its initial value
  (missing key or shape mismatch) is an error naming the parameters: an evaluation of a partly
  random head is never reported; in training mode (fine-tuning) what fits is loaded and the rest
  is summarised in one log line.

:class:`KNetCheckpointer` adds what resuming a training run needs: checkpoints and the
``last_checkpoint`` tag are written atomically (temporary file + rename), and ``resume`` falls
back to the newest readable checkpoint, with a warning, when the tagged one cannot be read.
"""

import glob
import logging
import os
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import torch
from detectron2.checkpoint import DetectionCheckpointer

from .safe_load import CorruptCheckpointError, load_weights_file

__all__ = ["CheckpointMismatchError", "KNetCheckpointer", "install_safe_loading"]

logger = logging.getLogger("knet")
_PACKAGE = __name__.split(".")[0]


class CheckpointMismatchError(RuntimeError):
    """A checkpoint loaded for evaluation leaves some of the model's parameters unset."""


def _load_file(self: DetectionCheckpointer, filename: str) -> dict[str, Any]:
    """``DetectionCheckpointer._load_file`` with the restricted loader (same return format)."""
    self._knet_loading = filename
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


_log_incompatible_keys_detectron2 = DetectionCheckpointer._log_incompatible_keys


def _log_incompatible_keys(self: DetectionCheckpointer, incompatible: Any) -> None:
    """For K-Net models: an error in eval mode, one summary line in training mode."""
    model = getattr(self.model, "module", self.model)
    if not type(model).__module__.startswith(_PACKAGE + "."):
        return _log_incompatible_keys_detectron2(self, incompatible)
    path = getattr(self, "_knet_loading", "the checkpoint")
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
            f"{path} does not fit the model built from the config: {details}. Evaluating would "
            "use randomly initialised parameters. Check that the config matches the checkpoint "
            "(the converters print the config to use) or convert the checkpoint again."
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


def install_safe_loading() -> None:
    """Make every ``DetectionCheckpointer`` load files as described in the module docstring."""
    DetectionCheckpointer._load_file = _load_file
    DetectionCheckpointer._log_incompatible_keys = _log_incompatible_keys


def _atomic_torch_save(data: Any, path: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(data, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class KNetCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` whose saves never leave a partial file under a real name."""

    def save(self, name: str, **kwargs: Any) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        data.update({key: obj.state_dict() for key, obj in self.checkpointables.items()})
        data.update(kwargs)
        basename = f"{name}.pth"
        self.logger.info("Saving checkpoint to %s", os.path.join(self.save_dir, basename))
        _atomic_torch_save(data, os.path.join(self.save_dir, basename))
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        tag = os.path.join(self.save_dir, "last_checkpoint")
        with open(f"{tag}.tmp{os.getpid()}", "w") as f:
            f.write(last_filename_basename)
        os.replace(f"{tag}.tmp{os.getpid()}", tag)

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
