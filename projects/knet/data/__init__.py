"""K-Net's data: dataset kinds (:mod:`.kinds`, the table every other place asks), datasets
(:mod:`.datasets`, importing registers the built-in ones), and mappers."""

from . import dataset_mappers, datasets
from .kinds import DATASET_KINDS, DatasetClassError, DatasetNotRegisteredError
