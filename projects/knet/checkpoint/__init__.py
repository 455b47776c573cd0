"""Loading and saving weights at run time (:class:`KNetCheckpointer`): what ``import knet`` loads.

The table of released checkpoints (:mod:`.model_zoo`) is imported only to word a missing-weights
error; their offline conversion is :mod:`knet.conversion`.
"""

from .checkpointer import (
    CheckpointMismatchError,
    KNetCheckpointer,
    WeightsNotFoundError,
    describe_weights,
)
from .safe_load import CorruptCheckpointError, UnsafeCheckpointError, load_weights_file
