"""Datasets and dataset mappers of K-Net (importing registers the datasets)."""

from . import dataset_mappers, datasets
