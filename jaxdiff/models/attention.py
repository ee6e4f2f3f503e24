"""Softmax attention computed over blocks of queries, with a hand-written (recomputing) backward pass.

Materialising the full [B, heads, T, S] weights costs a UNet at 32x32 resolution 64 MB per layer and batch of 8,
and XLA:CPU spends most of an ADM train step moving them (benchmarks/RESULTS.md). Here each block of queries sees
all keys at once, only the per-row log-sum-exp is kept for the backward pass, and the backward pass recomputes each
block's weights, as in FlashAttention. Logits, softmax and the backward pass run in float32.
"""

import functools

import jax
import jax.numpy as jnp

# Queries per block: 128 measured fastest on a 2-core CPU for 1024 tokens (48 ms forward+backward against 152 ms
# materialised, 60 ms at 256, 76 ms at 64); small enough that a block's weights stay in cache.
QUERY_BLOCK = 128


def query_block_size(length: int, target: int = QUERY_BLOCK) -> int:
  """The largest divisor of `length` up to `target`; the whole length when that divisor would be tiny."""
  if length <= target:
    return length
  block = max(d for d in range(1, target + 1) if length % d == 0)
  return block if block >= target // 4 else length


def _split(x, block: int):
  """[B, T, H, D] -> [T / block, B, block, H, D]."""
  b, t, h, d = x.shape
  return jnp.moveaxis(x.reshape(b, t // block, block, h, d), 1, 0)


def _merge(x):
  """Inverse of _split."""
  n, b, block, h, d = x.shape
  return jnp.moveaxis(x, 0, 1).reshape(b, n * block, h, d)


def _logits(q_block, k):
  scale = q_block.shape[-1] ** -0.5
  return jnp.einsum('bthd,bshd->bhts', q_block * jnp.asarray(scale, q_block.dtype), k,
                    preferred_element_type=jnp.float32)


def _forward(q, k, v, block):
  def one_block(q_block):
    logits = _logits(q_block, k)
    peak = jnp.max(logits, axis=-1, keepdims=True)
    unnormalised = jnp.exp(logits - peak)
    total = jnp.sum(unnormalised, axis=-1, keepdims=True)
    out = jnp.einsum('bhts,bshd->bthd', (unnormalised / total).astype(v.dtype), v)
    return out, (peak + jnp.log(total))[..., 0]

  out, log_sum_exp = jax.lax.map(one_block, _split(q, block))
  out = _merge(out)
  return out, (q, k, v, out, log_sum_exp)


def _backward(block, residuals, d_out):
  q, k, v, out, log_sum_exp = residuals
  scale = q.shape[-1] ** -0.5
  f32 = functools.partial(jnp.einsum, preferred_element_type=jnp.float32)
  # sum_s dP * P per row equals sum_d dOut * Out, which needs no [T, S] array.
  row_dot = f32('bthd,bthd->bht', d_out, out)
  b, t, h, _ = q.shape
  row_dot = jnp.moveaxis(row_dot.reshape(b, h, t // block, block), 2, 0)

  def one_block(carry, xs):
    dk, dv = carry
    q_block, d_out_block, lse_block, row_dot_block = xs
    weights = jnp.exp(_logits(q_block, k) - lse_block[..., None])
    dv = dv + f32('bhts,bthd->bshd', weights, d_out_block)
    d_weights = f32('bthd,bshd->bhts', d_out_block, v)
    d_logits = weights * (d_weights - row_dot_block[..., None])
    dq = f32('bhts,bshd->bthd', d_logits, k) * scale
    dk = dk + f32('bhts,bthd->bshd', d_logits, q_block) * scale
    return (dk, dv), dq

  zeros = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
  (dk, dv), dq = jax.lax.scan(one_block, zeros, (_split(q, block), _split(d_out, block), log_sum_exp, row_dot))
  return _merge(dq).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _blocked_attention(q, k, v, block):
  return _forward(q, k, v, block)[0]


_blocked_attention.defvjp(_forward, _backward)


def dot_product_attention(q, k, v):
  """softmax(q k^T / sqrt(d)) v for q [B, T, H, D] and k, v [B, S, H, D]; returns [B, T, H, D] in v's dtype."""
  return _blocked_attention(q, k, v, query_block_size(q.shape[1]))
