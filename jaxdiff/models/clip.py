"""The CLIP text transformer (OpenAI CLIP / OpenCLIP text towers, transformers' CLIPTextModel[WithProjection]), the
factory from the `config.text_encoder` section, and a jitted init.

  encoder = create_text_encoder(config.text_encoder)
  params = init_text_encoder(encoder, jax.random.key(0))
  out = encoder.apply({'params': params}, tokens)   # tokens [B, L] int32 from jaxdiff.models.tokenizer
  context = out[config.text_encoder.output]          # what the UNet cross-attends to, [B, L, width]
  pooled = out['projected']                          # SDXL's pooled text embedding (projection_dim > 0), same call

Every output comes from one call (under jit what is not read is not computed): SDXL reads the penultimate output of
both its encoders as the context and the projected pooled output of OpenCLIP bigG in its vector condition.
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdiff.errors import ConfigError
from jaxdiff.models import layers

Dtype = Any

ACTIVATIONS = {
    'quick_gelu': lambda x: x * jax.nn.sigmoid(1.702 * x),  # OpenAI CLIP
    'gelu': functools.partial(jax.nn.gelu, approximate=False),  # OpenCLIP (torch's exact nn.GELU)
}
OUTPUTS = ('last', 'penultimate')
NORM_EPS = 1e-5
MLP_RATIO = 4
# The `text_encoder` section keys (jaxdiff/defaults.py) with their defaults: CLIP ViT-L/14's text tower (SD 1.x).
SECTION_DEFAULTS = dict(kind='clip', vocab_size=49408, width=768, num_layers=12, num_heads=12, max_length=77,
                        activation='quick_gelu', output='last', projection_dim=0, eos_token_id=49407, pad_token='',
                        tokenizer=None, init_from=None, trainable=False)
# The keys that fix the network (and its parameter shapes); a checkpoint must agree with the config on them.
STRUCTURE = ('vocab_size', 'width', 'num_layers', 'num_heads', 'max_length', 'activation', 'projection_dim',
             'eos_token_id')


def _layer_norm(param_dtype, name):
  # float32 whatever the compute dtype, with a two-pass variance as torch's (the one-pass form loses digits when the
  # mean is large against the spread).
  return nn.LayerNorm(epsilon=NORM_EPS, dtype=jnp.float32, param_dtype=param_dtype, use_fast_variance=False,
                      name=name)


class EncoderLayer(nn.Module):
  """Pre-LN block: x + causal self-attention(LN(x)), then x + MLP(LN(x)); the residual stream stays float32."""
  num_heads: int
  activation: str = 'quick_gelu'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, length, width = x.shape
    heads = self.num_heads
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = _layer_norm(self.param_dtype, 'layer_norm1')(x)
    # Fused q, k, v (in that order): transformers' separate projections concatenate into it, OpenCLIP's in_proj is it.
    qkv = layers.dense(3 * width, name='qkv', **kw)(h).astype(self.dtype)
    q, k, v = jnp.moveaxis(qkv.reshape(b, length, 3, heads, width // heads), 2, 0)
    # A plain masked softmax: L = 77 is too short for the blocked kernel of jaxdiff.models.attention to pay.
    logits = jnp.einsum('bthd,bshd->bhts', q, k, preferred_element_type=jnp.float32) * (width // heads) ** -0.5
    causal = jnp.tril(jnp.ones((length, length), bool))
    weights = jax.nn.softmax(jnp.where(causal, logits, jnp.finfo(jnp.float32).min), axis=-1)
    h = jnp.einsum('bhts,bshd->bthd', weights.astype(self.dtype), v).reshape(b, length, width)
    x = x + layers.dense(width, name='out_proj', **kw)(h)
    h = _layer_norm(self.param_dtype, 'layer_norm2')(x)
    h = ACTIVATIONS[self.activation](layers.dense(MLP_RATIO * width, name='fc1', **kw)(h))
    return x + layers.dense(width, name='fc2', **kw)(h)


class CLIPTextTransformer(nn.Module):
  """Token ids [B, L] (L <= max_length) -> a dict of float32 arrays:

  last [B, L, W]: the final LayerNorm of the last layer's output (transformers' last_hidden_state);
  penultimate [B, L, W]: the input of the last layer, without LayerNorm (transformers' hidden_states[-2]);
  pooled [B, W]: `last` at each row's first eos_token_id (transformers' pooler_output);
  projected [B, projection_dim]: pooled times text_projection (no bias), only when projection_dim > 0.
  """
  vocab_size: int = 49408
  width: int = 768
  num_layers: int = 12
  num_heads: int = 12
  max_length: int = 77
  activation: str = 'quick_gelu'
  projection_dim: int = 0
  eos_token_id: int = 49407
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens):
    length = tokens.shape[-1]
    if length > self.max_length:
      raise ValueError(f'CLIPTextTransformer: {length} tokens, the position embedding has {self.max_length}')
    # CLIP's init: token embeddings N(0, 0.02^2), positions N(0, 0.01^2).
    x = nn.Embed(self.vocab_size, self.width, dtype=jnp.float32, param_dtype=self.param_dtype,
                 embedding_init=nn.initializers.normal(0.02), name='token_embedding')(tokens)
    positions = self.param('position_embedding', nn.initializers.normal(0.01), (self.max_length, self.width),
                           self.param_dtype)
    x = x + positions[:length].astype(jnp.float32)
    penultimate = x
    for i in range(self.num_layers):
      penultimate = x
      x = EncoderLayer(self.num_heads, self.activation, dtype=self.dtype, param_dtype=self.param_dtype,
                       name=f'layers_{i}')(x)
    last = _layer_norm(self.param_dtype, 'final_layer_norm')(x)
    # The first eos of each row (pad may equal eos); a row without one pools position 0, as transformers does.
    first_eos = jnp.argmax(tokens == self.eos_token_id, axis=-1)
    pooled = jnp.take_along_axis(last, first_eos[:, None, None], axis=1)[:, 0]
    out = dict(last=last, penultimate=penultimate, pooled=pooled)
    if self.projection_dim:
      out['projected'] = nn.Dense(self.projection_dim, use_bias=False, dtype=jnp.float32,
                                  param_dtype=self.param_dtype, name='text_projection')(pooled)
    return out


def _get(section, key):
  return section[key] if key in section else SECTION_DEFAULTS[key]


def create_text_encoder(section, *, dtype=jnp.float32, param_dtype=jnp.float32) -> CLIPTextTransformer:
  """The CLIPTextTransformer of a `config.text_encoder` section (absent keys take SECTION_DEFAULTS), checked."""
  get = functools.partial(_get, section)
  if get('kind') != 'clip':
    raise ConfigError(f"text_encoder.kind={get('kind')!r}: set --config.text_encoder.kind=clip to build the CLIP text "
                      'encoder')
  fields = {key: get(key) for key in STRUCTURE}
  for key in ('vocab_size', 'width', 'num_layers', 'num_heads', 'max_length'):
    if not isinstance(fields[key], int) or fields[key] < 1:
      raise ConfigError(f'text_encoder.{key}={fields[key]!r}: use a positive integer')
  if fields['width'] % fields['num_heads']:
    raise ConfigError(f"text_encoder.num_heads={fields['num_heads']} does not divide text_encoder.width="
                      f"{fields['width']}: use a divisor of it (CLIP uses width // 64)")
  if fields['activation'] not in ACTIVATIONS:
    raise ConfigError(f"text_encoder.activation={fields['activation']!r}: use one of {', '.join(ACTIVATIONS)}")
  if get('output') not in OUTPUTS:
    raise ConfigError(f"text_encoder.output={get('output')!r}: use one of {', '.join(OUTPUTS)}")
  if not 0 <= fields['eos_token_id'] < fields['vocab_size']:
    raise ConfigError(f"text_encoder.eos_token_id={fields['eos_token_id']} is not a token of the "
                      f"{fields['vocab_size']}-token vocabulary: use the tokenizer's eos id")
  if fields['projection_dim'] < 0:
    raise ConfigError(f"text_encoder.projection_dim={fields['projection_dim']}: use 0 (none) or a positive width")
  if fields['max_length'] < 2:
    raise ConfigError(f"text_encoder.max_length={fields['max_length']}: tokens need room for bos and eos (>= 2)")
  return CLIPTextTransformer(**fields, dtype=dtype, param_dtype=param_dtype)


def _dummy_tokens(module: CLIPTextTransformer):
  return jnp.zeros((1, module.max_length), jnp.int32)


def init_text_encoder(module: CLIPTextTransformer, rng):
  """The params tree, initialised under jit (an unjitted linen init is slow on CPU)."""
  return jax.jit(module.init)(rng, _dummy_tokens(module))['params']


def text_encoder_shapes(module: CLIPTextTransformer):
  """The params tree as ShapeDtypeStructs, computing nothing (for conversion, counts and sharding plans)."""
  return jax.eval_shape(module.init, jax.random.key(0), _dummy_tokens(module))['params']
