"""Loading and saving weights at run time: what ``import knet`` loads.

:class:`KNetCheckpointer` reads weight files without running code from them and says what is
wrong with a file that is missing, corrupt or does not fit the model; ``import knet`` makes
Detectron2's ``DefaultPredictor`` and ``DefaultTrainer`` use it
(:func:`use_knet_checkpointer_in_detectron2_defaults`). The table of released checkpoints
(:mod:`.model_zoo`) is imported only to word a missing-weights error; their offline conversion is
:mod:`knet.conversion`.
"""

from .checkpointer import (
    CheckpointMismatchError,
    KNetCheckpointer,
    WeightsNotFoundError,
    use_knet_checkpointer_in_detectron2_defaults,
)
from .safe_load import CorruptCheckpointError, UnsafeCheckpointError, load_weights_file
