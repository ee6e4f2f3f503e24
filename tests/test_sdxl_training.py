"""SDXL's conditioning as users train and sample it: a latent job with two jointly trained text encoders (context
side by side, the second's projected pooled output in the vector condition), micro-conditioning read from the
batches and dropped per key, SGM's zero null caption; `sampling.run` with micro-conditioning settings; two
processes like one; the conditioners' null values and per-key dropping; one-line errors of settings that do not fit."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import multihost
from configs import autoencoder_kl_mnist, ldm_mnist
from helpers import restore_state, run_cli, smoke_config, tree_equal
from jaxdiff import sampling
from jaxdiff.models import conditioning
from jaxdiff.train import loop

MICRO = ("original_size", "crops_coords_top_left", "target_size")
SDXL_FLAGS = dict(**{"text_encoder.output": "penultimate", "text_encoder_2.kind": "clip",
                     "text_encoder_2.width": 16, "text_encoder_2.num_layers": 2, "text_encoder_2.num_heads": 2,
                     "text_encoder_2.max_length": 8, "text_encoder_2.vocab_size": 552,
                     "text_encoder_2.eos_token_id": 551, "text_encoder_2.activation": "gelu",
                     "text_encoder_2.output": "penultimate", "text_encoder_2.projection_dim": 8,
                     "text_encoder_2.tokenizer": ldm_mnist.TOKENIZER, "text_encoder_2.trainable": True,
                     "model.context_dim": 32, "model.adm_in_channels": 8 + 6 * 8, "model.transformer_depth": 2,
                     "latent.micro_conditioning": MICRO, "latent.micro_embed_dim": 8,
                     "latent.micro_drop_probs": (0.1, 0.2, 0.0), "latent.text_null": "zeros"})
SDXL_ARGS = [f"--config.{k}={v!r}" if isinstance(v, tuple) else f"--config.{k}={v}" for k, v in SDXL_FLAGS.items()]


@pytest.fixture(scope="module")
def ae_dir(tfds_dir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("ae")
  loop.run(smoke_config(tfds_dir, autoencoder_kl_mnist, **{"train.sample_every": 4}), str(workdir))
  return str(workdir)


def sdxl_config(tfds_dir, ae_dir, **overrides):
  return smoke_config(tfds_dir, ldm_mnist, **{"latent.autoencoder_workdir": ae_dir, **SDXL_FLAGS, **overrides})


@pytest.fixture(scope="module")
def sdxl_run(tfds_dir, ae_dir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("sdxl")
  config = sdxl_config(tfds_dir, ae_dir)
  return config, workdir, loop.run(config, str(workdir))


def test_an_sdxl_conditioned_latent_job_trains_both_encoders_and_the_vector_path(sdxl_run):
  config, workdir, _ = sdxl_run
  state = restore_state(config, str(workdir))
  params = state.params
  assert set(params) == {"unet", "embedder", "embedder_2"}  # both encoders trained jointly
  assert params["unet"]["vector_emb"]["linear_1"]["kernel"].shape == (8 + 6 * 8, 4 * 16)
  assert int(state.step) == 4 and all(np.all(np.isfinite(v)) for v in jax.tree.leaves(params))
  assert float(jnp.abs(params["unet"]["vector_emb"]["linear_2"]["bias"]).max()) > 0  # zero-initialised, trained


def test_sampling_reads_the_micro_conditioning_settings(sdxl_run):
  config, workdir, _ = sdxl_run
  config = config.copy_and_resolve_references()
  config.sample.prompt = "a handwritten seven"
  config.sample.num_samples = config.sample.per_device_batch_size = 2
  config.sample.guidance_scale = 3.0
  first = sampling.run(config, str(workdir))
  config.sample.crops_coords_top_left = (6, 2)
  shifted = sampling.run(config, str(workdir))
  assert first["job"] != shifted["job"]  # a micro-conditioning setting is part of the job's identity
  with np.load(first["npz"]) as a, np.load(shifted["npz"]) as b:
    assert a["arr_0"].shape == (2, 28, 28, 1) and not np.array_equal(a["arr_0"], b["arr_0"])
  # img2img (SDEdit) from a sampling job's uint8 images: encoded, noised to half the schedule, denoised.
  config.sample.init_images, config.sample.strength = first["npz"], 0.5
  edited = sampling.run(config, str(workdir))
  with np.load(edited["npz"]) as e, np.load(shifted["npz"]) as b:
    assert e["arr_0"].shape == (2, 28, 28, 1) and not np.array_equal(e["arr_0"], b["arr_0"])
  with open(os.path.join(edited["job"], "job.json")) as f:
    assert json.load(f)["init_images"] == sampling.file_fingerprint(first["npz"])


@pytest.fixture(scope="module")
def aspect_dir(tmp_path_factory):
  """Digits-like images of two aspect ratios, 28x40 (wide) and 40x28 (tall), two of each per class folder: the
  scaled SDXL buckets at 28^2 (multiple 4) put them in (24, 32) and (32, 24)."""
  from PIL import Image
  root = tmp_path_factory.mktemp("aspect")
  rng = np.random.default_rng(0)
  for label in range(10):
    (root / str(label)).mkdir()
    for i, (h, w) in enumerate([(28, 40), (40, 28)] * 2):
      image = np.zeros((h, w), np.uint8)
      image[h // 4:3 * h // 4, w // 4:3 * w // 4] = rng.integers(60, 255)
      Image.fromarray(image).save(root / str(label) / f"{i}.png")
  return str(root)


ASPECT = {"data.name": "image_folder", "data.multi_aspect": True, "data.bucket_multiple": 4, "data.crop": "random"}


def test_multi_aspect_training_compiles_once_per_bucket(aspect_dir, tfds_dir, ae_dir, tmp_path):
  config = sdxl_config(tfds_dir, ae_dir, **ASPECT, **{"data.image_dir": aspect_dir, "train.num_steps": 6})
  summary = loop.run(config, str(tmp_path))
  assert set(summary["compile_seconds"]) == {"8x24x32x1", "8x32x24x1"}, summary["compile_seconds"]
  config.sample.height, config.sample.width = 24, 32  # one bucket's shape
  config.sample.prompt, config.sample.num_samples, config.sample.per_device_batch_size = "a handwritten one", 2, 2
  with np.load(sampling.run(config, str(tmp_path))["npz"]) as f:
    assert f["arr_0"].shape == (2, 24, 32, 1)


def test_two_processes_train_and_sample_like_one(aspect_dir, tfds_dir, ae_dir, tmp_path):
  """Multi-aspect batches with random crops, and SDXL's conditioning, on two processes as on one."""
  def args(script, workdir):
    return [script, "--config=configs/ldm_mnist.py:smoke", f"--workdir={workdir}", f"--config.data.data_dir={tfds_dir}",
            f"--config.latent.autoencoder_workdir={ae_dir}", "--config.sample.num_samples=4",
            "--config.sample.per_device_batch_size=2", "--config.sample.prompt=a handwritten two",
            "--config.sample.guidance_scale=2", "--config.sample.crops_coords_top_left=(2, 4)", *SDXL_ARGS,
            *[f"--config.{k}={v}" for k, v in ASPECT.items()], f"--config.data.image_dir={aspect_dir}"]

  multihost.run(args("train.py", tmp_path / "one"), num_processes=1, devices=2)
  multihost.run(args("train.py", tmp_path / "two"), num_processes=2, devices=1)
  config = sdxl_config(tfds_dir, ae_dir, **ASPECT, **{"data.image_dir": aspect_dir})
  assert tree_equal(restore_state(config, str(tmp_path / "one")).params,
                    restore_state(config, str(tmp_path / "two")).params)
  for name in ("one", "two"):
    multihost.run(args("sample.py", tmp_path / name), num_processes=2 if name == "two" else 1,
                  devices=1 if name == "two" else 2)
  found = [sorted((tmp_path / name / "samples").rglob("samples_4x28x28x1.npz")) for name in ("one", "two")]
  with np.load(found[0][0]) as a, np.load(found[1][0]) as b:
    np.testing.assert_array_equal(a["arr_0"], b["arr_0"])


def test_micro_conditioning_drops_each_key_on_its_own_and_text_to_zeros():
  text = conditioning.TextConditioner(np.array([1, 2, 0]), np.array([1, 3, 0, 0]), zero_null=True)
  micro = conditioning.MicroConditioner(text, MICRO, (0.5, 0.0, 1.0 - 1e-7))
  n = 4000
  batch = {"tokens": np.tile(np.arange(7, dtype=np.int32), (n, 1)),
           "original_size": np.tile([[40, 56]], (n, 1)), "crops_coords_top_left": np.tile([[4, 2]], (n, 1)),
           "target_size": np.tile([[16, 24]], (n, 1))}
  cond = micro.from_batch(batch)
  assert cond["tokens"].shape == (n, 3) and cond["tokens_2"].shape == (n, 4)  # split side by side
  dropped = micro.drop(jax.random.key(0), cond, 0.25)
  keep = {k: np.asarray(v) for k, v in dropped["keep"].items()}
  assert abs(keep["text"].mean() - 0.75) < 0.03 and abs(keep["original_size"].mean() - 0.5) < 0.03
  assert keep["crops_coords_top_left"].min() == 1 and keep["target_size"].max() == 0
  # Independent draws: text and original_size are not dropped together more than chance says.
  both = np.mean((keep["text"] == 0) & (keep["original_size"] == 0))
  assert abs(both - 0.25 * 0.5) < 0.03
  # A dropped caption keeps its tokens (its embedding is zeroed); a dropped size is zero.
  assert np.asarray(dropped["original_size"])[keep["original_size"] == 0].max() == 0
  null = micro.null(2)
  assert float(null["keep"]["text"].max()) == 0 and null["tokens_2"].tolist() == [[1, 3, 0, 0]] * 2


def test_the_vector_condition_is_pooled_text_then_sinusoids_and_zero_when_dropped():
  class Encoder(conditioning.nn.Module):
    @conditioning.nn.compact
    def __call__(self, tokens):
      h = conditioning.nn.Embed(10, 4)(tokens)
      return {"penultimate": h, "projected": h.mean(1)[:, :3]}

  class Unet(conditioning.nn.Module):
    @conditioning.nn.compact
    def __call__(self, x, t, cond, *, train):
      return x

  model = conditioning.ConditionedUNet(unet=Unet(), embedder=Encoder(), text_output="penultimate",
                                       embedder_2=Encoder(), text_output_2="penultimate", pooled_output="projected",
                                       micro_conditioning=("original_size",), micro_embed_dim=4)
  cond = {"tokens": jnp.ones((2, 5), jnp.int32), "tokens_2": jnp.ones((2, 5), jnp.int32),
          "original_size": jnp.array([[32.0, 48.0], [32.0, 48.0]]),
          "keep": {"text": jnp.array([1.0, 0.0]), "original_size": jnp.array([1.0, 1.0])}}
  params = model.init(jax.random.key(0), jnp.zeros((2, 4, 4, 1)), jnp.zeros(2), cond, train=False)
  embedded = model.apply(params, cond, method=model.embed)
  assert embedded["context"].shape == (2, 5, 8) and embedded["vector"].shape == (2, 3 + 2 * 4)
  np.testing.assert_allclose(embedded["vector"][:, 3:], conditioning.micro_embedding(cond["original_size"], 4))
  assert float(jnp.abs(embedded["context"][1]).max()) == 0 and float(jnp.abs(embedded["vector"][1, :3]).max()) == 0


@pytest.mark.parametrize("flags,message", [
    (["--config.model.adm_in_channels=40"], "--config.model.adm_in_channels=56"),
    (["--config.latent.micro_drop_probs=(0.1,)"], "one per key"),
    (["--config.model.context_dim=16"], "text_encoder.width + text_encoder_2.width = 32"),
    (["--config.text_encoder_2.trainable=False"], "train both or freeze both"),
])
def test_sdxl_settings_that_do_not_fit_stop_in_one_line(tfds_dir, ae_dir, tmp_path, capsys, flags, message):
  code, err = run_cli("train", capsys, "--config=configs/ldm_mnist.py:smoke", f"--workdir={tmp_path / 'run'}",
                      f"--config.data.data_dir={tfds_dir}", f"--config.latent.autoencoder_workdir={ae_dir}",
                      *SDXL_ARGS, *flags)
  err = err.strip()
  assert code == 1 and len(err.splitlines()) == 1 and message in err, err
  assert not (tmp_path / "run").exists()
