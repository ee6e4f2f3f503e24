"""One config-driven UNet expressing the DDPM, improved-DDPM and ADM networks, and LDM's / Stable Diffusion 1.x-2.x
networks with spatial transformers (transformer_depth >= 1) cross-attending to a context (context_dim > 0), and
SDXL's, which also add an MLP embedding of a vector condition to the time embedding (adm_in_channels > 0).

Parameter names (stable; the weight converters map onto them):
  time_embed/{linear_1,linear_2}, label_emb, vector_emb/{linear_1,linear_2}, conv_in,
  down_{level}_res_{i}, down_{level}_attn_{i}, down_{level}_downsample,
  mid_res_0, mid_attn, mid_res_1,
  up_{level}_res_{i}, up_{level}_attn_{i}, up_{level}_upsample, norm_out, conv_out.
`level` counts resolutions from the input (0) down, on both paths; up_{level} has num_res_blocks[level] + 1 blocks.
An attention module (`*_attn*`) is an ADM AttentionBlock (norm, qkv, proj_out) or, with transformer_depth >= 1, a
SpatialTransformer (norm, proj_in, block_{j}/..., proj_out; models/transformer.py).
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxdiff.errors import ConfigError
from jaxdiff.models import layers, transformer


class UNetTrunk(nn.Module):
  """The fields and the shared half of the UNet and the classifier: timestep embedding, the down path and the
  middle block. Subclasses call `_embed_time`, `_down` and `_middle` from their compact `__call__`."""
  out_channels: int
  base_channels: int = 128
  channel_mult: tuple[int, ...] = (1, 2, 2, 2)
  num_res_blocks: int | tuple[int, ...] = 2
  attention_ds: tuple[int, ...] = (2,)  # downsample factors with attention; 1 = input resolution
  num_heads: int | tuple[int, ...] = 1  # a tuple: per level; the middle block uses the last level's
  num_head_channels: int = -1  # -1: use num_heads
  legacy_qkv_order: bool = True
  use_scale_shift_norm: bool = False
  resblock_updown: bool = False
  conv_resample: bool = True
  downsample_padding: str = 'asymmetric'  # see layers.DOWNSAMPLE_PADDINGS
  dropout: float = 0.0
  norm_groups: int = 32
  norm_eps: float = 1e-6
  flip_sin_to_cos: bool = False
  freq_shift: float = 1.0
  mid_block_scale_factor: float = 1.0  # diffusers divides the middle blocks' residual sums by this
  # 0: ADM attention blocks; >= 1: that many transformer blocks in each spatial transformer. A tuple: per level (only
  # the attending levels' entries count); the middle block uses the last level's.
  transformer_depth: int | tuple[int, ...] = 0
  context_dim: int = 0  # > 0: the spatial transformers cross-attend to a context [B, L, context_dim]
  use_linear_projection: bool = False  # spatial transformer proj_in/proj_out: linear (SD 2.x) or 1x1 conv (SD 1.x)
  remat: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def _per_level(self, value) -> tuple:
    """A field given as one value or one per level, as one per level."""
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * len(self.channel_mult)

  @property
  def _num_res(self) -> tuple[int, ...]:
    return self._per_level(self.num_res_blocks)

  def _width(self, level: int) -> int:
    return int(self.base_channels * self.channel_mult[level])  # int(): guided-diffusion's 512 nets use mult 0.5

  def _res(self, h, emb, channels, name, train, **extra):
    # train is a Python bool deciding dropout, so remat must treat it as static (argnum 0 is the module).
    res_cls = nn.remat(layers.ResBlock, static_argnums=(3,)) if self.remat else layers.ResBlock
    return res_cls(channels, dropout=self.dropout, use_scale_shift_norm=self.use_scale_shift_norm, name=name,
                   norm_groups=self.norm_groups, norm_eps=self.norm_eps, dtype=self.dtype,
                   param_dtype=self.param_dtype, **extra)(h, emb, train)

  def _attn(self, h, name, level, context, output_scale=1.0):
    num_heads, depth = self._per_level(self.num_heads)[level], self._per_level(self.transformer_depth)[level]
    if depth == 0:
      attn_cls = nn.remat(layers.AttentionBlock) if self.remat else layers.AttentionBlock
      return attn_cls(num_heads=num_heads, num_head_channels=self.num_head_channels,
                      legacy_qkv_order=self.legacy_qkv_order, name=name, norm_groups=self.norm_groups,
                      norm_eps=self.norm_eps, output_scale=output_scale, dtype=self.dtype,
                      param_dtype=self.param_dtype)(h)
    # No output_scale: diffusers' cross-attention middle block scales only its ResBlocks.
    heads = num_heads if self.num_head_channels == -1 else h.shape[-1] // self.num_head_channels
    attn_cls = nn.remat(transformer.SpatialTransformer) if self.remat else transformer.SpatialTransformer
    return attn_cls(heads=heads, depth=depth, context_dim=self.context_dim,
                    use_linear_projection=self.use_linear_projection, norm_groups=self.norm_groups, name=name,
                    dtype=self.dtype, param_dtype=self.param_dtype)(h, context)

  def _embed_time(self, t, batch: int):
    """The block embedding of timesteps t, in float32 (as the output head: bf16 sinusoids of large t lose too
    much, as in ADM's fp16 mode)."""
    t = jnp.broadcast_to(jnp.asarray(t), (batch,))
    emb = layers.timestep_embedding(t, self.base_channels, flip_sin_to_cos=self.flip_sin_to_cos,
                                    freq_shift=self.freq_shift)
    return layers.TimeEmbedding(4 * self.base_channels, name='time_embed', dtype=jnp.float32,
                                param_dtype=self.param_dtype)(emb)

  def _down(self, x, emb, train, context=None):
    """conv_in and the down path: (h, the activations the up path concatenates, input first)."""
    h = layers.conv(self._width(0), name='conv_in', dtype=self.dtype, param_dtype=self.param_dtype)(
        x.astype(self.dtype))
    skips = [h]
    for level in range(len(self.channel_mult)):
      for i in range(self._num_res[level]):
        h = self._res(h, emb, self._width(level), f'down_{level}_res_{i}', train)
        if 2 ** level in self.attention_ds:
          h = self._attn(h, f'down_{level}_attn_{i}', level, context)
        skips.append(h)
      if level != len(self.channel_mult) - 1:
        name = f'down_{level}_downsample'
        if self.resblock_updown:
          h = self._res(h, emb, h.shape[-1], name, train, resample='down')
        else:
          h = layers.Downsample(self.conv_resample, self.downsample_padding, name=name, dtype=self.dtype,
                                param_dtype=self.param_dtype)(h)
        skips.append(h)
    return h, skips

  def _middle(self, h, emb, train, context=None):
    mid = dict(output_scale=self.mid_block_scale_factor)
    h = self._res(h, emb, h.shape[-1], 'mid_res_0', train, **mid)
    h = self._attn(h, 'mid_attn', len(self.channel_mult) - 1, context, **mid)
    return self._res(h, emb, h.shape[-1], 'mid_res_1', train, **mid)


class UNet(UNetTrunk):
  """Noise-prediction UNet: (x [B,H,W,C], t [B], cond | None) -> [B,H,W,out_channels] float32.

  `cond` is the conditioning pytree of models/conditioning.py: a dict that may hold `label` [B] int and, for a model
  with context_dim > 0 (which needs it), `context` [B, L, context_dim] float; with adm_in_channels > 0 (which needs
  it), `vector` [B, adm_in_channels] float (SDXL: the pooled text embedding and the micro-conditioning sinusoids).

  The defaults of the layout fields reproduce the DDPM paper network; ADM uses flip_sin_to_cos=True, freq_shift=0,
  norm_eps=1e-5, downsample_padding='symmetric'.
  """
  num_classes: int | None = None  # rows of the label table (with a learned null class: classes + 1)
  patch_size: int = 1  # > 1: the network runs on p x p pixel patches stacked as channels (space-to-depth)
  # > 0: cond['vector'] [B, adm_in_channels] is embedded by an MLP and added to the time embedding (SGM's label_emb
  # of its 'sequential' adm, diffusers' text_time add_embedding).
  adm_in_channels: int = 0

  @nn.compact
  def __call__(self, x, t, cond=None, *, train: bool):
    cond = cond or {}
    context = self._context(cond.get('context'), x.shape[0])
    vector = self._vector(cond.get('vector'), x.shape[0])
    emb = self._embed_time(t, x.shape[0])
    if self.num_classes is not None:
      emb = emb + nn.Embed(self.num_classes, 4 * self.base_channels, name='label_emb', dtype=jnp.float32,
                           param_dtype=self.param_dtype)(cond['label'])
    if vector is not None:  # float32, as the time embedding it joins
      emb = emb + layers.TimeEmbedding(4 * self.base_channels, name='vector_emb', dtype=jnp.float32,
                                       param_dtype=self.param_dtype)(vector.astype(jnp.float32))
    p = self.patch_size
    if p > 1:  # invertible: [B, H, W, C] -> [B, H/p, W/p, p*p*C], undone on the output
      b, height, w, c = x.shape
      x = x.reshape(b, height // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, height // p, w // p, -1)
    h, skips = self._down(x, emb, train, context)
    h = self._middle(h, emb, train, context)
    for level in reversed(range(len(self.channel_mult))):
      for i in range(self._num_res[level] + 1):
        h = self._res(jnp.concatenate([h, skips.pop()], axis=-1), emb, self._width(level), f'up_{level}_res_{i}',
                      train)
        if 2 ** level in self.attention_ds:
          h = self._attn(h, f'up_{level}_attn_{i}', level, context)
      if level != 0:
        name = f'up_{level}_upsample'
        if self.resblock_updown:
          h = self._res(h, emb, h.shape[-1], name, train, resample='up')
        else:
          h = layers.Upsample(self.conv_resample, name=name, dtype=self.dtype, param_dtype=self.param_dtype)(h)

    h = nn.silu(layers.group_norm(h.astype(jnp.float32), groups=self.norm_groups, eps=self.norm_eps,
                                  param_dtype=self.param_dtype, name='norm_out'))
    # Zero-initialised: the untrained network predicts 0, and training starts from the identity residual path.
    out = layers.conv(self.out_channels * p * p, name='conv_out', zero_init=True, dtype=jnp.float32,
                      param_dtype=self.param_dtype)(h)
    if p > 1:
      b, height, w, _ = out.shape
      out = out.reshape(b, height, w, p, p, self.out_channels).transpose(0, 1, 3, 2, 4, 5)
      out = out.reshape(b, height * p, w * p, self.out_channels)
    return out

  def _context(self, context, batch: int):
    """cond['context'], checked against context_dim: a wrong one fails here in one line, not deep in a matmul."""
    if not self.context_dim:
      if context is not None:
        raise ConfigError("model.context_dim=0: this UNet does not cross-attend, yet cond has a 'context'; set "
                          'model.context_dim to its width (and model.transformer_depth >= 1), or drop the context.')
      return None
    if context is None:
      raise ConfigError(f"model.context_dim={self.context_dim}: the UNet cross-attends to cond['context'] "
                        f'[B, L, {self.context_dim}], and none was given: pass the text encoder\'s (or class '
                        "embedder's) output as cond['context'].")
    shape = tuple(context.shape)
    if len(shape) != 3 or shape[0] != batch or shape[2] != self.context_dim:
      raise ConfigError(f"cond['context'] has shape {shape}; the UNet takes [{batch}, L, {self.context_dim}] "
                        f'(batch {batch}, model.context_dim={self.context_dim}): set model.context_dim to the '
                        'conditioner\'s width (text_encoder.width).')
    return context

  def _vector(self, vector, batch: int):
    """cond['vector'], checked against adm_in_channels (as `_context` checks the context)."""
    if not self.adm_in_channels:
      if vector is not None:
        raise ConfigError("model.adm_in_channels=0: this UNet takes no vector condition, yet cond has a 'vector'; set "
                          'model.adm_in_channels to its width, or drop the vector.')
      return None
    if vector is None:
      raise ConfigError(f'model.adm_in_channels={self.adm_in_channels}: the UNet adds an embedding of '
                        f"cond['vector'] [B, {self.adm_in_channels}], and none was given: pass the pooled text "
                        'embedding and micro-conditioning sinusoids as the vector, or set model.adm_in_channels=0.')
    shape = tuple(vector.shape)
    if shape != (batch, self.adm_in_channels):
      raise ConfigError(f"cond['vector'] has shape {shape}; the UNet takes [{batch}, {self.adm_in_channels}] (batch "
                        f'{batch}, model.adm_in_channels={self.adm_in_channels}): set model.adm_in_channels to the '
                        'pooled text width + latent.micro_embed_dim per micro-conditioning scalar.')
    return vector
