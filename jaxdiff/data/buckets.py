"""SDXL's aspect-ratio buckets and a schedule of one-bucket global batches that is a pure function of (seed, step).

SDXL (Podell et al. 2023, sec. 2.3 and app. I) fine-tunes on buckets of about 1024^2 pixels whose sides are multiples
of 64, from 512x2048 to 2048x512; every batch is drawn from one bucket and the bucket's (h, w) is the target-size
condition. Here the table is scaled to any pixel budget image_size^2, each example goes to the bucket nearest its
aspect ratio, and the batches of an epoch are drawn bucket by bucket and then shuffled.
"""

import functools
import logging
import math

import numpy as np

from jaxdiff.errors import DataError

# (height, width) at 1024^2, as in SDXL's appendix table: aspect ratios h / w from 0.25 to 4.
SDXL_BUCKETS = (
    (512, 2048), (512, 1984), (512, 1920), (512, 1856), (576, 1792), (576, 1728), (576, 1664), (640, 1600),
    (640, 1536), (704, 1472), (704, 1408), (704, 1344), (768, 1344), (768, 1280), (832, 1216), (832, 1152),
    (896, 1152), (896, 1088), (960, 1088), (960, 1024), (1024, 1024), (1024, 960), (1088, 960), (1088, 896),
    (1152, 896), (1152, 832), (1216, 832), (1280, 768), (1344, 768), (1408, 704), (1472, 704), (1536, 640),
    (1600, 640), (1664, 576), (1728, 576), (1792, 576), (1856, 512), (1920, 512), (1984, 512), (2048, 512),
)
SDXL_BUDGET = 1024
_ASPECTS = [h / w for h, w in SDXL_BUCKETS]
MIN_ASPECT, MAX_ASPECT = min(_ASPECTS), max(_ASPECTS)


def sdxl_buckets(image_size: int, multiple: int = 64) -> tuple[tuple[int, int], ...]:
  """SDXL's buckets scaled to image_size^2 pixels, sides rounded to `multiple`; the table itself at (1024, 64).

  Rounding can merge buckets (kept once, in table order) or push one's aspect ratio out of SDXL's range [1/4, 4]
  (dropped), so small budgets have fewer buckets.
  """
  for name, value in (('image_size', image_size), ('bucket_multiple', multiple)):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
      raise DataError(f'{name} must be a positive integer, got {value!r}; fix data.{name}.')
  if image_size % multiple:
    raise DataError(f'data.image_size={image_size} is not a multiple of data.bucket_multiple={multiple}: the '
                    'square bucket would not fit; change one of them (e.g. image_size a multiple of the latent '
                    'factor times the UNet\'s downsampling).')
  scale = image_size / SDXL_BUDGET

  def side(x):
    return max(multiple, int(math.floor(x * scale / multiple + 0.5)) * multiple)

  buckets = []
  for h, w in SDXL_BUCKETS:
    bucket = (side(h), side(w))
    if bucket not in buckets and MIN_ASPECT <= bucket[0] / bucket[1] <= MAX_ASPECT:
      buckets.append(bucket)
  return tuple(buckets)


def nearest_buckets(sizes, buckets) -> np.ndarray:
  """int [N]: for each (h, w) in `sizes`, the index of the bucket nearest its aspect ratio in log(h / w) (ties: the
  first in the list)."""
  sizes = np.asarray(sizes, np.float64).reshape(-1, 2)
  if sizes.size and (sizes <= 0).any():
    raise DataError('an image has an empty side; delete it from the data.')
  buckets = np.asarray(buckets, np.float64)
  distance = np.abs(np.log(sizes[:, :1] / sizes[:, 1:]) - np.log(buckets[:, 0] / buckets[:, 1])[None])
  return np.argmin(distance, axis=1)


class BucketSchedule:
  """Which bucket serves global batch k and which examples it holds: a pure function of (seed, k).

  Per epoch e, each bucket's examples are shuffled with (seed, e) and cut into whole global batches (the remainder
  dropped), and the epoch's list of batches is shuffled with (seed, e). Every epoch has the same number of batches,
  so batch k lies in epoch k // batches_per_epoch and a resumed run computes only that epoch. Buckets with fewer
  examples than one global batch are never served (logged once).
  """

  def __init__(self, bucket_of, buckets, global_batch: int, seed: int):
    bucket_of = np.asarray(bucket_of)
    self.buckets = tuple(tuple(int(s) for s in b) for b in buckets)
    self.global_batch, self.seed = int(global_batch), int(seed)
    members = [np.flatnonzero(bucket_of == b) for b in range(len(self.buckets))]
    self._members = [(b, m) for b, m in enumerate(members) if len(m) >= self.global_batch]
    small = {self.buckets[b]: len(m) for b, m in enumerate(members) if 0 < len(m) < self.global_batch}
    if small:
      logging.warning('%d examples in buckets with fewer than one global batch (%d) are skipped: %s.',
                      sum(small.values()), self.global_batch,
                      ', '.join(f'{h}x{w}: {n}' for (h, w), n in small.items()))
    if not self._members:
      raise DataError(f'no aspect bucket holds a global batch of {global_batch} examples (bucket sizes: '
                      f'{", ".join(f"{h}x{w}: {n}" for (h, w), n in small.items())}); lower train.batch_size or '
                      'add images.')
    self.batches_per_epoch = sum(len(m) // self.global_batch for _, m in self._members)
    self._epoch = functools.lru_cache(maxsize=2)(self._plan)

  def _plan(self, epoch):
    """(bucket of each batch [n], example indices [n, global_batch]) of one epoch."""
    rng = np.random.default_rng([self.seed, epoch, 0])  # 1: the elements' crops and flips (pipeline.py)
    bucket_ids, examples = [], []
    for b, members in self._members:
      count = len(members) // self.global_batch
      examples.append(rng.permutation(members)[:count * self.global_batch].reshape(count, self.global_batch))
      bucket_ids.append(np.full(count, b))
    order = rng.permutation(self.batches_per_epoch)
    return np.concatenate(bucket_ids)[order], np.concatenate(examples)[order]

  def batch(self, step: int) -> tuple[int, np.ndarray]:
    """(bucket index, example indices [global_batch]) of global batch `step`."""
    epoch, k = divmod(int(step), self.batches_per_epoch)
    bucket_ids, examples = self._epoch(epoch)
    return int(bucket_ids[k]), examples[k]

  def counts(self) -> dict[tuple[int, int], int]:
    """{bucket: batches per epoch} of the buckets served."""
    return {self.buckets[b]: len(m) // self.global_batch for b, m in self._members}
