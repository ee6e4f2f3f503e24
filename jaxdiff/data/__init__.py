"""Datasets and the training input pipeline (TFDS catalogue + grain)."""

from jaxdiff.data.buckets import sdxl_buckets
from jaxdiff.data.pipeline import (CAPTION_SOURCES, CROPS, DatasetInfo, caption_options, captions_of, class_captions,
                                   dataset_info, train_batches)

__all__ = ['CAPTION_SOURCES', 'CROPS', 'DatasetInfo', 'caption_options', 'captions_of', 'class_captions',
           'dataset_info', 'sdxl_buckets', 'train_batches']
