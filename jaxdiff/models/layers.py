"""UNet building blocks (Flax linen, NHWC).

Every block takes a compute `dtype` apart from the storage `param_dtype`. The fields that differ between the
diffusers and guided-diffusion layouts (embedding order and shift, GroupNorm eps, QKV split order, downsample padding,
residual scale) are explicit, so converted weights reproduce either network exactly.
"""

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdiff.models import attention

Dtype = Any

# torch pads a stride-2 3x3 conv by 1 on both sides; DDPM's TF 'SAME' (and diffusers' padding=0) pads only after.
DOWNSAMPLE_PADDINGS = {'symmetric': ((1, 1), (1, 1)), 'asymmetric': ((0, 1), (0, 1))}


def timestep_embedding(t, dim, *, flip_sin_to_cos, freq_shift, max_period=10000):
  """Sinusoidal embedding [B, dim] of (possibly fractional) timesteps t [B], always in float32.

  DDPM/diffusers' DDPM use [sin, cos] with freq_shift=1; guided-diffusion uses [cos, sin] with freq_shift=0.
  """
  half = dim // 2
  # Same operation order as both PyTorch references, so the float32 values agree to the last bit or two.
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
  args = jnp.asarray(t, jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
  sin, cos = jnp.sin(args), jnp.cos(args)
  emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


def _group_mean(per_channel, groups: int, count: int):
  """[B, C] per-channel sums -> each channel's group mean, [B, C]."""
  b, c = per_channel.shape
  sums = jnp.sum(per_channel.reshape(b, groups, c // groups), axis=-1, keepdims=True)
  return jnp.broadcast_to(sums / count, (b, groups, c // groups)).reshape(b, c)


def _spatial(v, ndim: int):
  """[B, C] -> [B, 1, ..., 1, C], to broadcast against a channels-last activation."""
  return v.reshape(v.shape[0], *([1] * (ndim - 2)), v.shape[1])


def _group_norm_forward(x, scale, bias, groups, eps):
  # Per-channel sums over the spatial axes first, then over each group's channels on the small [B, C] array:
  # reducing along a [B, HW, G, C/G] view leaves XLA (on CPU, 4x slower here) with a short minor axis.
  spatial, count = tuple(range(1, x.ndim - 1)), x.size // (x.shape[0] * groups)
  mean = _group_mean(jnp.sum(x, axis=spatial), groups, count)
  centered = x - _spatial(mean, x.ndim)
  var = _group_mean(jnp.sum(jnp.square(centered), axis=spatial), groups, count)  # two-pass, as PyTorch
  rstd = jax.lax.rsqrt(var + eps)
  return centered * _spatial(rstd * scale, x.ndim) + bias, (x, scale, mean, rstd)


def _group_norm_backward(groups, eps, residuals, dy):
  del eps
  x, scale, mean, rstd = residuals
  spatial, count = tuple(range(1, x.ndim - 1)), x.size // (x.shape[0] * groups)
  normed = (x - _spatial(mean, x.ndim)) * _spatial(rstd, x.ndim)
  dy_sum, dy_normed_sum = jnp.sum(dy, axis=spatial), jnp.sum(dy * normed, axis=spatial)  # [B, C], one pass
  # d(normed) = dy * scale; dx = rstd * (d(normed) - mean_g(d(normed)) - normed * mean_g(d(normed) * normed)).
  dx = _spatial(rstd, x.ndim) * (dy * scale - _spatial(_group_mean(dy_sum * scale, groups, count), x.ndim)
                                 - normed * _spatial(_group_mean(dy_normed_sum * scale, groups, count), x.ndim))
  return dx, jnp.sum(dy_normed_sum, axis=0), jnp.sum(dy_sum, axis=0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def group_norm_fp32(x, scale, bias, groups: int, eps: float):
  """GroupNorm of a channels-last float32 array [B, ..., C] with a hand-written backward pass.

  Autodiff of the forward re-reads the activation in five separate reductions; this backward reads it in one pass
  for the two per-channel sums it needs and one elementwise pass for dx.
  """
  return _group_norm_forward(x, scale, bias, groups, eps)[0]


group_norm_fp32.defvjp(_group_norm_forward, _group_norm_backward)


class GroupNorm(nn.Module):
  """GroupNorm over channels-last inputs, computed in float32; parameters `scale` and `bias` as nn.GroupNorm."""
  groups: int
  eps: float
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    channels = x.shape[-1]
    if channels % self.groups:
      raise ValueError(f'GroupNorm: {channels} channels do not split into {self.groups} groups')
    scale = self.param('scale', nn.initializers.ones, (channels,), self.param_dtype)
    bias = self.param('bias', nn.initializers.zeros, (channels,), self.param_dtype)
    return group_norm_fp32(x.astype(jnp.float32), scale.astype(jnp.float32), bias.astype(jnp.float32),
                           self.groups, self.eps)


def group_norm(x, *, groups, eps, param_dtype, name):
  """GroupNorm in float32 whatever the compute dtype (bf16 statistics are too coarse).

  The float32 result feeds the elementwise ops up to the next conv or dense layer, which casts it to the compute
  dtype once: rounding after every op costs bf16 networks several times the error.
  """
  return GroupNorm(groups=groups, eps=eps, param_dtype=param_dtype, name=name)(x)


# Convolutions and matmuls read compute-dtype (bf16) operands but write their float32 accumulator, as GPUs
# accumulate anyway: every result feeds a float32 norm or residual add, so rounding it to bf16 would only add error
# (measured: 1.01e-2 -> 7.9e-3 relative error of a bf16 DDPM UNet against float32).
_F32_OUT_CONV = functools.partial(jax.lax.conv_general_dilated, preferred_element_type=jnp.float32)
_F32_OUT_DOT = functools.partial(jax.lax.dot_general, preferred_element_type=jnp.float32)


def dense(features, *, dtype, param_dtype, name, zero_init=False, use_bias=True):
  return nn.Dense(features, dtype=dtype, param_dtype=param_dtype, name=name, dot_general=_F32_OUT_DOT,
                  use_bias=use_bias, kernel_init=nn.initializers.zeros if zero_init else nn.linear.default_kernel_init)


def conv(features, *, dtype, param_dtype, name, kernel=3, strides=1, padding=((1, 1), (1, 1)), zero_init=False):
  return nn.Conv(features, (kernel, kernel), strides=(strides, strides), padding=padding, dtype=dtype,
                 param_dtype=param_dtype, name=name, conv_general_dilated=_F32_OUT_CONV,
                 kernel_init=nn.initializers.zeros if zero_init else nn.linear.default_kernel_init)


def upsample_nearest(x):
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def downsample_avg(x):
  return nn.avg_pool(x, (2, 2), strides=(2, 2))


class TimeEmbedding(nn.Module):
  """Dense -> SiLU -> Dense from the sinusoidal embedding to the block embedding width."""
  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, emb):
    linear = lambda name: dense(self.features, dtype=self.dtype, param_dtype=self.param_dtype, name=name)
    return linear('linear_2')(nn.silu(linear('linear_1')(emb)))


class Downsample(nn.Module):
  """Halves H and W: stride-2 3x3 conv, or 2x2 average pooling when use_conv is False."""
  use_conv: bool = True
  padding: str = 'symmetric'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    if not self.use_conv:
      return downsample_avg(x)
    return conv(x.shape[-1], strides=2, padding=DOWNSAMPLE_PADDINGS[self.padding], dtype=self.dtype,
                param_dtype=self.param_dtype, name='conv')(x)


class Upsample(nn.Module):
  """Doubles H and W by nearest neighbour, then an optional 3x3 conv."""
  use_conv: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = upsample_nearest(x)
    if self.use_conv:
      x = conv(x.shape[-1], dtype=self.dtype, param_dtype=self.param_dtype, name='conv')(x)
    return x


class ResBlock(nn.Module):
  """Residual block conditioned on the time (and class) embedding, or unconditioned when `emb` is None (the
  autoencoders: no time_proj parameters).

  resample 'up'/'down' resizes inside the block (BigGAN style, as ADM's resblock_updown): after the first
  norm+SiLU on the residual branch and, without a conv, on the skip branch.
  """
  out_channels: int
  dropout: float = 0.0
  use_scale_shift_norm: bool = False
  resample: str | None = None
  norm_groups: int = 32
  norm_eps: float = 1e-5
  output_scale: float = 1.0  # diffusers' output_scale_factor: (skip + h) / output_scale
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, emb, train: bool):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    norm = dict(groups=self.norm_groups, eps=self.norm_eps, param_dtype=self.param_dtype)
    h = nn.silu(group_norm(x, name='norm1', **norm))
    if self.resample is not None:
      resize = upsample_nearest if self.resample == 'up' else downsample_avg
      h, x = resize(h), resize(x)
    h = conv(self.out_channels, name='conv1', **kw)(h)

    if emb is None:
      h = group_norm(h, name='norm2', **norm)
    else:
      emb_width = 2 * self.out_channels if self.use_scale_shift_norm else self.out_channels
      emb = nn.Dense(emb_width, name='time_proj', dtype=jnp.float32, param_dtype=self.param_dtype)(nn.silu(emb))
      emb = emb[:, None, None, :]
      if self.use_scale_shift_norm:
        scale, shift = jnp.split(emb, 2, axis=-1)
        h = group_norm(h, name='norm2', **norm) * (1 + scale) + shift
      else:
        h = group_norm(h + emb, name='norm2', **norm)
    h = nn.Dropout(self.dropout, deterministic=not train)(nn.silu(h))
    # Zero-initialised so each block starts as the identity.
    h = conv(self.out_channels, name='conv2', zero_init=True, **kw)(h)

    if x.shape[-1] != self.out_channels:
      x = conv(self.out_channels, kernel=1, padding=((0, 0), (0, 0)), name='skip', **kw)(x)
    # The residual stream stays float32 (the next conv casts once): bf16 sums cost ~20% of a bf16 network's error.
    return (x.astype(jnp.float32) + h) / self.output_scale


class AttentionBlock(nn.Module):
  """Multi-head self-attention over all positions, with a residual connection.

  The fused 1x1 `qkv` projection holds 3*C outputs. legacy_qkv_order=True splits them heads-first
  ([q_h, k_h, v_h] per head, guided-diffusion's QKVAttentionLegacy); False splits q, k, v first and then heads
  (QKVAttention, and diffusers' separate to_q/to_k/to_v weights concatenated in that order).
  """
  num_heads: int = 1
  num_head_channels: int = -1  # -1: use num_heads; else heads = channels // num_head_channels
  legacy_qkv_order: bool = False
  norm_groups: int = 32
  norm_eps: float = 1e-5
  output_scale: float = 1.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, height, width, c = x.shape
    heads = self.num_heads if self.num_head_channels == -1 else c // self.num_head_channels
    if c % heads:
      raise ValueError(f'AttentionBlock: {c} channels do not split into {heads} heads')
    d = c // heads
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = group_norm(x, groups=self.norm_groups, eps=self.norm_eps, param_dtype=self.param_dtype, name='norm')
    # Attention itself runs in the compute dtype; only its logits accumulate in float32 (below).
    qkv = dense(3 * c, name='qkv', **kw)(h.reshape(b, height * width, c)).astype(self.dtype)
    if self.legacy_qkv_order:
      q, k, v = jnp.moveaxis(qkv.reshape(b, -1, heads, 3, d), 3, 0)
    else:
      q, k, v = jnp.moveaxis(qkv.reshape(b, -1, 3, heads, d), 2, 0)
    # Logits accumulate and stay in float32 (bf16 logits of size ~10 are off by ~0.04, which moves the softmax
    # weights by percents).
    h = attention.dot_product_attention(q, k, v).reshape(b, height, width, c)
    h = dense(c, name='proj_out', zero_init=True, **kw)(h)
    return (x.astype(jnp.float32) + h) / self.output_scale  # float32 residual stream, as in ResBlock
