"""The noisy classifier of classifier guidance (Dhariwal & Nichol, 2021): guided-diffusion's `EncoderUNetModel`.

The UNet's down half and middle block (the same blocks and parameter names, from `UNetTrunk`), then a head that
pools the [B, h, w, C] features into class logits:
  adaptive:   GroupNorm, SiLU, global average, zero-initialised 1x1 conv   -> out_norm, out_conv
  attention:  GroupNorm, SiLU, CLIP-style attention pooling (the mean token attends to every position, with learned
              positional embeddings, QKVAttention order, `num_head_channels` per head) -> out_norm, pool/{...}
  spatial:    the spatial means of every down-path and middle activation, concatenated, Linear-ReLU-Linear
  spatial_v2: as spatial with GroupNorm-SiLU in place of ReLU -> out_linear_0, out_norm, out_linear_1
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdiff.models import attention, layers
from jaxdiff.models.unet import UNetTrunk

POOLS = ('adaptive', 'attention', 'spatial', 'spatial_v2')
SPATIAL_HIDDEN = 2048  # guided-diffusion's width of the spatial heads


class AttentionPool(nn.Module):
  """[B, h, w, C] -> [B, out]: the mean token, prepended to the positions, attends to all of them (CLIP)."""
  out_features: int
  head_channels: int
  dtype: object = jnp.float32
  param_dtype: object = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, height, width, c = x.shape
    if c % self.head_channels:
      raise ValueError(f'AttentionPool: {c} channels do not split into heads of {self.head_channels}')
    heads = c // self.head_channels
    tokens = x.reshape(b, height * width, c)
    tokens = jnp.concatenate([tokens.mean(axis=1, keepdims=True), tokens], axis=1)
    init = lambda key, shape, dtype: jax.random.normal(key, shape, dtype) * c ** -0.5
    position = self.param('positional_embedding', init, (height * width + 1, c), self.param_dtype)
    tokens = tokens + position.astype(tokens.dtype)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    qkv = layers.dense(3 * c, name='qkv', **kw)(tokens).astype(self.dtype)
    q, k, v = jnp.moveaxis(qkv.reshape(b, -1, 3, heads, self.head_channels), 2, 0)
    # Only the mean token's output is read, so only its query is computed.
    h = attention.dot_product_attention(q[:, :1], k, v).reshape(b, 1, c)
    return layers.dense(self.out_features, name='c_proj', **kw)(h)[:, 0].astype(jnp.float32)


class EncoderUNet(UNetTrunk):
  """(x [B,H,W,C], t [B]) -> logits [B, out_channels] float32; `out_channels` is the number of classes."""
  pool: str = 'attention'

  @nn.compact
  def __call__(self, x, t, *, train: bool):
    if self.pool not in POOLS:
      raise ValueError(f'EncoderUNet: unknown pool {self.pool!r}; use one of {POOLS}')
    emb = self._embed_time(t, x.shape[0])
    h, skips = self._down(x, emb, train)
    h = self._middle(h, emb, train)
    f32 = dict(dtype=jnp.float32, param_dtype=self.param_dtype)
    if self.pool.startswith('spatial'):
      means = jnp.concatenate([a.astype(jnp.float32).mean(axis=(1, 2)) for a in skips + [h]], axis=-1)
      hidden = layers.dense(SPATIAL_HIDDEN, name='out_linear_0', **f32)(means)
      if self.pool == 'spatial':
        hidden = nn.relu(hidden)
      else:
        hidden = nn.silu(layers.group_norm(hidden, groups=32, eps=self.norm_eps, param_dtype=self.param_dtype,
                                           name='out_norm'))
      return layers.dense(self.out_channels, name='out_linear_1', **f32)(hidden)
    h = nn.silu(layers.group_norm(h.astype(jnp.float32), groups=self.norm_groups, eps=self.norm_eps,
                                  param_dtype=self.param_dtype, name='out_norm'))
    if self.pool == 'adaptive':
      pooled = h.mean(axis=(1, 2))
      return layers.dense(self.out_channels, name='out_conv', zero_init=True, **f32)(pooled)
    return AttentionPool(self.out_channels, self.num_head_channels, name='pool', dtype=self.dtype,
                         param_dtype=self.param_dtype)(h)
