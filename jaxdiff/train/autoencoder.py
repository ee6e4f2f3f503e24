"""The first stage's train state and step (LDM's autoencoder losses), and the latent scale factor.

One jitted step updates the autoencoder (generator) and the patch-GAN discriminator with their own optax
optimizers. The generator loss is LDM's: reconstruction (L1 or L2) + perceptual (LPIPS) as the negative
log-likelihood, plus the KL of the posterior (kl) or the codebook loss (vq), plus the GAN generator loss weighted
adaptively by ||grad nll|| / ||grad gan|| at the decoder's last layer. Before `disc_start` the GAN terms are off
and the discriminator is not run: the job compiles the step once without and once with the GAN (`gan`) and picks
by the step number (a `lax.cond` between the two ran the step 20x slower on XLA:CPU).
"""

import dataclasses
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxdiff.errors import CheckpointError
from jaxdiff.evaluation import reconstruction as reconstruction_metrics
from jaxdiff.models import discriminator as disc_lib
from jaxdiff.models.autoencoder import VQModel
from jaxdiff.train.state import _apply_gradients

# The decoder's last layer, where the adaptive GAN weight compares gradient norms.
LAST_LAYER = ("decoder", "conv_out", "kernel")


@flax.struct.dataclass
class AutoencoderState:
  """Everything a resumed autoencoder run needs: the autoencoder (with its EMA) and the discriminator."""
  step: jax.Array
  params: Any
  ema_params: Any
  opt_state: Any
  disc_params: Any
  disc_opt_state: Any


def init_state(key, *, model, discriminator, tx, disc_tx, image_shape: tuple[int, int, int]) -> AutoencoderState:
  model_key, disc_key = jax.random.split(key)
  x = jnp.zeros((1, *image_shape), jnp.float32)
  params = model.init(model_key, x)["params"]
  disc_params = discriminator.init(disc_key, x)["params"]
  return AutoencoderState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params,
                          opt_state=tx.init(params), disc_params=disc_params, disc_opt_state=disc_tx.init(disc_params))


@dataclasses.dataclass(frozen=True)
class LossWeights:
  """The weights of LDM's LPIPSWithDiscriminator (kl) / VQLPIPSWithDiscriminator (vq)."""
  kind: str  # kl | vq
  reconstruction: str = "l1"
  perceptual_weight: float = 1.0
  regularizer_weight: float = 1e-6  # kl_weight (kl) or codebook_weight (vq)
  disc_weight: float = 0.5
  disc_factor: float = 1.0
  disc_loss: str = "hinge"
  disc_start: int = 50_001

  @classmethod
  def from_config(cls, config) -> "LossWeights":
    a, al = config.autoencoder, config.autoencoder_loss
    return cls(kind=a.kind, reconstruction=al.reconstruction, perceptual_weight=al.perceptual_weight,
               regularizer_weight=al.kl_weight if a.kind == "kl" else al.codebook_weight,
               disc_weight=al.disc_weight, disc_factor=al.disc_factor, disc_loss=al.disc_loss,
               disc_start=config.train.disc_start)


DISC_LOSSES = {"hinge": disc_lib.hinge_d_loss, "vanilla": disc_lib.vanilla_d_loss}


def reconstruct(model, params, x, key=None):
  """(reconstruction, regulariser [scalar], extra metrics) of the autoencoder; a KL model samples its posterior
  when `key` is given and takes its mode otherwise."""
  if not isinstance(model, VQModel):
    recon, posterior = model.apply({"params": params}, x, key=key)
    return recon, jnp.mean(posterior.kl()), {}
  recon, aux = model.apply({"params": params}, x)
  return recon, aux["loss"], {"perplexity": aux["perplexity"], "codebook_usage": aux["usage"]}


def quality(model, params, x) -> dict:
  """The reconstruction of x (the posterior's mode, clipped to the image range) and per-image PSNR and SSIM: what
  the job shows and the evaluation job reports."""
  recon = jnp.clip(reconstruct(model, params, x)[0], -1.0, 1.0)
  return {"input": x, "reconstruction": recon, "psnr": reconstruction_metrics.psnr(x, recon),
          "ssim": reconstruction_metrics.ssim(x, recon)}


def mean_psnr(psnr) -> dict:
  """Mean PSNR over the images that differ (identical ones have infinite PSNR), and how many were identical."""
  finite = np.isfinite(psnr)
  return {"psnr": float(psnr[finite].mean()) if finite.any() else float("inf"), "identical": int((~finite).sum())}


def _norm(tree) -> jax.Array:
  return jnp.sqrt(sum(jnp.sum(jnp.square(leaf.astype(jnp.float32))) for leaf in jax.tree.leaves(tree)))


def train_step(state: AutoencoderState, batch: dict, perceptual_params, *, model, discriminator,
               perceptual: Callable | None, tx: optax.GradientTransformation, disc_tx: optax.GradientTransformation,
               base_key: jax.Array, ema_decay: float, weights: LossWeights, gan: bool):
  """One step of the autoencoder, and with `gan` of the discriminator too. `perceptual(params, x, y) -> [B]` is
  LPIPS (None when its weight is 0)."""
  key = jax.random.fold_in(base_key, state.step)
  x = batch["image"]
  batch_size = x.shape[0]

  def generator_terms(params, disc_params):
    """[nll, gan, regulariser] and what else is logged: each term gets its own gradient below."""
    recon, regularizer, extra = reconstruct(model, params, x, key if weights.kind == "kl" else None)
    error = jnp.abs(x - recon) if weights.reconstruction == "l1" else jnp.square(x - recon)
    rec = error
    p_loss = jnp.zeros((batch_size,), jnp.float32)
    if perceptual is not None:
      p_loss = perceptual(perceptual_params, x, recon)
      rec = rec + weights.perceptual_weight * p_loss[:, None, None, None]
    # LDM sums the KL model's nll over pixels (its KL weight of 1e-6 is set against that sum); the VQ loss averages.
    nll = jnp.sum(rec) / batch_size if weights.kind == "kl" else jnp.mean(rec)
    gan = disc_lib.generator_loss(discriminator.apply({"params": disc_params}, recon)) if disc_params is not None \
        else jnp.zeros((), jnp.float32)
    logged = {"rec_loss": jnp.mean(error), "perceptual_loss": jnp.mean(p_loss), "nll_loss": nll,
              ("kl_loss" if weights.kind == "kl" else "codebook_loss"): regularizer, **extra}
    return jnp.stack([nll, gan, regularizer]), (recon, logged)

  def with_gan(state):
    terms, vjp, (recon, logged) = jax.vjp(lambda p: generator_terms(p, state.disc_params), state.params,
                                          has_aux=True)
    last = lambda cotangent: _last_layer(vjp(cotangent)[0])
    nll_grad, gan_grad = last(jnp.array([1.0, 0.0, 0.0])), last(jnp.array([0.0, 1.0, 0.0]))
    d_weight = jnp.clip(_norm(nll_grad) / (_norm(gan_grad) + 1e-4), 0.0, 1e4) * weights.disc_weight
    coefficients = jnp.stack([1.0, d_weight * weights.disc_factor, weights.regularizer_weight])
    grads = vjp(coefficients)[0]
    recon = jax.lax.stop_gradient(recon)

    def disc_loss_fn(disc_params):
      logits_real = discriminator.apply({"params": disc_params}, x)
      logits_fake = discriminator.apply({"params": disc_params}, recon)
      loss = weights.disc_factor * DISC_LOSSES[weights.disc_loss](logits_real, logits_fake)
      return loss, (jnp.mean(logits_real), jnp.mean(logits_fake))

    (d_loss, (logits_real, logits_fake)), d_grads = jax.value_and_grad(disc_loss_fn, has_aux=True)(state.disc_params)
    updates, disc_opt_state = disc_tx.update(d_grads, state.disc_opt_state, state.disc_params)
    state = state.replace(disc_params=optax.apply_updates(state.disc_params, updates), disc_opt_state=disc_opt_state)
    logged.update(gan_loss=terms[1], d_weight=d_weight, disc_factor=jnp.float32(weights.disc_factor),
                  disc_loss=d_loss, logits_real=logits_real, logits_fake=logits_fake,
                  disc_grad_norm=optax.global_norm(d_grads))
    return state, jnp.dot(coefficients, terms), grads, logged

  def without_gan(state):
    terms, vjp, (_, logged) = jax.vjp(lambda p: generator_terms(p, None), state.params, has_aux=True)
    coefficients = jnp.array([1.0, 0.0, weights.regularizer_weight])
    zero = jnp.zeros((), jnp.float32)
    logged.update(gan_loss=zero, d_weight=zero, disc_factor=zero, disc_loss=zero, logits_real=zero,
                  logits_fake=zero, disc_grad_norm=zero)
    return state, jnp.dot(coefficients, terms), vjp(coefficients)[0], logged

  state, loss, grads, logged = (with_gan if gan else without_gan)(state)
  new_state = _apply_gradients(state, grads, tx, ema_decay)
  metrics = {"loss": loss, **logged, "grad_norm": optax.global_norm(grads),
             "param_norm": optax.global_norm(new_state.params)}
  return new_state, metrics


def _last_layer(grads):
  for name in LAST_LAYER:
    grads = grads[name]
  return grads


def latents(model, params, x, key):
  """What latent diffusion diffuses (before the scale factor): a posterior sample (kl, as LDM) or the continuous
  pre-quantisation latents (vq)."""
  encoded = model.apply({"params": params}, x, method=model.encode)
  return encoded if isinstance(model, VQModel) else encoded.sample(key)


def check_shapes(params, expected, *, what: str):
  """Refuses weights of another layout than the config's autoencoder section, naming the first difference."""
  def shapes(tree):
    return {jax.tree_util.keystr(k): tuple(v.shape) for k, v in jax.tree_util.tree_leaves_with_path(tree)}
  got, want = shapes(params), shapes(expected)
  for key in sorted(set(got) | set(want)):
    if got.get(key) != want.get(key):
      raise CheckpointError(f"{what} does not fit the config's autoencoder section: {key} is {got.get(key)} there "
                            f"and {want.get(key)} in the config; set --config.autoencoder.* to the weights' layout "
                            "(configs/autoencoder_ldm.py holds the published ones).")


def imported_params(config, expected):
  """The PyTorch weights of `autoencoder.init_from` (a diffusers folder, an LDM/SD checkpoint) as params, checked
  against the config's network (`expected`: its abstract params)."""
  from jaxdiff.convert import autoencoder as convert_autoencoder  # the converters import the training modules
  path = config.autoencoder.init_from
  _, params = convert_autoencoder.load_autoencoder(path, config.autoencoder)
  check_shapes(params, expected, what=path)
  return params
