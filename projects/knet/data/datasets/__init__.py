"""K-Net datasets: registration (on import), the toy generator and preparation helpers.

Importing this package registers every dataset listed in :mod:`.builtin`. Registration,
metadata and loading never write files: the toy dataset is generated and the shared samples are
prepared only by explicit calls (``tools/make_toy_dataset.py``, ``tools/prepare_samples.py``,
``tools/run_demo.py``; :func:`prepare_builtin_datasets`), and a loader whose files are missing
raises ``FileNotFoundError`` naming the command that creates them.
"""

from . import builtin as _builtin
from .builtin import (
    SAMPLES_COMMAND,
    ade20k_sample_paths,
    coco_sample_paths,
    get_toy_metadata,
    prepare_ade20k_sample,
    prepare_builtin_datasets,
    prepare_coco_sample,
    register_all,
    toy_paths,
)
from .catalog import LazyMetadata, register_dataset
from .custom import (
    DatasetSpec,
    parse_dataset_args,
    register_custom_dataset,
    register_dataset_specs,
)
from .panoptic import (
    coco_panoptic_metadata,
    coco_panoptic_with_sem_seg_paths,
    get_panoptic_metadata,
    load_panoptic_json_with_sem_seg,
)
from .paths import (
    get_cache_root,
    get_datasets_root,
    get_prepared_root,
    get_shared_data_root,
    require_shared_path,
)
from .prepare import (
    instances_json_from_panoptic,
    prepare_ade20k_sem_seg,
    prepare_instances_from_panoptic,
    prepare_semantic_from_panoptic,
    semantic_from_panoptic,
)
from .toy import (
    TOY_CATEGORIES,
    TOY_COMMAND,
    TOY_NUM_CLASSES,
    TOY_NUM_THING_CLASSES,
    TOY_STUFF_CATEGORIES,
    TOY_THING_CATEGORIES,
    ensure_toy_dataset,
    generate_toy_dataset,
    require_toy_dataset,
    toy_dataset_dir,
)

_builtin.register_all()
