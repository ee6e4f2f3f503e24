"""jaxdiff's diffusion process against improved-diffusion's numbers on the same inputs (tests/fixtures/iddpm).

scripts/make_iddpm_fixtures.py wrote the stored values and says which conventions it fixes. Every test runs on the
stored values and, when IMPROVED_DIFFUSION_PATH points at an improved-diffusion checkout (and torch is installed),
again on values regenerated live from it. The error of a quantity is max |ours - theirs| / max |theirs|; both sides
run in float32 from float64 schedules, so it must stay under 1e-5 unless a comment says why not.
"""

import functools
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.diffusion import GaussianDiffusion, LossType, MeanType, VarType, schedules

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO, "tests", "fixtures", "iddpm")
RTOL = 1e-5


def _load_script():
  spec = importlib.util.spec_from_file_location("make_iddpm_fixtures",
                                                os.path.join(REPO, "scripts", "make_iddpm_fixtures.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


script = _load_script()


@functools.cache
def _references(source: str) -> dict:
  if source == "stored":
    return {name: dict(np.load(os.path.join(FIXTURES, f"{name}.npz"))) for name in script.FILES}
  return script.references(os.environ["IMPROVED_DIFFUSION_PATH"])


@pytest.fixture(params=["stored", "live"], scope="module")
def ref(request):
  if request.param == "live":
    if not os.environ.get("IMPROVED_DIFFUSION_PATH"):
      pytest.skip("set IMPROVED_DIFFUSION_PATH to an improved-diffusion checkout to regenerate the references live")
    pytest.importorskip("torch", reason="regenerating the references needs the torch extra")
  return _references(request.param)


def rel_err(ours, theirs) -> float:
  theirs = np.asarray(theirs, np.float64)
  return float(np.max(np.abs(np.asarray(ours, np.float64) - theirs)) / np.max(np.abs(theirs)))


def assert_close(ours, theirs, rtol=RTOL):
  assert np.shape(ours) == np.shape(theirs)
  err = rel_err(ours, theirs)
  assert err <= rtol, err


def betas(schedule: str) -> np.ndarray:
  num_timesteps = script.PROCESSES[schedule]
  if schedule == "linear":  # improved-diffusion scales DDPM's range to keep the schedule's shape for any T
    scale = 1000 / num_timesteps
    return schedules.get_betas("linear", num_timesteps, beta_start=scale * 1e-4, beta_end=scale * 0.02)
  return schedules.get_betas(schedule, num_timesteps)


def fake_model(schedule: str, var: str):
  return functools.partial(script.fake_model, num_timesteps=script.PROCESSES[schedule],
                           learned_variance=var == "learned_range", xp=jnp)


@pytest.mark.parametrize("schedule", script.PROCESSES)
def test_schedules_and_respacing(ref, schedule):
  s = ref["schedules"]
  np.testing.assert_allclose(betas(schedule), s[f"{schedule}/betas"], rtol=1e-12)
  for r in script.RESPACINGS:
    kept = schedules.space_timesteps(script.PROCESSES[schedule], r)
    np.testing.assert_array_equal(kept, s[f"{schedule}/{r}/timestep_map"])
    np.testing.assert_allclose(schedules.respace_betas(betas(schedule), kept), s[f"{schedule}/{r}/betas"],
                               rtol=1e-12)
  for num_timesteps, respacings in script.SPACING_SWEEP:
    for r in respacings:
      np.testing.assert_array_equal(schedules.space_timesteps(num_timesteps, r), s[f"space/{num_timesteps}/{r}"])


@pytest.mark.parametrize("schedule", script.PROCESSES)
@pytest.mark.parametrize("mean,var", script.MODELS)
@pytest.mark.parametrize("clip", [False, True])
def test_vb_terms_every_timestep(ref, schedule, mean, var, clip):
  """L_t for t = 0 (the discretised decoder NLL) to T-1 (KLs), one timestep per example."""
  d = GaussianDiffusion.from_betas(betas(schedule), mean_type=MeanType(mean), var_type=VarType(var))
  model = fake_model(schedule, var)
  t = jnp.arange(d.num_timesteps)

  @jax.jit
  def vb(x0, noise):
    x_t = d.q_sample(x0, t, noise)
    return d.vb_terms_bpd(model(x_t, t), x0, x_t, t, clip_denoised=clip)

  v = ref["vlb"]
  assert_close(vb(v[f"{schedule}/x0"], v[f"{schedule}/noise"]),
               v[f"{schedule}/{mean}/{var}/vb{'_clipped' if clip else ''}"])


@pytest.mark.parametrize("schedule", script.PROCESSES)
def test_training_losses(ref, schedule):
  """jaxdiff's hybrid loss is improved-diffusion's RESCALED_MSE (vlb_weight 1e-3), its MSE with a learned range is
  the hybrid at vlb_weight 1 / T, and kl is RESCALED_KL; jaxdiff's `vb` is L_t before any weighting."""
  d = GaussianDiffusion.from_betas(betas(schedule), var_type=VarType.LEARNED_RANGE)
  model = fake_model(schedule, "learned_range")
  t = jnp.arange(d.num_timesteps)
  v = ref["vlb"]
  x0, noise = v[f"{schedule}/x0"], v[f"{schedule}/noise"]

  @functools.partial(jax.jit, static_argnames=("loss_type", "vlb_weight"))
  def losses(x0, noise, loss_type, vlb_weight):
    x_t = d.q_sample(x0, t, noise)
    return d.training_losses(model(x_t, t), x0, x_t, t, noise, loss_type=loss_type, vlb_weight=vlb_weight)

  theirs = lambda loss, key: v[f"{schedule}/losses/{loss}/{key}"]
  T = d.num_timesteps
  hybrid = losses(x0, noise, LossType.HYBRID, 1e-3)
  assert_close(hybrid.loss, theirs("RESCALED_MSE", "loss"))
  assert_close(hybrid.mse, theirs("RESCALED_MSE", "mse"))
  assert_close(hybrid.vb * T / 1000, theirs("RESCALED_MSE", "vb"))
  unweighted = losses(x0, noise, LossType.HYBRID, 1 / T)
  assert_close(unweighted.loss, theirs("MSE", "loss"))
  assert_close(unweighted.vb, theirs("MSE", "vb"))
  assert_close(losses(x0, noise, LossType.KL, 1e-3).loss, theirs("RESCALED_KL", "loss"))


@pytest.mark.parametrize("schedule", script.PROCESSES)
def test_bits_per_dim(ref, schedule):
  """The full bound: every L_t at the same x_t (same noise key), the prior term and their sum."""
  d = GaussianDiffusion.from_betas(betas(schedule), var_type=VarType.LEARNED_RANGE)
  b = ref["bpd"]
  out = jax.jit(lambda x0: d.bits_per_dim(fake_model(schedule, "learned_range"), x0,
                                          jax.random.key(script.BPD_SEED), clip_denoised=True))(b[f"{schedule}/x0"])
  assert_close(out["terms"], b[f"{schedule}/vb"])
  assert_close(out["total"], b[f"{schedule}/total_bpd"])
  assert_close(out["prior"], b[f"{schedule}/prior_bpd"])


@pytest.mark.parametrize("schedule", script.PROCESSES)
@pytest.mark.parametrize("respacing", script.RESPACINGS)
def test_respaced_learned_range(ref, schedule, respacing):
  """p(x_{t-1} | x_t) and L_t of a learned-range model under respacing: the range spans the respaced betas and the
  network sees the original timesteps."""
  kept = schedules.space_timesteps(script.PROCESSES[schedule], respacing)
  d = GaussianDiffusion.from_betas(schedules.respace_betas(betas(schedule), kept), timestep_map=kept,
                                   var_type=VarType.LEARNED_RANGE)
  model = fake_model(schedule, "learned_range")
  t = jnp.arange(d.num_timesteps)

  @jax.jit
  def run(x, model_output, x0, noise):
    p = d.p_mean_variance(model_output, x, t, clip_denoised=True)
    x_t = d.q_sample(x0, t, noise)
    return model(x, d.timestep_map[t]), p, d.vb_terms_bpd(model(x_t, d.timestep_map[t]), x0, x_t, t)

  r = {k.removeprefix(f"{schedule}/{respacing}/"): v for k, v in ref["respaced"].items()
       if k.startswith(f"{schedule}/{respacing}/")}
  model_output, p, vb = run(r["x"], r["model_output"], r["x0"], r["noise"])
  # The network sees the same (original) timesteps; its tanh/sin/cos differ from torch's by an ulp or so.
  np.testing.assert_allclose(model_output, r["model_output"], rtol=0, atol=1e-6)
  # p from the output improved-diffusion's network gave: at the last kept step x_0 = sqrt(1 / abar) x_t - sqrt(1 /
  # abar - 1) eps amplifies an ulp of eps up to 360 times (linear, "10"), which would swamp the comparison.
  assert_close(p.mean, r["mean"])
  assert_close(p.variance, r["variance"])
  assert_close(p.log_variance, r["log_variance"])
  assert_close(p.pred_x0, r["pred_xstart"])
  assert_close(vb, r["vb"])
