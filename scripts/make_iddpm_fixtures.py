"""Writes tests/fixtures/iddpm/: improved-diffusion's diffusion quantities on small fixed inputs.

  IMPROVED_DIFFUSION_PATH=/path/to/improved-diffusion python scripts/make_iddpm_fixtures.py

improved-diffusion is not on PyPI, so CI checks jaxdiff against these stored numbers; tests/test_iddpm_reference.py
also regenerates them live when IMPROVED_DIFFUSION_PATH is set. There is no network: the model is `fake_model`, a
fixed smooth function of (x, t) that the test evaluates in JAX. Arrays are stored channels-last (jaxdiff's layout)
and transposed to improved-diffusion's NCHW around each call; schedules are float64, everything else float32.
Conventions: rescale_timesteps=False (the model sees integer timesteps, as jaxdiff's does); the linear schedule is
improved-diffusion's, whose beta range (1e-4, 0.02) is scaled by 1000/T; `vb` of calc_bpd_loop is stored in t order
(improved-diffusion stacks it from t=T-1 down) and its x_t noise is drawn as jaxdiff's `bits_per_dim` draws it.
Output: one .npz per name in FILES (see `references` for their keys).
"""

import os
import sys
from unittest import mock

import jax
import numpy as np

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "fixtures", "iddpm")
PROCESSES = {"linear": 50, "cosine": 40}  # schedule -> T
MODELS = (("epsilon", "learned_range"), ("x0", "fixed_small"), ("epsilon", "fixed_large"))  # (mean, variance)
RESPACINGS = ("10", "ddim5", "3,4,5")
# space_timesteps alone, over more lengths; pairs improved-diffusion rejects are left out.
SPACING_SWEEP = ((50, ("25", "7,1,7", "ddim10")), (100, ("5", "2,3", "33")),
                 (1000, ("250", "10,15,20", "ddim50")), (4000, ("100", "ddim25")))
SHAPE = (4, 4, 3)  # one image, channels last
BPD_BATCH, BPD_SEED = 2, 7
FILES = ("schedules", "vlb", "bpd", "respaced")


def fake_model(x, t, *, num_timesteps, learned_variance, xp):
  """A smooth nonlinear function of channels-last x and integer t in NumPy-like namespace xp (jax.numpy, torch)."""
  s = (t / num_timesteps)[:, None, None, None]
  channel = xp.arange(x.shape[-1])
  mean = xp.tanh(0.8 * x + xp.sin(3.0 * s + channel)) + 0.3 * x * xp.cos(2.0 * s)
  if not learned_variance:
    return mean
  return xp.concatenate([mean, xp.tanh(0.5 * x - xp.cos(4.0 * s + channel))], -1)


def inputs(schedule: str, batch: int) -> dict:
  """x0 on the 8-bit grid in [-1, 1] (the decoder NLL assumes it), noise and a second point x; seeded per case."""
  rng = np.random.default_rng(len(schedule) * 1000 + batch)
  shape = (batch,) + SHAPE
  x0 = np.round(rng.uniform(-1, 1, shape) * 127.5) / 127.5
  x0[0, 0, 0] = [-1.0, 1.0, 0.0]  # both edge bins of the decoder
  return {"x0": x0.astype(np.float32), "noise": rng.normal(size=shape).astype(np.float32),
          "x": rng.normal(size=shape).astype(np.float32)}


def bpd_noise(num_timesteps: int) -> np.ndarray:
  """[T, B, *SHAPE]: x_t's noise at each t, as `GaussianDiffusion.bits_per_dim` draws it from key BPD_SEED."""
  keys = jax.random.split(jax.random.key(BPD_SEED), num_timesteps)
  return np.stack([np.asarray(jax.random.normal(k, (BPD_BATCH,) + SHAPE, np.float32)) for k in keys])


def references(iddpm_path: str) -> dict:
  """{file name: {key: array}} of improved-diffusion (a local checkout at iddpm_path) on the inputs above."""
  import torch  # pylint: disable=import-outside-toplevel
  sys.path.insert(0, iddpm_path)
  try:
    from improved_diffusion import gaussian_diffusion as gd  # pylint: disable=import-outside-toplevel
    from improved_diffusion import respace  # pylint: disable=import-outside-toplevel
  finally:
    sys.path.remove(iddpm_path)
  mean_types = {"epsilon": gd.ModelMeanType.EPSILON, "x0": gd.ModelMeanType.START_X}
  var_types = {"learned_range": gd.ModelVarType.LEARNED_RANGE, "fixed_small": gd.ModelVarType.FIXED_SMALL,
               "fixed_large": gd.ModelVarType.FIXED_LARGE}
  nchw = lambda a: torch.from_numpy(np.moveaxis(np.asarray(a), -1, 1).copy())
  nhwc = lambda a: np.moveaxis(a.detach().numpy(), 1, -1)

  def process(schedule, mean, var, *, loss=gd.LossType.RESCALED_MSE, use_timesteps=None):
    num_timesteps = PROCESSES[schedule]
    kwargs = dict(betas=gd.get_named_beta_schedule(schedule, num_timesteps), model_mean_type=mean_types[mean],
                  model_var_type=var_types[var], loss_type=loss, rescale_timesteps=False)
    if use_timesteps is None:
      return gd.GaussianDiffusion(**kwargs)
    return respace.SpacedDiffusion(use_timesteps, **kwargs)

  def model(schedule, var):
    return lambda x, t: nchw(fake_model(torch.from_numpy(nhwc(x)), t, num_timesteps=PROCESSES[schedule],
                                        learned_variance=var == "learned_range", xp=torch))

  out = {name: {} for name in FILES}
  for num_timesteps, respacings in SPACING_SWEEP:
    for r in respacings:
      out["schedules"][f"space/{num_timesteps}/{r}"] = np.array(sorted(respace.space_timesteps(num_timesteps, r)))
  with torch.no_grad():
    for schedule, num_timesteps in PROCESSES.items():
      out["schedules"][f"{schedule}/betas"] = process(schedule, "epsilon", "fixed_small").betas
      # Per-timestep VLB terms, t = 0..T-1 down the batch, with and without clipping x_0.
      data = inputs(schedule, num_timesteps)
      x0, noise = nchw(data["x0"]), nchw(data["noise"])
      t = torch.arange(num_timesteps)
      for mean, var in MODELS:
        diffusion = process(schedule, mean, var)
        x_t = diffusion.q_sample(x0, t, noise=noise)
        for clip in (False, True):
          vb = diffusion._vb_terms_bpd(model(schedule, var), x0, x_t, t, clip_denoised=clip)  # pylint: disable=protected-access
          out["vlb"][f"{schedule}/{mean}/{var}/vb{'_clipped' if clip else ''}"] = vb["output"].numpy()
      for loss in (gd.LossType.RESCALED_MSE, gd.LossType.MSE, gd.LossType.RESCALED_KL):
        terms = process(schedule, "epsilon", "learned_range", loss=loss).training_losses(
            model(schedule, "learned_range"), x0, t, noise=noise)
        for key, value in terms.items():
          out["vlb"][f"{schedule}/losses/{loss.name}/{key}"] = value.numpy()
      out["vlb"].update({f"{schedule}/{k}": v for k, v in data.items() if k != "x"})

      # The full bound, x_t's noise handed to calc_bpd_loop in the order it draws it (t = T-1 first).
      data = inputs(schedule, BPD_BATCH)
      noise = bpd_noise(num_timesteps)
      draws = iter(nchw(n) for n in noise[::-1])
      with mock.patch.object(torch, "randn_like", lambda _: next(draws)):
        bpd = process(schedule, "epsilon", "learned_range").calc_bpd_loop(
            model(schedule, "learned_range"), nchw(data["x0"]), clip_denoised=True)
      out["bpd"].update({f"{schedule}/x0": data["x0"], f"{schedule}/noise": noise,
                         f"{schedule}/total_bpd": bpd["total_bpd"].numpy(),
                         f"{schedule}/prior_bpd": bpd["prior_bpd"].numpy(),
                         f"{schedule}/vb": bpd["vb"].numpy()[:, ::-1]})

      # Respaced processes: the kept timesteps, their betas, and a learned-range model's p(x_{t-1} | x_t) and L_t.
      for r in RESPACINGS:
        diffusion = process(schedule, "epsilon", "learned_range",
                            use_timesteps=respace.space_timesteps(num_timesteps, r))
        data = inputs(schedule, diffusion.num_timesteps)
        x0, x = nchw(data["x0"]), nchw(data["x"])
        t = torch.arange(diffusion.num_timesteps)
        network, seen = model(schedule, "learned_range"), []

        def recorded(x, ts):  # what the network returned, at the timesteps improved-diffusion mapped t to
          seen.append(network(x, ts))
          return seen[-1]

        p = diffusion.p_mean_variance(recorded, x, t, clip_denoised=True)
        x_t = diffusion.q_sample(x0, t, noise=nchw(data["noise"]))
        vb = diffusion._vb_terms_bpd(model(schedule, "learned_range"), x0, x_t, t, clip_denoised=False)  # pylint: disable=protected-access
        prefix = f"{schedule}/{r}/"
        out["schedules"][prefix + "betas"] = diffusion.betas
        out["schedules"][prefix + "timestep_map"] = np.array(diffusion.timestep_map)
        out["respaced"].update({prefix + k: v for k, v in data.items()})
        out["respaced"].update({prefix + k: nhwc(p[k]) for k in ("mean", "variance", "log_variance", "pred_xstart")})
        out["respaced"][prefix + "model_output"] = nhwc(seen[0])
        out["respaced"][prefix + "vb"] = vb["output"].numpy()
  return out


def main():
  os.makedirs(FIXTURES, exist_ok=True)
  for name, arrays in references(os.environ["IMPROVED_DIFFUSION_PATH"]).items():
    np.savez_compressed(os.path.join(FIXTURES, f"{name}.npz"), **arrays)
  print(f"wrote {FIXTURES}")


if __name__ == "__main__":
  main()
