"""Softmax attention computed over blocks of queries, with a hand-written (recomputing) backward pass, and the choice
of attention implementation per backend.

Materialising the full [B, heads, T, S] weights costs a UNet at 32x32 resolution 64 MB per layer and batch of 8,
and XLA:CPU spends most of an ADM train step moving them (benchmarks/RESULTS.md). Here each block of queries sees
all keys at once, only the per-row log-sum-exp is kept for the backward pass, and the backward pass recomputes each
block's weights, as in FlashAttention. Logits, softmax and the backward pass run in float32.

`dot_product_attention` is the ADM blocks' kernel (token-major, as it always was); `fast_attention` is the spatial
transformers': cuDNN's flash attention on GPUs, XLA's own where the weights are small, else the blocked kernel over
a head-major copy of q, k, v.
"""

import functools

import jax
import jax.numpy as jnp

# Queries per block: 128 measured fastest on a 2-core CPU for 1024 tokens (48 ms forward+backward against 152 ms
# materialised, 60 ms at 256, 76 ms at 64); small enough that a block's weights stay in cache.
QUERY_BLOCK = 128
# blocked_attention_heads_first's blocks hold about this many logits ([B, heads, block, S], 16 MiB in float32).
# Measured forward+backward on a 2-core CPU: SD's 4096 tokens x 8 heads at batch 1: blocks of 64-128 queries (32:
# 1.5x the time, 256: 1.15x); 77 context keys: one block of all 4096 queries (1.25x faster than 128); 1024 tokens x 2
# heads at batch 8: 64-256 (one block of 1024: 1.5x).
LOGITS_PER_BLOCK = 2 ** 22

# Each layout: the einsum letters of q (and of k, v), and the axis that holds the tokens.
LAYOUTS = {'tokens_first': ('bthd', 'bshd', 1), 'heads_first': ('bhtd', 'bhsd', 2)}


def query_block_size(length: int, target: int = QUERY_BLOCK) -> int:
  """The largest divisor of `length` up to `target`; the whole length when that divisor would be tiny."""
  if length <= target:
    return length
  block = max(d for d in range(1, target + 1) if length % d == 0)
  return block if block >= target // 4 else length


def _split(x, block: int, axis: int):
  """The token axis cut into blocks, the block index first: [B, T, H, D] -> [T / block, B, block, H, D]."""
  shape = x.shape
  return jnp.moveaxis(x.reshape(*shape[:axis], shape[axis] // block, block, *shape[axis + 1:]), axis, 0)


def _merge(x, axis: int):
  """Inverse of _split."""
  x = jnp.moveaxis(x, 0, axis)
  shape = x.shape
  return x.reshape(*shape[:axis], shape[axis] * shape[axis + 1], *shape[axis + 2:])


def _logits(q_block, k, layout):
  q_letters, k_letters, _ = LAYOUTS[layout]
  scale = q_block.shape[-1] ** -0.5
  return jnp.einsum(f'{q_letters},{k_letters}->bhts', q_block * jnp.asarray(scale, q_block.dtype), k,
                    preferred_element_type=jnp.float32)


def _forward(q, k, v, block, layout):
  q_letters, k_letters, axis = LAYOUTS[layout]

  def one_block(q_block):
    logits = _logits(q_block, k, layout)
    peak = jnp.max(logits, axis=-1, keepdims=True)
    unnormalised = jnp.exp(logits - peak)
    total = jnp.sum(unnormalised, axis=-1, keepdims=True)
    out = jnp.einsum(f'bhts,{k_letters}->{q_letters}', (unnormalised / total).astype(v.dtype), v)
    return out, (peak + jnp.log(total))[..., 0]

  out, log_sum_exp = jax.lax.map(one_block, _split(q, block, axis))
  out = _merge(out, axis)
  return out, (q, k, v, out, log_sum_exp)


def _backward(block, layout, residuals, d_out):
  q, k, v, out, log_sum_exp = residuals
  q_letters, k_letters, axis = LAYOUTS[layout]
  scale = q.shape[-1] ** -0.5
  f32 = functools.partial(jnp.einsum, preferred_element_type=jnp.float32)
  # sum_s dP * P per row equals sum_d dOut * Out, which needs no [T, S] array.
  row_dot = f32(f'{q_letters},{q_letters}->bht', d_out, out)
  b, h, t = row_dot.shape
  row_dot = jnp.moveaxis(row_dot.reshape(b, h, t // block, block), 2, 0)

  def one_block(carry, xs):
    dk, dv = carry
    q_block, d_out_block, lse_block, row_dot_block = xs
    weights = jnp.exp(_logits(q_block, k, layout) - lse_block[..., None])
    dv = dv + f32(f'bhts,{q_letters}->{k_letters}', weights, d_out_block)
    d_weights = f32(f'{q_letters},{k_letters}->bhts', d_out_block, v)
    d_logits = weights * (d_weights - row_dot_block[..., None])
    dq = f32(f'bhts,{k_letters}->{q_letters}', d_logits, k) * scale
    dk = dk + f32(f'bhts,{q_letters}->{k_letters}', d_logits, q_block) * scale
    return (dk, dv), dq

  zeros = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
  (dk, dv), dq = jax.lax.scan(one_block, zeros, (_split(q, block, axis), _split(d_out, block, axis), log_sum_exp,
                                                 row_dot))
  return _merge(dq, axis).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _blocked_attention(q, k, v, block, layout):
  return _forward(q, k, v, block, layout)[0]


_blocked_attention.defvjp(_forward, _backward)


def dot_product_attention(q, k, v):
  """softmax(q k^T / sqrt(d)) v for q [B, T, H, D] and k, v [B, S, H, D]; returns [B, T, H, D] in v's dtype."""
  return _blocked_attention(q, k, v, query_block_size(q.shape[1]), 'tokens_first')


def blocked_attention_heads_first(q, k, v):
  """dot_product_attention over head-major copies of q, k, v: XLA:CPU then reads contiguous [tokens, D] rows in
  every block instead of transposing k and v again in each (1.3-1.9x faster at Stable Diffusion's shapes)."""
  b, t, h, _ = q.shape
  block = query_block_size(t, max(32, LOGITS_PER_BLOCK // (b * h * k.shape[1])))
  heads_first = lambda x: jnp.swapaxes(x, 1, 2)
  return heads_first(_blocked_attention(heads_first(q), heads_first(k), heads_first(v), block, 'heads_first'))


def fast_attention(q, k, v):
  """dot_product_attention by the implementation measured fastest on this backend, holding the full [B, H, T, S]
  weights only where they are small (never SD's 512 MiB per image and layer at 512px's 4096 tokens).

  GPU, bf16/fp16: cuDNN's flash attention through jax.nn.dot_product_attention. Not measured: the benchmarks ran on
  a CPU-only machine. It takes only half-precision inputs and head sizes that are multiples of 8 (up to 128, 256
  from Hopper on), and raises while tracing otherwise or without cuDNN; those cases fall through to the rest.
  Weights of at most LOGITS_PER_BLOCK: XLA's jax.nn.dot_product_attention, which materialises them (on CPU, SD's
  cross-attention to 77 tokens: as fast forward, 1.2-1.5x faster forward+backward than the blocked kernel).
  Larger: the blocked kernel, head-major (on CPU at SD's self-attention 3.4x faster forward, 2.7x forward+backward
  than XLA's; benchmarks/RESULTS.md).
  """
  if jax.default_backend() == 'gpu' and q.dtype in (jnp.bfloat16, jnp.float16):
    try:
      return jax.nn.dot_product_attention(q, k, v.astype(q.dtype), implementation='cudnn')
    except (NotImplementedError, RuntimeError, ValueError):
      pass
  b, t, h, _ = q.shape
  if b * h * t * k.shape[1] <= LOGITS_PER_BLOCK:
    return jax.nn.dot_product_attention(q, k, v.astype(q.dtype), implementation='xla')
  return blocked_attention_heads_first(q, k, v)
