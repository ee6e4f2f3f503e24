"""Reverse-process samplers, each one `jax.lax.scan` over timesteps.

A sampler sees the network only through `denoise(x, t) -> model output`, with `t` on the network's (training)
timestep scale, so guidance can wrap `denoise` without touching the sampler. Every sample draws its noise from its
own key, so a sample does not depend on the batch it was drawn in.
"""

from typing import Callable

import jax
import jax.numpy as jnp

from jaxdiff.diffusion.gaussian import GaussianDiffusion

Denoise = Callable[[jax.Array, jax.Array], jax.Array]


def per_sample_normal(keys: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """A standard normal draw of `shape` for each key: [len(keys), *shape]."""
  return jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32))(keys)


def ancestral_sample(diffusion: GaussianDiffusion, denoise: Denoise, keys: jax.Array,
                     sample_shape: tuple[int, ...], *, clip_denoised: bool = True) -> jax.Array:
  """DDPM ancestral sampling from x_T ~ N(0, I) down to x_0, one sample per key.

  Args:
    diffusion: the (possibly respaced) process.
    denoise: network output for a batch x_t at network timesteps t.
    keys: [B] PRNG keys, one per sample.
    sample_shape: shape of one sample, e.g. (H, W, C).
    clip_denoised: clip the predicted x_0 to [-1, 1] before forming the posterior mean.
  """
  init_keys, step_keys = jnp.moveaxis(jax.vmap(jax.random.split)(keys), 1, 0)
  x_T = per_sample_normal(init_keys, sample_shape)

  def step(x, i):
    t = jnp.full(x.shape[:1], i, dtype=jnp.int32)
    out = diffusion.p_mean_variance(denoise(x, diffusion.timestep_map[t]), x, t,
                                    clip_denoised=clip_denoised)
    noise = per_sample_normal(jax.vmap(jax.random.fold_in, (0, None))(step_keys, i), sample_shape)
    # No noise is added at the last step (t == 0).
    x = out.mean + jnp.where(i > 0, jnp.exp(0.5 * out.log_variance), 0.0) * noise
    return x, None

  x0, _ = jax.lax.scan(step, x_T, jnp.arange(diffusion.num_timesteps - 1, -1, -1, dtype=jnp.int32))
  return x0
