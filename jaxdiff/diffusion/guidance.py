"""Guidance for the samplers: classifier guidance (Dhariwal & Nichol, 2021) and classifier-free guidance (Ho &
Salimans, 2022), written for any conditioning pytree with a null value (classes, text; SDXL's vectors next).

Both return what the samplers take: `classifier_guide` a `guide(x, t)`, `classifier_free` a `denoise(x, t)`.
"""

from typing import Any, Callable

import jax
import jax.numpy as jnp

from jaxdiff.diffusion.gaussian import GaussianDiffusion

# apply(x, t, cond) -> network output, with cond a pytree whose leaves have the batch as their first axis.
ConditionalApply = Callable[[jax.Array, jax.Array, Any], jax.Array]


def classifier_guide(logits_fn: Callable[[jax.Array, jax.Array], jax.Array], labels: jax.Array, scale: float):
  """guide(x, t) = scale * grad_x log softmax(logits_fn(x, t))[labels], as guided-diffusion's cond_fn.

  Each example's log-probability depends only on its own x, so the gradient of their sum is per example.
  """
  def guide(x, t):
    def log_prob(x):
      log_probs = jax.nn.log_softmax(logits_fn(x, t).astype(jnp.float32), axis=-1)
      return jnp.sum(jnp.take_along_axis(log_probs, labels[:, None], axis=-1))
    return scale * jax.grad(log_prob)(x)
  return guide


def classifier_free(apply: ConditionalApply, cond, null, scale: float, diffusion: GaussianDiffusion):
  """denoise(x, t) with eps_null + scale * (eps_cond - eps_null), both halves in one batched forward pass.

  The combination is applied to the mean part of the output, whatever it predicts: eps, x_0 and v are affine in
  each other at fixed (x_t, t) with weights summing to one, so guiding any of them is guiding eps. A learned variance
  is taken from the conditional half, as GLIDE does. Scale 1 runs the conditional network alone and scale 0 the null
  one: bitwise plain conditional and unconditional sampling, at the cost of one pass.
  """
  if scale == 1:
    return lambda x, t: apply(x, t, cond)
  if scale == 0:
    return lambda x, t: apply(x, t, null)

  def denoise(x, t):
    both = apply(jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                 jax.tree.map(lambda c, n: jnp.concatenate([c, n]), cond, null))
    conditional, unconditional = jnp.split(both, 2)
    mean_c, var_c = diffusion.split_output(conditional)
    mean_u, _ = diffusion.split_output(unconditional)
    mean = mean_u + scale * (mean_c - mean_u)
    return mean if var_c is None else jnp.concatenate([mean, var_c], axis=-1)
  return denoise
