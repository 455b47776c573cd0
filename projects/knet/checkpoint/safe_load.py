"""Reading weight files without running code from them.

A pickle can name any Python callable, so unpickling an untrusted file can run arbitrary code.
``torch.load(..., weights_only=True)`` and :class:`TensorUnpickler` only rebuild tensors, numpy
arrays and plain containers; anything else is refused with an :class:`UnsafeCheckpointError`
naming the file and the offending global; a file that cannot be decoded at all (empty,
truncated, not a checkpoint) raises :class:`CorruptCheckpointError`. Every entry point reads
weights this way, through :class:`knet.checkpoint.KNetCheckpointer`.
"""

import codecs
import collections
import io
import os
import pickle
import re
from typing import Any

import numpy as np
import torch

try:
    from numpy._core import multiarray
except ImportError:  # numpy < 2
    from numpy.core import multiarray


class UnsafeCheckpointError(pickle.UnpicklingError):
    """The file holds Python objects other than tensors, numpy arrays and plain containers."""


class CorruptCheckpointError(ValueError):
    """The file is empty, truncated or not a checkpoint."""


def _refused(path: str, what: str) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(
        f"Refused to load {path}: it references {what}, which is not a tensor, numpy array or "
        "plain container, and unpickling it could run code. If you trust the file, re-save its "
        f"weights as plain tensors with `python tools/resave_trusted_checkpoint.py {path} "
        "OUTPUT.pth` (official K-Net / MMSeg / ImageNet files: the converters' --allow-pickle "
        "option) and load OUTPUT.pth instead."
    )


def _corrupt(path: str, reason: str) -> CorruptCheckpointError:
    size = os.path.getsize(path)
    return CorruptCheckpointError(
        f"{path} ({size} bytes) is corrupt, truncated or not a checkpoint ({reason}). "
        "Download or convert it again."
    )


def _tensor_from_bytes(data: bytes) -> Any:
    # torch pickles a tensor's storage as a nested torch.save; read it with the same restriction
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


# what rebuilds numpy arrays; ``weights_only`` torch.load needs them besides its defaults
_NUMPY_GLOBALS: dict[tuple, Any] = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    **{
        (module, name): getattr(multiarray, name)
        for module in ("numpy.core.multiarray", "numpy._core.multiarray")
        for name in ("_reconstruct", "scalar")
    },
    # dtype classes in numpy >= 1.25 pickles
    **{("numpy.dtypes", n): getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")},
}
_ALLOWED_GLOBALS: dict[tuple, Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("_codecs", "encode"): codecs.encode,  # how protocol-2 pickles store bytes
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _tensor_from_bytes,
    **_NUMPY_GLOBALS,
}


class TensorUnpickler(pickle.Unpickler):
    """An unpickler that rebuilds only numpy arrays, tensors and plain containers."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[(module, name)]
        raise UnsafeCheckpointError(f"{module}.{name}")  # named in full by load_weights_file


def _load_pickle(path: str) -> Any:
    with open(path, "rb") as f:
        try:
            return TensorUnpickler(f, encoding="latin1").load()
        except UnsafeCheckpointError as e:
            raise _refused(path, str(e)) from None
        except pickle.UnpicklingError:
            raise _corrupt(path, "its pickle data cannot be decoded") from None
        except Exception as e:  # noqa: BLE001 - only allow-listed globals ran: undecodable
            raise _corrupt(path, f"{type(e).__name__}: {e}") from None


def _load_torch(path: str) -> Any:
    try:
        with torch.serialization.safe_globals(list(_NUMPY_GLOBALS.values())):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # a refused global, or a stream that cannot be decoded
        try:  # scans the opcodes without running them (torch >= 2.5)
            found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:  # noqa: BLE001 - undecodable or an older torch: read the message
            found = re.findall(r"GLOBAL ([\w.]+)", str(e))
        unsafe = [g for g in found if not g.startswith(("numpy.", "collections.OrderedDict"))]
        if unsafe:
            raise _refused(path, ", ".join(unsafe)) from None
        raise _corrupt(path, "its pickle data cannot be decoded") from None
    except Exception as e:  # noqa: BLE001 - nothing ran from the file: it cannot be decoded
        raise _corrupt(path, f"{type(e).__name__}: {e}".split("\n")[0]) from None


def load_weights_file(path: str) -> Any:
    """Load ``path`` (``.pkl``: restricted unpickler; anything else: ``weights_only`` torch.load).

    Raises:
        UnsafeCheckpointError: the file references a Python global outside the allow-list.
        CorruptCheckpointError: the file is empty, truncated or not a checkpoint.
    """
    if os.path.getsize(path) == 0:
        raise _corrupt(path, "the file is empty")
    return _load_pickle(path) if path.endswith(".pkl") else _load_torch(path)
