"""Conditions as pytrees: each conditioner builds a dict of batched arrays from a batch and defines its null value,
the condition that classifier-free guidance trains by dropping and samples as the unconditional half.

Raw conditions (what batches and prompts give):
  `label` [B] int32: a class. Its null value is a learned extra row of the label table (index num_classes).
  `tokens` [B, L] int32: a tokenized caption (`tokens_2` [B, L2]: for a second text encoder). Its null value is the
    tokenized empty caption (Stable Diffusion), or with `zero_null` a zero embedding (SDXL / SGM).
  `original_size`, `crops_coords_top_left`, `target_size` [B, 2] and `aesthetic_score` [B, 1] float32: SDXL's
    micro-conditioning scalars. A dropped one is a zero embedding, as SGM drops it.
  `keep` {group: [B] float32}: 1 keeps, 0 zeroes the embedding of a group ('text' or a micro key).
Embedded conditions (what the UNet reads): `label` (ADM's class embedding added to the time embedding), `context`
[B, L, D] (cross-attention) and `vector` [B, D] (SDXL: the pooled text embedding and the micro-conditioning
sinusoids, added to the time embedding). `ConditionedUNet.embed` turns raw conditions into embedded ones.
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.models import layers


@dataclasses.dataclass(frozen=True)
class ClassConditioner:
  """Labels from `batch['label']`; null = index num_classes (a table with num_classes + 1 rows)."""
  num_classes: int

  def from_batch(self, batch: dict) -> dict:
    return class_condition(batch["label"])

  def null(self, batch_size: int) -> dict:
    return {"label": jnp.full((batch_size,), self.num_classes, jnp.int32)}


  def drop(self, key: jax.Array, cond: dict, prob: float) -> dict:
    return drop(key, cond, self.null(cond["label"].shape[0]), prob)


@dataclasses.dataclass(frozen=True, eq=False)
class TextConditioner:
  """Tokens from `batch['tokens']`; null = the tokens of the empty caption, or (zero_null) a zero embedding.

  With two text encoders the batch carries both tokenizers' ids side by side, `tokens` [B, L + L2] (one array
  through the data pipeline); `from_batch` splits them into `tokens` and `tokens_2`."""
  null_tokens: np.ndarray  # [L] int32
  null_tokens_2: np.ndarray | None = None  # [L2] int32, for a second text encoder
  zero_null: bool = False

  def split(self, tokens) -> dict:
    tokens = jnp.asarray(tokens, jnp.int32)
    if self.null_tokens_2 is None:
      return {"tokens": tokens}
    length = len(self.null_tokens)
    return {"tokens": tokens[:, :length], "tokens_2": tokens[:, length:]}

  def from_batch(self, batch: dict) -> dict:
    cond = self.split(batch["tokens"])
    if self.zero_null:
      cond["keep"] = {"text": jnp.ones(cond["tokens"].shape[:1], jnp.float32)}
    return cond

  def null(self, batch_size: int) -> dict:
    both = self.null_tokens if self.null_tokens_2 is None else np.concatenate([self.null_tokens, self.null_tokens_2])
    cond = self.split(jnp.broadcast_to(jnp.asarray(both, jnp.int32), (batch_size, len(both))))
    if self.zero_null:
      cond["keep"] = {"text": jnp.zeros((batch_size,), jnp.float32)}
    return cond

  def drop(self, key: jax.Array, cond: dict, prob: float) -> dict:
    return drop(key, cond, self.null(cond["tokens"].shape[0]), prob)


@dataclasses.dataclass(frozen=True, eq=False)
class MicroConditioner:
  """SDXL's micro-conditioning on top of a class or text conditioner (or none): the `keys` scalars of each example
  from the batch, each dropped to a zero embedding with its own probability (SGM's per-embedder ucg_rate)."""
  base: Any  # ClassConditioner | TextConditioner | None
  keys: tuple[str, ...]
  drop_probs: tuple[float, ...] = ()  # one per key; () = never dropped

  def from_batch(self, batch: dict) -> dict:
    base = dict(self.base.from_batch(batch)) if self.base is not None else {}
    batch_size = len(batch[self.keys[0]])
    micro = {key: jnp.asarray(batch[key], jnp.float32).reshape(batch_size, -1) for key in self.keys}
    keep = {key: jnp.ones((batch_size,), jnp.float32) for key in self.keys}
    return {**base, **micro, "keep": {**base.pop("keep", {}), **keep}}

  def null(self, batch_size: int) -> dict:
    base = dict(self.base.null(batch_size)) if self.base is not None else {}
    micro = {key: jnp.zeros((batch_size, MICRO_SCALARS[key]), jnp.float32) for key in self.keys}
    keep = {key: jnp.zeros((batch_size,), jnp.float32) for key in self.keys}
    return {**base, **micro, "keep": {**base.pop("keep", {}), **keep}}

  def drop(self, key: jax.Array, cond: dict, prob: float) -> dict:
    """The base condition dropped as the base conditioner does (with `prob`), each micro key with its own."""
    keep = dict(cond["keep"])
    micro = {k: cond[k] for k in self.keys}
    base = {k: v for k, v in cond.items() if k not in self.keys and k != "keep"}
    if "text" in keep:
      base["keep"] = {"text": keep.pop("text")}
    if self.base is not None and prob > 0:
      base = dict(self.base.drop(key, base, prob))
    for i, (name, p) in enumerate(zip(self.keys, self.drop_probs)):
      if p > 0:
        dropped = jax.random.bernoulli(jax.random.fold_in(key, i + 1), p, keep[name].shape)
        keep[name] = jnp.where(dropped, 0.0, keep[name])
        micro[name] = jnp.where(dropped[:, None], 0.0, micro[name])
    return {**base, **micro, "keep": {**base.pop("keep", {}), **keep}}


# SDXL's micro-conditioning keys and how many scalars each holds: (height, width), (top, left), one score.
MICRO_SCALARS = {"original_size": 2, "crops_coords_top_left": 2, "target_size": 2, "aesthetic_score": 1}


def micro_embedding(values: jax.Array, dim: int) -> jax.Array:
  """SDXL's micro-conditioning embedding: each scalar of values [B, k] (sizes, crop coordinates, an aesthetic score)
  as a [cos, sin] sinusoid of width dim (max period 10^4, SGM's ConcatTimestepEmbedderND and diffusers'
  add_time_proj), concatenated: [B, k * dim] float32."""
  values = jnp.asarray(values, jnp.float32)
  b, k = values.shape
  emb = layers.timestep_embedding(values.reshape(-1), dim, flip_sin_to_cos=True, freq_shift=0)
  return emb.reshape(b, k * dim)


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
  """The UNet with the embedders of its raw conditions: `embed(cond)` maps `label` (ClassEmbedder) or `tokens` (a
  text encoder, whose `text_output` hidden states are the context; with a second encoder, the two concatenated on
  the feature axis, SDXL's 768 + 1280) to `context`, and the last text encoder's `pooled_output` with the
  `micro_conditioning` sinusoids to `vector`; `denoise(x, t, embedded)` is the UNet.
  Params: {'unet', 'embedder', 'embedder_2'} (those that exist). Frozen text encoders pass no gradient (their params
  are kept out of the train state by the job)."""
  unet: nn.Module
  embedder: nn.Module | None = None
  text_output: str = ""  # "" for a class embedder; else the key of the text encoder's outputs to attend to
  frozen: bool = False
  embedder_2: nn.Module | None = None  # a second text encoder
  text_output_2: str = ""
  pooled_output: str = ""  # "" none; else the last text encoder's output that leads `vector` ('projected')
  micro_conditioning: tuple[str, ...] = ()
  micro_embed_dim: int = 256

  def embed(self, cond: dict) -> dict:
    keep = cond.get("keep", {})
    embedded, vector = {}, []
    if self.text_output:
      outputs = [self.embedder(cond["tokens"])]
      contexts = [outputs[0][self.text_output]]
      if self.embedder_2 is not None:
        outputs.append(self.embedder_2(cond["tokens_2"]))
        contexts.append(outputs[1][self.text_output_2])
      context = jnp.concatenate([c.astype(jnp.float32) for c in contexts], axis=-1)
      pooled = outputs[-1][self.pooled_output].astype(jnp.float32) if self.pooled_output else None
      if self.frozen:
        context = jax.lax.stop_gradient(context)
        pooled = None if pooled is None else jax.lax.stop_gradient(pooled)
      if "text" in keep:  # a dropped caption is a zero embedding (SGM), also its pooled part
        context = context * keep["text"][:, None, None]
        pooled = None if pooled is None else pooled * keep["text"][:, None]
      embedded["context"] = context
      if pooled is not None:
        vector.append(pooled)
    elif self.embedder is not None:
      embedded["context"] = self.embedder(cond["label"]).astype(jnp.float32)
    for key in self.micro_conditioning:
      emb = micro_embedding(cond[key], self.micro_embed_dim)
      vector.append(emb * keep[key][:, None] if key in keep else emb)
    if vector:
      embedded["vector"] = jnp.concatenate(vector, axis=-1)
    return embedded

  def denoise(self, x, t, cond: dict, *, train: bool):
    return self.unet(x, t, cond, train=train)

  def __call__(self, x, t, cond: dict, *, train: bool):
    return self.denoise(x, t, self.embed(cond), train=train)
