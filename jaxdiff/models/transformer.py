"""Latent diffusion's spatial transformer: LDM's SpatialTransformer, diffusers' Transformer2DModel of
BasicTransformerBlocks (Rombach et al., 2022), as the UNet of Stable Diffusion 1.x/2.x uses it.

  GroupNorm (eps 1e-6) -> proj_in (1x1 conv, or linear with use_linear_projection) -> depth x [
    x + attn1(norm1(x))            self-attention
    x + attn2(norm2(x), context)   cross-attention to the context (only with a context width, as in diffusers)
    x + ff(norm3(x)) ]             GEGLU feed-forward: proj_in to 2 x 4C, hidden * gelu(gate), proj_out to C
  -> proj_out (zero-initialised) -> + the input

Parameter names: norm, proj_in, block_{j}/{norm1, attn1/{q,k,v,out}, norm2, attn2/{q,k,v,out}, norm3,
ff/{proj_in,proj_out}}, proj_out. q, k, v have no bias, out has one (LDM's CrossAttention). The token stream stays
float32 between the blocks, as the UNet's residual stream; LayerNorms run in float32, the projections and attention
in the compute dtype.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdiff.models import attention, layers

Dtype = Any
FF_MULT = 4  # the feed-forward's inner width, in multiples of the channels
LAYER_NORM_EPS = 1e-5
GROUP_NORM_EPS = 1e-6


class Attention(nn.Module):
  """Multi-head attention of the tokens x [B, T, C] to themselves, or to `context` [B, S, D] (cross-attention)."""
  heads: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, context=None):
    b, t, c = x.shape
    source = x if context is None else context
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)

    def project(name, inputs):
      out = layers.dense(c, name=name, use_bias=False, **kw)(inputs).astype(self.dtype)
      return out.reshape(b, inputs.shape[1], self.heads, c // self.heads)

    h = attention.fast_attention(project('q', x), project('k', source), project('v', source))
    return layers.dense(c, name='out', **kw)(h.reshape(b, t, c))


class FeedForward(nn.Module):
  """GEGLU: one projection to twice the inner width, split into hidden and gate; hidden * gelu(gate) (exact, erf)."""
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    hidden, gate = jnp.split(layers.dense(2 * FF_MULT * c, name='proj_in', **kw)(x), 2, axis=-1)
    return layers.dense(c, name='proj_out', **kw)(hidden * jax.nn.gelu(gate, approximate=False))


class TransformerBlock(nn.Module):
  """Pre-norm self-attention, cross-attention (with `cross_attention`) and feed-forward, each with a residual."""
  heads: int
  cross_attention: bool
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, context):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    # Two-pass variance in float32, as PyTorch's LayerNorm.
    norm = lambda name: nn.LayerNorm(epsilon=LAYER_NORM_EPS, use_fast_variance=False, dtype=jnp.float32,
                                     param_dtype=self.param_dtype, name=name)
    x = x + Attention(self.heads, name='attn1', **kw)(norm('norm1')(x))
    if self.cross_attention:
      x = x + Attention(self.heads, name='attn2', **kw)(norm('norm2')(x), context)
    return x + FeedForward(name='ff', **kw)(norm('norm3')(x))


class SpatialTransformer(nn.Module):
  """[B, H, W, C] -> [B, H, W, C] float32: `depth` transformer blocks over the H*W positions, residual to the input.

  With context_dim > 0 every block cross-attends to `context` [B, S, context_dim]; with 0 it has no attn2/norm2.
  """
  heads: int
  depth: int = 1
  context_dim: int = 0
  use_linear_projection: bool = False  # proj_in/proj_out as [C, C] linear layers (SD 2.x); else 1x1 convs (SD 1.x)
  norm_groups: int = 32
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, context=None):
    b, height, width, c = x.shape
    if c % self.heads:
      raise ValueError(f'SpatialTransformer: {c} channels do not split into {self.heads} heads')
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)

    # A 1x1 conv and a linear layer are the same map on channels-last arrays; only the stored kernel shape differs.
    def project(name, zero_init=False):
      if self.use_linear_projection:
        return layers.dense(c, name=name, zero_init=zero_init, **kw)
      return layers.conv(c, kernel=1, padding=((0, 0), (0, 0)), name=name, zero_init=zero_init, **kw)

    h = layers.group_norm(x, groups=self.norm_groups, eps=GROUP_NORM_EPS, param_dtype=self.param_dtype, name='norm')
    h = project('proj_in')(h).reshape(b, height * width, c)
    for j in range(self.depth):
      h = TransformerBlock(self.heads, cross_attention=self.context_dim > 0, name=f'block_{j}', **kw)(h, context)
    # Zero-initialised, so each transformer starts as the identity (LDM's zero_module).
    h = project('proj_out', zero_init=True)(h.reshape(b, height, width, c))
    return x.astype(jnp.float32) + h
