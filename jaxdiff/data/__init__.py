"""Datasets and the training input pipeline (TFDS catalogue + grain)."""

from jaxdiff.data.pipeline import DatasetInfo, dataset_info, train_batches

__all__ = ['DatasetInfo', 'dataset_info', 'train_batches']
