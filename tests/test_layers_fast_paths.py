"""The hand-written backward passes (GroupNorm, blocked attention) against autodiff of the textbook formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.models import attention, layers


def reference_group_norm(x, scale, bias, groups, eps):
  b, c = x.shape[0], x.shape[-1]
  xg = x.reshape(b, -1, groups, c // groups)
  mean = jnp.mean(xg, axis=(1, 3), keepdims=True)
  var = jnp.mean(jnp.square(xg - mean), axis=(1, 3), keepdims=True)
  return ((xg - mean) / jnp.sqrt(var + eps)).reshape(x.shape) * scale + bias


def reference_attention(q, k, v):
  logits = jnp.einsum('bthd,bshd->bhts', q, k) / np.sqrt(q.shape[-1])
  return jnp.einsum('bhts,bshd->bthd', jax.nn.softmax(logits, axis=-1), v)


def rel_err(a, b):
  return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


def random(shape, seed, offset=0.0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(np.float32)) + offset


@pytest.mark.parametrize('shape,groups', [((2, 8, 8, 64), 32), ((3, 5, 7, 12), 4), ((2, 16, 6), 3)])
def test_group_norm_value_and_grads_match_autodiff(shape, groups):
  x = random(shape, 0, offset=3.0)  # an offset mean: the two-pass variance matters
  scale, bias, d_out = random(shape[-1:], 1) + 1, random(shape[-1:], 2), random(shape, 3)
  ours = jax.vjp(lambda *a: layers.group_norm_fp32(*a, groups, 1e-6), x, scale, bias)
  ref = jax.vjp(lambda *a: reference_group_norm(*a, groups, 1e-6), x, scale, bias)
  assert rel_err(ours[0], ref[0]) < 1e-5
  for got, want in zip(ours[1](d_out), ref[1](d_out)):
    assert rel_err(got, want) < 1e-5


def test_group_norm_module_matches_flax_and_keeps_its_parameter_names():
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  x = random((2, 4, 4, 32), 0)
  ours = layers.GroupNorm(groups=8, eps=1e-5)
  params = ours.init(jax.random.key(0), x)
  flax_norm = nn.GroupNorm(num_groups=8, epsilon=1e-5, use_fast_variance=False)
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, flax_norm.init(jax.random.key(0), x))
  params = jax.tree.map(lambda p: p + random(p.shape, 5), params)
  assert rel_err(ours.apply(params, x), flax_norm.apply(params, x)) < 1e-5
  with pytest.raises(ValueError, match='do not split into 5 groups'):
    layers.GroupNorm(groups=5, eps=1e-5).init(jax.random.key(0), x)


@pytest.mark.parametrize('t,s,heads,dim', [(256, 256, 2, 16), (49, 49, 1, 8), (200, 77, 4, 8)])
def test_blocked_attention_value_and_grads_match_autodiff(t, s, heads, dim):
  q, k, v, d_out = random((2, t, heads, dim), 0), random((2, s, heads, dim), 1), random((2, s, heads, dim), 2), \
      random((2, t, heads, dim), 3)
  ours = jax.vjp(attention.dot_product_attention, q * 3, k, v)  # larger logits: a peaked softmax
  ref = jax.vjp(reference_attention, q * 3, k, v)
  assert rel_err(ours[0], ref[0]) < 1e-5
  for got, want in zip(ours[1](d_out), ref[1](d_out)):
    assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize('length,block', [(49, 49), (128, 128), (1024, 128), (4096, 128), (200, 100), (1021, 1021)])
def test_query_block_size(length, block):
  assert attention.query_block_size(length) == block


def test_blocked_attention_in_bfloat16_stays_close():
  q, k, v = (random((2, 256, 2, 16), i) for i in range(3))
  ours = attention.dot_product_attention(*(a.astype(jnp.bfloat16) for a in (q, k, v)))
  assert ours.dtype == jnp.bfloat16
  assert rel_err(ours.astype(jnp.float32), reference_attention(q, k, v)) < 2e-2
