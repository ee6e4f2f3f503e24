"""Datasets and the training input pipeline (TFDS catalogue + grain)."""

from jaxdiff.data.pipeline import (CAPTION_SOURCES, DatasetInfo, caption_options, captions_of, class_captions,
                                   dataset_info, train_batches)

__all__ = ['CAPTION_SOURCES', 'DatasetInfo', 'caption_options', 'captions_of', 'class_captions', 'dataset_info',
           'train_batches']
