"""Conditions as pytrees: each conditioner builds a dict of batched arrays and defines its null value, the
condition that classifier-free guidance trains by dropping and samples as the unconditional half.

Today: class labels, whose null value is a learned extra row of the label table (index num_classes), so one network
computes both halves. The text and SDXL conditioners add their keys (`context`, `vector`) beside `label`.
"""

import jax
import jax.numpy as jnp


def class_condition(labels: jax.Array) -> dict:
  return {"label": jnp.asarray(labels, jnp.int32)}


def null_class_condition(batch_size: int, num_classes: int) -> dict:
  """The dropped class: index num_classes of a label table with num_classes + 1 rows."""
  return {"label": jnp.full((batch_size,), num_classes, jnp.int32)}


def drop(key: jax.Array, cond, null, prob: float):
  """Each example's whole condition replaced by the null one with probability `prob` (one draw per example)."""
  leaves = jax.tree.leaves(cond)
  if not leaves or prob == 0:
    return cond
  dropped = jax.random.bernoulli(key, prob, (leaves[0].shape[0],))
  return jax.tree.map(lambda c, n: jnp.where(dropped.reshape(-1, *[1] * (c.ndim - 1)), n, c), cond, null)
