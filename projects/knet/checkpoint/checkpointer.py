"""Checkpoint loading and saving for training, evaluation and inference: :class:`KNetCheckpointer`,
Detectron2's ``DetectionCheckpointer`` except that

* files are read by :func:`knet.checkpoint.safe_load.load_weights_file`, never code from the file;
* for a K-Net model, a ``MODEL.WEIGHTS`` file that does not exist or cannot be downloaded raises
  :class:`WeightsNotFoundError`, naming the URL and the converter command that make it
  (:func:`knet.checkpoint.model_zoo.weights_help`);
* for a K-Net model in eval mode, a checkpoint that leaves a parameter at its initial value
  (missing key or shape mismatch) is an error: an evaluation of a partly random head is never
  reported; in training mode (fine-tuning) what fits is loaded and the rest is summarised in one
  warning, unless the file is another model (it would set less than half of the model from less
  than half of its weights): then it is an error unless ``MODEL.WEIGHTS_PARTIAL``. Each message
  says what the file holds and what the config builds (:func:`describe_weights`), then the keys;
* checkpoints and the ``last_checkpoint`` tag are written atomically (temporary file + rename),
  a failed write removes its temporary file (a killed one's is removed at the next start), and
  ``resume_or_load`` falls back to the readable checkpoint of the highest iteration, with a
  warning, when the tagged one cannot be read.

``import knet`` makes Detectron2's defaults build it too (:mod:`knet.detectron2_defaults`).
"""

import contextlib
import glob
import logging
import os
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import IO, Any

import torch
from detectron2.checkpoint import DetectionCheckpointer

from .safe_load import CorruptCheckpointError, load_weights_file

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
    """'a.b.{weight,bias}, c.weight, ... (+N more modules)': the names grouped by module."""
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


_TEMPORARY = re.compile(r"\.tmp(\d+)$")  # suffix of the files _write_atomically writes


def _write_atomically(path: str, write: Callable[[IO[bytes]], object]) -> None:
    """Write through a temporary file renamed over ``path``: a run killed while writing never
    leaves a partial file under the real name, and a write that fails (disk full) removes its
    temporary file, so that the disk space comes back."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def _remove_stale_temporary_files(folder: str) -> None:
    """Remove the temporary files of writes whose process is gone (killed while writing)."""
    for path in glob.glob(os.path.join(folder, "*.tmp*")):
        match = _TEMPORARY.search(path)
        if not match or _process_is_alive(int(match.group(1))):
            continue
        with contextlib.suppress(OSError):
            size = os.path.getsize(path)
            os.remove(path)
            logger.info("Removed %s (%.1f MB), left by a write that was killed", path, size / 2**20)


def _process_is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        pass
    return True


def _iteration_in_name(path: str) -> float:
    """The iteration of a checkpoint from its file name as the trainer writes it:
    ``model_0001234.pth`` -> 1234, ``model_final.pth`` -> inf (the end), others -> -1."""
    name = os.path.basename(path)
    if name == "model_final.pth":
        return float("inf")
    match = re.fullmatch(r"model_(\d+)\.pth", name)
    return int(match.group(1)) if match else -1


# ResNet block counts per stage -> depth; 18/34 use BasicBlock (no conv3).
RESNET_DEPTHS = {
    ((2, 2, 2, 2), False): 18,
    ((3, 4, 6, 3), False): 34,
    ((3, 4, 6, 3), True): 50,
    ((3, 4, 23, 3), True): 101,
    ((3, 8, 36, 3), True): 152,
}
SWIN_NAMES = {  # (embed dim, depths) -> name
    (96, (2, 2, 6, 2)): "Swin-T",
    (96, (2, 2, 18, 2)): "Swin-S",
    (128, (2, 2, 18, 2)): "Swin-B",
    (192, (2, 2, 18, 2)): "Swin-L",
}
_OFFICIAL_LAYOUTS = {
    "rpn_head.": "an official K-Net checkpoint (MMDetection layout)",
    "decode_head.": "an official semantic K-Net checkpoint (MMSegmentation layout)",
}


def _blocks_per_stage(keys: Sequence[str], pattern: str) -> tuple[int, ...]:
    """By stage, the number of distinct blocks that ``pattern`` (groups: stage, block) finds."""
    blocks = defaultdict(set)
    for key in keys:
        if match := re.search(pattern, key):
            blocks[match.group(1)].add(int(match.group(2)))
    return tuple(len(blocks[s]) for s in sorted(blocks))


def _backbone_of(keys: Sequence[str], shapes: Mapping[str, tuple]) -> str:
    """'ResNet-50', 'ResNet-101 with deformable convs', 'Swin-L', ... as far as keys tell."""
    embed = next(
        (k for k in keys if k.endswith(("embed.proj.weight", "embed.projection.weight"))), None
    )
    if embed:
        depths = _blocks_per_stage(keys, r"(?:layers|stages)\.(\d)\.blocks\.(\d+)\.")
        return SWIN_NAMES.get((shapes[embed][0], depths), "Swin")
    counts = _blocks_per_stage(keys, r"(?:res|layer)([2-5]|[1-4](?=\.))\.(\d+)\.")
    if not counts:
        return "no known backbone"
    bottleneck = any(re.search(r"(res|layer)\w*\.0\.conv3\.", k) for k in keys)
    depth = RESNET_DEPTHS.get((counts, bottleneck), "?")
    deep_stem = any(k.endswith(("stem.conv2.weight", "stem.3.weight")) for k in keys)
    deform = any("offset" in k for k in keys)
    extras = [e for e, on in (("deep stem", deep_stem), ("deformable convs", deform)) if on]
    return f"ResNet-{depth}" + (f" with {' and '.join(extras)}" if extras else "")


def describe_weights(state: Mapping[str, Any]) -> str:
    """What a state dict holds, as far as its keys tell: 'a panoptic / instance K-Net
    (ResNet-50, 133 classes)', 'a semantic K-Net (...)', 'a backbone only (...)', ..."""
    keys = list(state)
    shapes = {k: tuple(getattr(v, "shape", ())) for k, v in state.items()}
    for prefix, layout in _OFFICIAL_LAYOUTS.items():
        if any(k.startswith(prefix) for k in keys):
            return f"{layout}, to convert with tools/convert_official_knet.py"
    backbone = _backbone_of(keys, shapes)
    classifier = next((k for k in keys if k.endswith("stages.0.fc_cls.weight")), None)
    if classifier:
        return f"a panoptic / instance K-Net ({backbone}, {shapes[classifier][0]} classes)"
    if "kernel_head.conv_seg.weight" in shapes:
        classes = shapes["kernel_head.conv_seg.weight"][0]
        return f"a semantic K-Net ({backbone}, {classes} classes)"
    heads = sorted({k.split(".")[0] for k in keys} - {"backbone"})
    if len(heads) <= 2:  # e.g. an ImageNet classifier's fc / norm / head
        return f"a backbone only ({backbone})"
    return f"another model ({backbone}; top-level keys {', '.join(heads[:6])})"


class KNetCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` with the safe reading, checks and atomic saves of the module doc.

    ``allow_partial`` (``MODEL.WEIGHTS_PARTIAL``): for training, load a file that sets less than
    half of the model from less than half of its own weights (by default such a file, another
    model's, is refused; a pretrained backbone or a model of another class count is not).
    ``metadata``: what the saved checkpoints hold under "metadata", next to "model" (the trainer's:
    class names and colours, input format, test sizes; ``knet.data.kinds.model_description``).
    """

    def __init__(self, model: torch.nn.Module, save_dir: str = "", **kwargs: Any) -> None:
        self.allow_partial = kwargs.pop("allow_partial", False)
        self.metadata = kwargs.pop("metadata", None)
        super().__init__(model, save_dir, **kwargs)

    def load(self, path: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
        if path and _is_knet_model(self.model):
            self._check_weights_file(path)
        try:
            return super().load(path, *args, **kwargs)
        finally:
            # Detectron2 main (not v0.6) keeps the URL being loaded in this attribute, asserts it
            # is None when a load starts and resets it (no public method does) only after a load
            # that succeeded; resetting it here lets ``resume_or_load`` try an older checkpoint.
            if getattr(self, "_parsed_url_during_load", None) is not None:
                self._parsed_url_during_load = None

    def _check_weights_file(self, path: str) -> None:
        """Raise :class:`WeightsNotFoundError` if ``path`` is neither a file nor downloadable."""
        if os.path.isfile(path):
            return
        save_dir = self.save_dir
        if save_dir and os.path.dirname(os.path.abspath(path)) == os.path.abspath(save_dir):
            raise WeightsNotFoundError(f"Checkpoint not found: {path}")  # written by training
        # the model-zoo table is imported only to word this error: ``import knet`` does not load it
        from .model_zoo import weights_help

        hint = f"{weights_help(path)} Or set MODEL.WEIGHTS to another file, or to '' to start from "
        hint += "random weights."
        if "://" in path:
            try:
                local = self.path_manager.get_local_path(path)
            except Exception as e:  # network and HTTP errors of every kind
                why = f"{type(e).__name__}: {e}"
                raise WeightsNotFoundError(
                    f"MODEL.WEIGHTS {path} cannot be downloaded ({why}). {hint}"
                ) from e
            if os.path.isfile(local):
                return
        where = f"working directory {os.getcwd()}"
        raise WeightsNotFoundError(f"MODEL.WEIGHTS file not found: {path} ({where}). {hint}")

    def _load_file(self, filename: str) -> dict[str, Any]:
        """Detectron2's layouts (same return format), read by the restricted loader."""
        self._loading = filename  # named by _log_incompatible_keys
        data = load_weights_file(filename)
        if not isinstance(data, dict):
            raise CorruptCheckpointError(f"{filename} holds a {type(data).__name__}, not a dict")
        # a copy: loading drops the mis-shaped entries from the file's dict
        self._file_weights = dict(data.get("model", data.get("blobs", data)))
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
        unset = len(missing) + len(shapes)  # ``missing`` excludes the mis-shaped keys
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
        if not details:
            return
        total = len(model.state_dict())
        file_weights = getattr(self, "_file_weights", {})
        holds = (
            f"{path} holds {describe_weights(file_weights)}; the config builds "
            f"{describe_weights(model.state_dict())}."
        )
        used = len(file_weights) - len(unexpected) - len(shapes)
        another_model = total - unset < total / 2 and used < len(file_weights) / 2
        if unset and not model.training:
            run = os.path.dirname(os.path.abspath(path))
            hint = "the converters print the config to use"
            if os.path.isfile(os.path.join(run, "config.yaml")):
                hint = f"the run's output folder {run} as --config-file has its config"
            raise CheckpointMismatchError(
                f"{holds} Evaluating would use {unset} randomly initialised parameters and "
                f"buffers: check that the config matches the checkpoint ({hint}) or convert the "
                f"checkpoint again.\nKeys: {details}."
            )
        if another_model and not self.allow_partial:
            raise CheckpointMismatchError(
                f"{holds} It would set only {total - unset} of the model's {total} parameters "
                f"and buffers, from {used} of its {len(file_weights)}: most of the model would "
                "train from random values. Set MODEL.WEIGHTS to the intended file, or add "
                f"MODEL.WEIGHTS_PARTIAL True to load what fits.\nKeys: {details}."
            )
        logger.warning(
            f"{holds} Loaded {total - unset} of {total} parameters and buffers; those left out "
            f"keep their initialisation.\nKeys: {details}."
        )

    def save(self, name: str, **kwargs: Any) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        if self.metadata:
            data["metadata"] = self.metadata
        data.update({key: obj.state_dict() for key, obj in self.checkpointables.items()}, **kwargs)
        basename = f"{name}.pth"
        path = os.path.join(self.save_dir, basename)
        self.logger.info("Saving checkpoint to %s", path)
        _write_atomically(path, lambda f: torch.save(data, f))
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        tag = os.path.join(self.save_dir, "last_checkpoint")
        _write_atomically(tag, lambda f: f.write(last_filename_basename.encode()))

    def resume_or_load(self, path: str, *, resume: bool = True) -> dict[str, Any]:
        """Resume from the tagged checkpoint or, when it cannot be read, from the readable one of
        the highest iteration (by the trainer's file names; file times are not used, as copies
        reset them), logging each one skipped and why; else load ``path``."""
        if self.save_dir and self.save_to_disk:
            _remove_stale_temporary_files(self.save_dir)
        if not (resume and self.has_checkpoint()):
            return self.load(path, checkpointables=[])
        tagged = self.get_checkpoint_file()
        others = set(glob.glob(os.path.join(self.save_dir, "*.pth"))) - {tagged}
        candidates = [tagged] + sorted(others, key=lambda p: (_iteration_in_name(p), p))[::-1]
        skipped = []
        for candidate in candidates:
            try:
                checkpoint = self.load(candidate)
            except (CorruptCheckpointError, FileNotFoundError, AssertionError) as e:
                logger.warning("Cannot resume from %s (%s)", candidate, e)
                skipped.append(os.path.basename(candidate))
                continue
            if skipped:
                logger.warning(
                    "Resumed from %s (iteration %s), the readable checkpoint of the highest "
                    "iteration; skipped %s (unreadable, see above)",
                    candidate,
                    checkpoint.get("iteration", "?"),
                    ", ".join(skipped),
                )
            return checkpoint
        raise CorruptCheckpointError(
            f"No readable checkpoint in {self.save_dir} to resume from (tried "
            f"{', '.join(candidates)}); start without --resume or restore a checkpoint"
        )
