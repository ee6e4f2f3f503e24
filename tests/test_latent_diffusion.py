"""Latent diffusion as users run it: train.py / `loop.run` with config.job='latent_diffusion' on a frozen autoencoder
run (text-conditioned with a jointly trained CLIP text transformer, class-conditioned through LDM's class embedder,
unconditional), `sampling.run` from prompts with classifier-free guidance and a negative prompt, resume, two
processes, and the one-line errors of bad inputs."""

import filecmp
import json
import logging
import os

import jax
import numpy as np
import pytest
from PIL import Image

import multihost
from configs import autoencoder_kl_mnist, ldm_mnist
from helpers import REPO, restore_state, run_cli, smoke_config, tree_equal
from jaxdiff import sampling
from jaxdiff.errors import CheckpointError
from jaxdiff.models import tokenizer as tokenizer_lib
from jaxdiff.train import loop

LDM_SMOKE = "--config=configs/ldm_mnist.py:smoke"


@pytest.fixture(scope="module")
def ae_dir(tfds_dir, tmp_path_factory):
  """A finished autoencoder_kl_mnist:smoke run (its checkpoint and latent_scale.json)."""
  workdir = tmp_path_factory.mktemp("ae")
  loop.run(smoke_config(tfds_dir, autoencoder_kl_mnist, **{"train.sample_every": 4}), str(workdir))
  return str(workdir)


def ldm_config(tfds_dir, ae_dir, **overrides):
  return smoke_config(tfds_dir, ldm_mnist, **{"latent.autoencoder_workdir": ae_dir, **overrides})


def class_config(tfds_dir, ae_dir, **overrides):
  """LDM's class-conditional model: the label becomes one context token through the class embedder."""
  return ldm_config(tfds_dir, ae_dir, **{"latent.condition": "class", "text_encoder.kind": "", "data.captions": "",
                                         **overrides})


@pytest.fixture(scope="module")
def text_run(tfds_dir, ae_dir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("ldm_text")
  config = ldm_config(tfds_dir, ae_dir, **{"train.sample_every": 4})
  return config, workdir, loop.run(config, str(workdir))


def test_the_shipped_tokenizer_is_the_one_built_from_the_captions(tmp_path):
  captions = [f"a handwritten {digit}" for digit in ldm_mnist.DIGITS]
  tokenizer_lib.build_tokenizer(captions, str(tmp_path), max_length=8)
  for name in ("vocab.json", "merges.txt"):
    assert filecmp.cmp(tmp_path / name, os.path.join(ldm_mnist.TOKENIZER, name), shallow=False), name
  tokens = tokenizer_lib.load_tokenizer(ldm_mnist.TOKENIZER, max_length=8)(captions)
  assert len({tuple(t) for t in tokens}) == 10  # every caption its own token sequence


def test_text_conditioned_training_draws_a_grid_from_the_class_captions(text_run):
  config, workdir, summary = text_run
  assert summary["job"] == "latent_diffusion" and summary["step"] == 4 and np.isfinite(summary["final_loss"])
  grid = np.asarray(Image.open(summary["grid"]))
  assert grid.ndim == 2 and grid.std() > 0  # decoded 28x28 digits, one per class caption
  state = restore_state(config, str(workdir))
  # The jointly trained text encoder is checkpointed with the UNet; the frozen autoencoder is not.
  assert set(state.params) == {"unet", "embedder"}
  with open(os.path.join(config.latent.autoencoder_workdir, "latent_scale.json")) as f:
    assert json.load(f)["scale_factor"] > 0


def test_sampling_from_prompts_with_guidance_and_a_negative_prompt(text_run, caplog):
  config, workdir, _ = text_run
  config = config.copy_and_resolve_references()
  s = config.sample
  s.prompt, s.num_samples, s.per_device_batch_size = "a handwritten seven", 3, 3
  summary = sampling.run(config, str(workdir))
  with np.load(summary["npz"]) as f:
    images, prompt_index = f["arr_0"], f["arr_1"]
  assert images.shape == (3, 28, 28, 1) and images.dtype == np.uint8 and np.all(prompt_index == 0)
  with open(os.path.join(summary["job"], "job.json")) as f:
    identity = json.load(f)
  assert identity["prompts"] == ["a handwritten seven"] and identity["first_stage"]["fingerprint"]
  # Resumed: nothing left to draw, the same images.
  again = sampling.run(config, str(workdir))
  assert again["job"] == summary["job"] and again["sampled_now"] == 0
  # Another negative prompt is another job with other images.
  s.negative_prompt = "a handwritten one"
  other = sampling.run(config, str(workdir))
  assert other["job"] != summary["job"]
  with np.load(other["npz"]) as f:
    assert not np.array_equal(f["arr_0"], images)
  # A prompt longer than the text encoder's context is truncated with one warning, as diffusers does.
  s.prompt = "a handwritten seven " * 4
  with caplog.at_level(logging.WARNING):
    sampling.run(config, str(workdir))
  assert sum("truncated" in r.getMessage() for r in caplog.records) >= 1


def test_class_conditional_latent_diffusion_trains_and_samples_guided(tfds_dir, ae_dir, tmp_path):
  config = class_config(tfds_dir, ae_dir)
  summary = loop.run(config, str(tmp_path))
  state = restore_state(config, str(tmp_path))
  table = state.params["embedder"]["embedding"]["embedding"]
  assert table.shape == (11, config.model.context_dim)  # ten classes and the learned null class
  config.sample.labels = "cycle"
  out = sampling.run(config, str(tmp_path))
  with np.load(out["npz"]) as f:
    assert f["arr_0"].shape == (10, 28, 28, 1) and list(f["arr_1"]) == list(range(10))
  assert summary["step"] == 4


def test_unconditional_latent_diffusion(tfds_dir, ae_dir, tmp_path):
  config = ldm_config(tfds_dir, ae_dir, **{
      "latent.condition": "none", "text_encoder.kind": "", "data.captions": "", "model.context_dim": 0,
      "model.transformer_depth": 0, "train.cond_drop_prob": 0.0, "sample.guidance_scale": 1.0})
  loop.run(config, str(tmp_path))
  state = restore_state(config, str(tmp_path))
  assert "unet" not in state.params and "conv_in" in state.params  # the plain UNet, no embedder
  with np.load(sampling.run(config, str(tmp_path))["npz"]) as f:
    assert f["arr_0"].shape == (10, 28, 28, 1) and "arr_1" not in f.files


def test_a_checkpoint_fits_only_its_first_stage(tfds_dir, ae_dir, text_run):
  config, workdir, _ = text_run
  config = config.copy_and_resolve_references()
  config.autoencoder.scale_factor = 0.5  # another scale: the UNet would see other latents
  with pytest.raises(CheckpointError, match="first_stage"):
    loop.run(config, str(workdir))


def test_a_resumed_run_equals_an_uninterrupted_one(tfds_dir, ae_dir, text_run, tmp_path):
  config, workdir, _ = text_run
  halves = ldm_config(tfds_dir, ae_dir, **{"train.num_steps": 2})
  loop.run(halves, str(tmp_path))
  halves.train.num_steps = 4
  assert loop.run(halves, str(tmp_path))["resumed_from"] == 2
  a, b = restore_state(config, str(workdir)), restore_state(config, str(tmp_path))
  assert tree_equal(a.params, b.params) and tree_equal(a.opt_state, b.opt_state)


def test_bf16_and_fsdp(tfds_dir, ae_dir, tmp_path):
  outputs = multihost.run(["train.py", LDM_SMOKE, f"--workdir={tmp_path}", f"--config.data.data_dir={tfds_dir}",
                           f"--config.latent.autoencoder_workdir={ae_dir}", "--config.mesh.fsdp=2",
                           "--config.model.dtype=bfloat16"], num_processes=1, devices=2)
  assert "train finished:" in outputs[0]
  state = restore_state(ldm_config(tfds_dir, ae_dir), str(tmp_path))  # mesh and compute dtype are free
  assert int(state.step) == 4 and all(np.all(np.isfinite(v)) for v in jax.tree.leaves(state.params))


def test_two_processes_train_and_sample_like_one(tfds_dir, ae_dir, tmp_path):
  def args(script, workdir):
    return [script, LDM_SMOKE, f"--workdir={workdir}", f"--config.data.data_dir={tfds_dir}",
            f"--config.latent.autoencoder_workdir={ae_dir}", "--config.sample.num_samples=4",
            "--config.sample.per_device_batch_size=2", "--config.sample.prompt=a handwritten two"]

  multihost.run(args("train.py", tmp_path / "one"), num_processes=1, devices=2)
  outputs = multihost.run(args("train.py", tmp_path / "two"), num_processes=2, devices=1)
  assert "train finished:" in outputs[0]
  config = ldm_config(tfds_dir, ae_dir)
  assert tree_equal(restore_state(config, str(tmp_path / "one")).params,
                    restore_state(config, str(tmp_path / "two")).params)
  for name in ("one", "two"):
    multihost.run(args("sample.py", tmp_path / name), num_processes=2 if name == "two" else 1,
                  devices=1 if name == "two" else 2)
  found = [sorted(p for p in (tmp_path / name / "samples").rglob("samples_4x28x28x1.npz")) for name in ("one", "two")]
  with np.load(found[0][0]) as a, np.load(found[1][0]) as b:
    np.testing.assert_array_equal(a["arr_0"], b["arr_0"])


@pytest.mark.parametrize("flags,message", [
    (["--config.text_encoder.width=24"], "text_encoder.width=24 differs from model.context_dim=16"),
    ([f"--config.autoencoder.init_from={os.path.join(REPO, 'README.md')}"], "not both"),
    (["--config.sample.clip_denoised=True"], "latents are not bounded"),
    (["--config.latent.condition=none"], "model.context_dim=16 needs a context"),
    (["--config.data.captions="], "trains on captions"),
    (["--config.text_encoder.trainable=False"], "needs weights"),
])
def test_bad_latent_settings_stop_in_one_line(tfds_dir, ae_dir, tmp_path, capsys, flags, message):
  code, err = run_cli("train", capsys, LDM_SMOKE, f"--workdir={tmp_path / 'run'}",
                      f"--config.data.data_dir={tfds_dir}", f"--config.latent.autoencoder_workdir={ae_dir}", *flags)
  err = err.strip()
  assert code == 1 and len(err.splitlines()) == 1 and message in err, err
  assert not (tmp_path / "run").exists()  # nothing written


def test_bad_first_stages_and_tokenizers_stop_in_one_line(tfds_dir, ae_dir, text_run, tmp_path, capsys):
  _, ldm_workdir, _ = text_run
  cases = [
      ([f"--config.latent.autoencoder_workdir={ldm_workdir}"], "holds a config.job='latent_diffusion' run, not a config.job='autoencoder'"),
      ([f"--config.latent.autoencoder_workdir={tmp_path}"], "No autoencoder checkpoint"),
      ([f"--config.text_encoder.tokenizer={tmp_path}"], "vocab.json"),
  ]
  for flags, message in cases:
    code, err = run_cli("train", capsys, LDM_SMOKE, f"--workdir={tmp_path / 'run'}",
                        f"--config.data.data_dir={tfds_dir}", f"--config.latent.autoencoder_workdir={ae_dir}", *flags)
    err = err.strip()
    assert code == 1 and len(err.splitlines()) == 1 and message in err, (flags, err)
    assert not (tmp_path / "run").exists()
