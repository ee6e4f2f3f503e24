"""The first stage of latent diffusion: LDM's convolutional autoencoders (Flax linen, NHWC).

AutoencoderKL encodes to a diagonal Gaussian posterior; VQModel is LDM's "VQ-reg" model, whose encoder gives
continuous latents that its decoder quantises first. Both reproduce diffusers' AutoencoderKL/VQModel and CompVis'
ldm.models.autoencoder networks exactly (jaxdiff.convert.autoencoder maps their weights).

Parameter names (stable; the converter maps onto them):
  encoder/{conv_in, down_{level}_res_{i}, down_{level}_attn_{i}, down_{level}_downsample, mid_res_0, mid_attn,
           mid_res_1, norm_out, conv_out}
  decoder/{conv_in, mid_res_0, mid_attn, mid_res_1, up_{level}_res_{i}, up_{level}_attn_{i}, up_{level}_upsample,
           norm_out, conv_out}
  quant_conv, post_quant_conv, and for VQModel quantize/embedding.
`level` counts resolutions from the image (0) down on both paths; up_{level} has num_res_blocks + 1 blocks.
"""

import dataclasses
import functools
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.errors import ConfigError
from jaxdiff.models import layers

Dtype = Any

# The `config.autoencoder` keys that describe the network, with their defaults (LDM's and SD's kl-f8).
# attention_levels: levels whose blocks attend after every ResBlock (LDM's attn_resolutions as levels).
SECTION_DEFAULTS = dict(kind='kl', base_channels=128, channel_mult=(1, 2, 4, 4), num_res_blocks=2, latent_channels=4,
                        mid_attention=True, attention_levels=(), norm_groups=32, num_embeddings=8192,
                        embedding_dim=0, beta=0.25, scale_factor=0.0)


def _layout(kind, channel_mult, latent_channels, scale_factor, *, base_channels=128, num_res_blocks=2,
            attention_levels=(), mid_attention=True, num_embeddings=8192, embedding_dim=0):
  return dict(SECTION_DEFAULTS, kind=kind, base_channels=base_channels, channel_mult=channel_mult,
              num_res_blocks=num_res_blocks, latent_channels=latent_channels, mid_attention=mid_attention,
              attention_levels=attention_levels, num_embeddings=num_embeddings, embedding_dim=embedding_dim,
              scale_factor=scale_factor)


# Released first stages: name -> (kind, config.autoencoder section, parameter count). Layouts from
# latent-diffusion's models/first_stage_models/*/config.yaml (attn_resolutions at resolution 256 as levels) and
# the SD/SDXL VAE configs; counts checked against diffusers' AutoencoderKL/VQModel in tests/test_autoencoder.py.
# scale_factor: what the LDM/SD configs multiply latents by (kl-f8: txt2img-1p4B and SD; kl-f16: the RDM; the
# VQ LDMs leave it at 1); 0.0 where no released config says.
PUBLISHED_LAYOUTS = {
    'sd': ('kl', _layout('kl', (1, 2, 4, 4), 4, 0.18215), 83_653_863),
    'sdxl': ('kl', _layout('kl', (1, 2, 4, 4), 4, 0.13025), 83_653_863),
    'kl-f4': ('kl', _layout('kl', (1, 2, 4), 3, 0.0), 55_312_063),
    'kl-f8': ('kl', _layout('kl', (1, 2, 4, 4), 4, 0.18215), 83_653_863),
    'kl-f16': ('kl', _layout('kl', (1, 1, 2, 2, 4), 16, 0.22765929, attention_levels=(4,)), 69_610_963),
    'kl-f32': ('kl', _layout('kl', (1, 1, 2, 2, 4, 4), 64, 0.0, attention_levels=(4, 5)), 103_880_131),
    'vq-f4': ('vq', _layout('vq', (1, 2, 4), 3, 1.0, embedding_dim=3), 55_322_782),
    'vq-f4-noattn': ('vq', _layout('vq', (1, 2, 4), 3, 1.0, embedding_dim=3, mid_attention=False), 53_219_486),
    'vq-f8': ('vq', _layout('vq', (1, 2, 2, 4), 4, 1.0, num_embeddings=16384, embedding_dim=4,
                            attention_levels=(3,)), 67_717_295),
    'vq-f8-n256': ('vq', _layout('vq', (1, 2, 2, 4), 4, 1.0, num_embeddings=256, embedding_dim=4,
                                 attention_levels=(3,)), 67_652_783),
    'vq-f16': ('vq', _layout('vq', (1, 1, 2, 2, 4), 8, 1.0, num_embeddings=16384, embedding_dim=8,
                             attention_levels=(4,)), 69_593_371),
}


@flax.struct.dataclass
class DiagonalGaussian:
  """The KL autoencoder's posterior N(mean, var) from the moments [B, h, w, 2C] (mean, then log-variance)."""
  moments: jax.Array

  @property
  def mean(self):
    return self.moments[..., :self.moments.shape[-1] // 2]

  @property
  def logvar(self):
    return jnp.clip(self.moments[..., self.moments.shape[-1] // 2:], -30.0, 20.0)  # as LDM: exp() stays finite

  @property
  def std(self):
    return jnp.exp(0.5 * self.logvar)

  @property
  def var(self):
    return jnp.exp(self.logvar)

  def sample(self, key):
    return self.mean + self.std * jax.random.normal(key, self.mean.shape, self.mean.dtype)

  def mode(self):
    return self.mean

  def kl(self):
    """KL(posterior || N(0, I)) per example, [B], summed over h, w and C."""
    return 0.5 * jnp.sum(jnp.square(self.mean) + self.var - 1.0 - self.logvar, axis=(1, 2, 3))


# Blocks of the Encoder and Decoder, built inside their compact __call__ from the module's fields.

def _res(m, h, width, name):
  return layers.ResBlock(width, norm_groups=m.norm_groups, norm_eps=m.norm_eps, dtype=m.dtype,
                         param_dtype=m.param_dtype, name=name)(h, None, False)


def _attn(m, h, name):
  return layers.AttentionBlock(num_heads=1, norm_groups=m.norm_groups, norm_eps=m.norm_eps, dtype=m.dtype,
                               param_dtype=m.param_dtype, name=name)(h)


def _middle(m, h):
  h = _res(m, h, h.shape[-1], 'mid_res_0')
  if m.mid_attention:
    h = _attn(m, h, 'mid_attn')
  return _res(m, h, h.shape[-1], 'mid_res_1')


def _head(m, h, features):
  """norm, SiLU, conv_out; in float32 (a few output channels: cheap, and the posterior's log-variance or the
  pixels keep their precision under a bf16 compute dtype)."""
  h = nn.silu(layers.group_norm(h.astype(jnp.float32), groups=m.norm_groups, eps=m.norm_eps,
                                param_dtype=m.param_dtype, name='norm_out'))
  return layers.conv(features, name='conv_out', dtype=jnp.float32, param_dtype=m.param_dtype)(h)


def _check_channels(name, x, channels):
  if x.shape[-1] != channels:
    raise ValueError(f'{name}: input has {x.shape[-1]} channels, the module takes {channels}')


class _Tower(nn.Module):
  """The fields the encoder and the decoder share."""
  base_channels: int
  channel_mult: tuple[int, ...]
  num_res_blocks: int
  latent_channels: int
  mid_attention: bool = True
  attention_levels: tuple[int, ...] = ()
  norm_groups: int = 32
  norm_eps: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32


class Encoder(_Tower):
  """Image [B, H, W, in] -> [B, H/f, W/f, 2*latent (double_z) or latent], f = 2 ** (levels - 1)."""
  double_z: bool = True

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = layers.conv(self.base_channels * self.channel_mult[0], name='conv_in', **kw)(x.astype(self.dtype))
    for level, mult in enumerate(self.channel_mult):
      for i in range(self.num_res_blocks):
        h = _res(self, h, self.base_channels * mult, f'down_{level}_res_{i}')
        if level in self.attention_levels:
          h = _attn(self, h, f'down_{level}_attn_{i}')
      if level != len(self.channel_mult) - 1:
        # Stride 2 after padding only bottom/right, as diffusers' Downsample2D(padding=0) and LDM's Downsample.
        h = layers.Downsample(padding='asymmetric', name=f'down_{level}_downsample', **kw)(h)
    h = _middle(self, h)
    return _head(self, h, 2 * self.latent_channels if self.double_z else self.latent_channels)


class Decoder(_Tower):
  """Latents [B, h, w, latent] -> image [B, h*f, w*f, out_channels] float32."""
  out_channels: int = 3

  @nn.compact
  def __call__(self, z):
    _check_channels('Decoder', z, self.latent_channels)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = layers.conv(self.base_channels * self.channel_mult[-1], name='conv_in', **kw)(z.astype(self.dtype))
    h = _middle(self, h)
    for level in reversed(range(len(self.channel_mult))):
      for i in range(self.num_res_blocks + 1):
        h = _res(self, h, self.base_channels * self.channel_mult[level], f'up_{level}_res_{i}')
        if level in self.attention_levels:
          h = _attn(self, h, f'up_{level}_attn_{i}')
      if level != 0:
        h = layers.Upsample(name=f'up_{level}_upsample', **kw)(h)
    return _head(self, h, self.out_channels)


def _conv1x1(features, param_dtype):
  # name=None: named by the setup attribute it is assigned to. float32: a per-pixel map of a few channels.
  return layers.conv(features, kernel=1, padding=((0, 0), (0, 0)), dtype=jnp.float32, param_dtype=param_dtype,
                     name=None)


class VectorQuantizer(nn.Module):
  """Nearest-code quantisation of [B, h, w, D] with taming's codebook init and straight-through gradient.

  Returns (z_q, aux): aux holds `loss` (LDM's/taming's legacy form: mean((z - sg[z_q])^2) + beta * mean((sg[z] -
  z_q)^2), i.e. commitment weight 1 and codebook weight beta; both terms have the same value, only their gradients
  differ), `perplexity` and `usage` (fraction of codes used) of the batch, and `indices` [B, h, w].
  """
  num_embeddings: int
  embedding_dim: int
  beta: float = 0.25
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, z):
    k = self.num_embeddings
    init = lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -1.0 / k, 1.0 / k)
    codebook = self.param('embedding', init, (k, self.embedding_dim), self.param_dtype).astype(jnp.float32)
    z = z.astype(jnp.float32)
    flat = z.reshape(-1, self.embedding_dim)
    # |z - e|^2 = |z|^2 - 2 z.e + |e|^2 in float32 at full matmul precision (bf16 passes would move ties).
    dots = jnp.dot(flat, codebook.T, precision=jax.lax.Precision.HIGHEST)
    distances = jnp.sum(flat ** 2, axis=1, keepdims=True) - 2 * dots + jnp.sum(codebook ** 2, axis=1)[None]
    indices = jnp.argmin(distances, axis=1)
    z_q = codebook[indices].reshape(z.shape)
    sg = jax.lax.stop_gradient
    loss = jnp.mean(jnp.square(z - sg(z_q))) + self.beta * jnp.mean(jnp.square(sg(z) - z_q))
    probs = jnp.zeros((k,), jnp.float32).at[indices].add(1.0) / indices.size
    aux = dict(loss=loss, perplexity=jnp.exp(-jnp.sum(probs * jnp.log(probs + 1e-10))),
               usage=jnp.mean((probs > 0).astype(jnp.float32)), indices=indices.reshape(z.shape[:-1]))
    return z + sg(z_q - z), aux


class _FirstStage(_Tower):
  """The fields AutoencoderKL and VQModel add to the towers' (which they pass on to both)."""
  in_channels: int = 3
  out_channels: int = 3

  def _trunk(self):
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(_Tower) if f.name not in ('parent', 'name')}


class AutoencoderKL(_FirstStage):
  """LDM's KL-regularised autoencoder: encode(x) -> DiagonalGaussian, decode(z) -> image."""

  def setup(self):
    self.encoder = Encoder(double_z=True, **self._trunk())
    self.decoder = Decoder(out_channels=self.out_channels, **self._trunk())
    self.quant_conv = _conv1x1(2 * self.latent_channels, self.param_dtype)
    self.post_quant_conv = _conv1x1(self.latent_channels, self.param_dtype)

  def encode(self, x) -> DiagonalGaussian:
    _check_channels('AutoencoderKL', x, self.in_channels)
    return DiagonalGaussian(self.quant_conv(self.encoder(x)))

  def decode(self, z):
    return self.decoder(self.post_quant_conv(z))

  def __call__(self, x, key=None):
    """(reconstruction, posterior); the posterior is sampled with `key`, else its mean is decoded."""
    posterior = self.encode(x)
    return self.decode(posterior.mode() if key is None else posterior.sample(key)), posterior


class VQModel(_FirstStage):
  """LDM's VQ-reg autoencoder: encode(x) -> continuous latents h [B, h, w, embedding_dim]; decode(h) quantises them
  (the diffusion model works on the continuous h)."""
  num_embeddings: int = 8192
  embedding_dim: int = 0  # 0: latent_channels
  beta: float = 0.25

  @property
  def code_dim(self) -> int:
    return self.embedding_dim or self.latent_channels

  def setup(self):
    self.encoder = Encoder(double_z=False, **self._trunk())
    self.decoder = Decoder(out_channels=self.out_channels, **self._trunk())
    self.quant_conv = _conv1x1(self.code_dim, self.param_dtype)
    self.quantize = VectorQuantizer(self.num_embeddings, self.code_dim, self.beta, param_dtype=self.param_dtype)
    self.post_quant_conv = _conv1x1(self.latent_channels, self.param_dtype)

  def encode(self, x):
    _check_channels('VQModel', x, self.in_channels)
    return self.quant_conv(self.encoder(x))

  def decode(self, h, quantize: bool = True):
    if quantize:
      h = self.quantize(h)[0]
    return self.decoder(self.post_quant_conv(h))

  def __call__(self, x):
    """(reconstruction, the quantiser's aux dict)."""
    z_q, aux = self.quantize(self.encode(x))
    return self.decoder(self.post_quant_conv(z_q)), aux


def _section_value(cfg, key):
  return cfg[key] if key in cfg else SECTION_DEFAULTS[key]


def create_autoencoder(cfg, *, channels, dtype=jnp.float32, param_dtype=jnp.float32):
  """The AutoencoderKL or VQModel of a `config.autoencoder` section (keys of SECTION_DEFAULTS; absent optional keys
  take their defaults) for images of `channels` channels, its values checked."""
  get = functools.partial(_section_value, cfg)
  kind = get('kind')
  if kind not in ('kl', 'vq'):
    raise ConfigError(f"autoencoder.kind={kind!r}: use 'kl' or 'vq'")
  base, mult, groups = int(get('base_channels')), tuple(int(m) for m in get('channel_mult')), int(get('norm_groups'))
  if not mult:
    raise ConfigError('autoencoder.channel_mult is empty: give one multiplier per level, e.g. (1, 2, 4, 4)')
  for width in (base * m for m in mult):
    if width % groups:
      raise ConfigError(f"autoencoder.norm_groups={groups} must divide every level's channels "
                        f'(autoencoder.base_channels x channel_mult = {width}): use a divisor of them')
  attention_levels = tuple(int(level) for level in get('attention_levels'))
  if any(not 0 <= level < len(mult) for level in attention_levels):
    raise ConfigError(f'autoencoder.attention_levels={attention_levels}: levels run from 0 to {len(mult) - 1}')
  if channels < 1:
    raise ConfigError(f'channels={channels}: the images must have at least one channel')
  fields = dict(in_channels=channels, out_channels=channels, base_channels=base, channel_mult=mult,
                num_res_blocks=int(get('num_res_blocks')), latent_channels=int(get('latent_channels')),
                mid_attention=bool(get('mid_attention')), attention_levels=attention_levels, norm_groups=groups,
                dtype=dtype, param_dtype=param_dtype)
  if kind == 'kl':
    return AutoencoderKL(**fields)
  if int(get('num_embeddings')) < 2:
    raise ConfigError(f'autoencoder.num_embeddings={get("num_embeddings")}: a codebook needs at least 2 codes')
  return VQModel(num_embeddings=int(get('num_embeddings')), embedding_dim=int(get('embedding_dim')),
                 beta=float(get('beta')), **fields)


def param_shapes(model: AutoencoderKL | VQModel):
  """The params tree as ShapeDtypeStructs, computing nothing (the smallest image the levels allow)."""
  size = 2 ** (len(model.channel_mult) - 1)
  x = jnp.zeros((1, size, size, model.in_channels), jnp.float32)
  return jax.eval_shape(model.init, jax.random.key(0), x)['params']


def init_params(model: AutoencoderKL | VQModel, rng):
  """The params tree, initialised under jit (an unjitted linen init is slow on CPU)."""
  size = 2 ** (len(model.channel_mult) - 1)
  return jax.jit(model.init)(rng, jnp.zeros((1, size, size, model.in_channels), jnp.float32))['params']


def _blend(previous, tile, extent: int, axis: int):
  """`tile` with its first `extent` rows (axis 1) or columns (axis 2) faded in linearly from the last ones of its
  neighbour `previous`, as diffusers' blend_v/blend_h."""
  extent = min(previous.shape[axis], tile.shape[axis], extent)
  shape = [1] * tile.ndim
  shape[axis] = extent
  weight = (np.arange(extent, dtype=np.float32) / np.float32(max(extent, 1))).reshape(shape)
  head = np.take(tile, np.arange(extent), axis=axis)
  tail = np.take(previous, np.arange(previous.shape[axis] - extent, previous.shape[axis]), axis=axis)
  return np.concatenate([tail * (1 - weight) + head * weight, np.take(tile, np.arange(extent, tile.shape[axis]),
                                                                      axis=axis)], axis=axis)


@functools.cache
def _jitted_decode(model):
  """model.decode under jit, one per model (modules are hashable): repeated tiled decodes trace each shape once."""
  return jax.jit(lambda params, z: model.apply({'params': params}, z, method=model.decode))


def tiled_decode(model: AutoencoderKL | VQModel, params, z, *, tile: int, overlap: float = 0.25) -> np.ndarray:
  """Decodes latents z [B, h, w, C] in overlapping tiles of `tile` latent pixels, as diffusers'
  AutoencoderKL.tiled_decode: tiles start every int(tile * (1 - overlap)) latent pixels; in image space each tile is
  blended linearly into the one above and the one to its left (both already blended) across the overlap, then
  cropped to its stride. The device holds one tile's activations (its attention included), never the whole image's;
  the image is assembled on the host, as a float32 NumPy array.

  Equals model.decode when the tile covers the latents. The blend width, diffusers' int(tile * f * overlap) image
  pixels, is taken as f * (tile - stride): the same number whenever diffusers' own tiles line up (tile * overlap an
  integer); otherwise diffusers' crops do not add up to the image size.
  """
  decode = _jitted_decode(model)
  height, width = z.shape[1:3]
  if tile >= height and tile >= width:
    return np.asarray(decode(params, z), np.float32)
  stride = int(tile * (1 - overlap))
  if not 0 < stride <= tile:
    raise ValueError(f'tiled_decode: tile={tile} with overlap={overlap} gives a stride of {stride} latent pixels: '
                     'use 0 <= overlap < 1 and a tile of at least 1 / (1 - overlap) pixels')
  factor = 2 ** (len(model.channel_mult) - 1)
  blend, keep = factor * (tile - stride), factor * stride
  above, rows = None, []
  for i in range(0, height, stride):
    row = []
    for j in range(0, width, stride):
      decoded = np.asarray(decode(params, z[:, i:i + tile, j:j + tile]), np.float32)
      if above is not None:
        decoded = _blend(above[len(row)], decoded, blend, axis=1)
      if row:
        decoded = _blend(row[-1], decoded, blend, axis=2)
      row.append(decoded)
    rows.append(np.concatenate([t[:, :keep, :keep] for t in row], axis=2))
    above = row
  return np.concatenate(rows, axis=1)
