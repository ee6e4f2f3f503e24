"""Conditions as pytrees: each conditioner builds a dict of batched arrays from a batch and defines its null value,
the condition that classifier-free guidance trains by dropping and samples as the unconditional half.

Raw conditions (what batches and prompts give):
  `label` [B] int32: a class. Its null value is a learned extra row of the label table (index num_classes).
  `tokens` [B, L] int32: a tokenized caption. Its null value is the tokenized empty caption, as Stable Diffusion.
Embedded conditions (what the UNet reads): `label` (ADM's class embedding added to the time embedding) and
`context` [B, L, D] (cross-attention). `ConditionedUNet.embed` turns raw conditions into embedded ones: LDM's class
embedder ('cin', one context token per class) or a text encoder.
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class ClassConditioner:
  """Labels from `batch['label']`; null = index num_classes (a table with num_classes + 1 rows)."""
  num_classes: int

  def from_batch(self, batch: dict) -> dict:
    return class_condition(batch["label"])

  def null(self, batch_size: int) -> dict:
    return {"label": jnp.full((batch_size,), self.num_classes, jnp.int32)}


@dataclasses.dataclass(frozen=True, eq=False)
class TextConditioner:
  """Tokens from `batch['tokens']`; null = the tokens of the empty caption."""
  null_tokens: np.ndarray  # [L] int32

  def from_batch(self, batch: dict) -> dict:
    return {"tokens": jnp.asarray(batch["tokens"], jnp.int32)}

  def null(self, batch_size: int) -> dict:
    tokens = jnp.asarray(self.null_tokens, jnp.int32)
    return {"tokens": jnp.broadcast_to(tokens, (batch_size, tokens.shape[0]))}


def class_condition(labels: jax.Array) -> dict:
  return {"label": jnp.asarray(labels, jnp.int32)}


def null_class_condition(batch_size: int, num_classes: int) -> dict:
  """The dropped class: index num_classes of a label table with num_classes + 1 rows."""
  return ClassConditioner(num_classes).null(batch_size)


def drop(key: jax.Array, cond, null, prob: float):
  """Each example's whole condition replaced by the null one with probability `prob` (one draw per example)."""
  leaves = jax.tree.leaves(cond)
  if not leaves or prob == 0:
    return cond
  dropped = jax.random.bernoulli(key, prob, (leaves[0].shape[0],))
  return jax.tree.map(lambda c, n: jnp.where(dropped.reshape(-1, *[1] * (c.ndim - 1)), n, c), cond, null)


class ClassEmbedder(nn.Module):
  """LDM's class embedder ('cin'): each label becomes one context token [B, 1, features] for cross-attention."""
  num_classes: int  # rows, including a null class when there is one
  features: int
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, labels):
    return nn.Embed(self.num_classes, self.features, param_dtype=self.param_dtype, name="embedding")(labels)[:, None]


class ConditionedUNet(nn.Module):
  """The UNet with the embedder of its raw conditions: `embed(cond)` maps `label` (ClassEmbedder) or `tokens` (a
  text encoder, whose `text_output` hidden states are the context) to `context`; `denoise(x, t, embedded)` is the
  UNet. Params: {'unet': ..., 'embedder': ...}. A frozen embedder passes no gradient (its params are kept out of the
  train state by the job)."""
  unet: nn.Module
  embedder: nn.Module
  text_output: str = ""  # "" for a class embedder; else the key of the text encoder's outputs to attend to
  frozen: bool = False

  def embed(self, cond: dict) -> dict:
    if self.text_output:
      context = self.embedder(cond["tokens"])[self.text_output]
    else:
      context = self.embedder(cond["label"])
    context = context.astype(jnp.float32)
    return {"context": jax.lax.stop_gradient(context) if self.frozen else context}

  def denoise(self, x, t, cond: dict, *, train: bool):
    return self.unet(x, t, cond, train=train)

  def __call__(self, x, t, cond: dict, *, train: bool):
    return self.denoise(x, t, self.embed(cond), train=train)
