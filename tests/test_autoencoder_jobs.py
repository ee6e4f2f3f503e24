"""The autoencoder job as users run it: train.py / `loop.run` with config.job='autoencoder' (KL and VQ, LPIPS, the
patch-GAN switching on at train.disc_start, reconstructions grid, latent scale factor), bitwise resume after a
SIGKILL, two processes, `python -m jaxdiff.evaluation autoencoder`, and the one-line errors of bad inputs."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

import multihost
from configs import autoencoder_kl_mnist, autoencoder_vq_mnist
from helpers import REPO, restore_state, smoke_config, tree_equal
from jaxdiff import cli
from jaxdiff.evaluation import cli as evaluation_cli
from jaxdiff.evaluation import inception
from jaxdiff.models import lpips
from jaxdiff.train import loop

KL_SMOKE = "--config=configs/autoencoder_kl_mnist.py:smoke"
VQ_SMOKE = "--config=configs/autoencoder_vq_mnist.py:smoke"


def states_equal(a, b):
  return int(a.step) == int(b.step) and all(
      tree_equal(getattr(a, f), getattr(b, f))
      for f in ("params", "ema_params", "opt_state", "disc_params", "disc_opt_state"))


def scalars(workdir):
  """{tag: {step: value}} of a run's TensorBoard events."""
  from tensorboard.backend.event_processing import event_accumulator
  acc = event_accumulator.EventAccumulator(str(workdir / "tensorboard"))
  acc.Reload()
  return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


@pytest.fixture(scope="module")
def lpips_files(tmp_path_factory):
  """Randomly initialised LPIPS weights in the file formats users bring (torchvision VGG16 and the lpips heads)."""
  folder = tmp_path_factory.mktemp("lpips")
  vgg_shapes, head_shapes = lpips.expected_shapes()
  rng = np.random.default_rng(0)
  np.savez(folder / "vgg16.npz", **{k: (0.05 * rng.standard_normal(s)).astype(np.float32)
                                    for k, s in vgg_shapes.items()})
  np.savez(folder / "vgg_heads.npz", **{k: np.abs(0.1 * rng.standard_normal(s)).astype(np.float32)
                                        for k, s in head_shapes.items()})
  return str(folder / "vgg16.npz"), str(folder / "vgg_heads.npz")


@pytest.fixture(scope="module")
def kl_config(tfds_dir, lpips_files):
  return smoke_config(tfds_dir, autoencoder_kl_mnist, **{
      "autoencoder_loss.perceptual_weight": 1.0, "autoencoder_loss.lpips_vgg": lpips_files[0],
      "autoencoder_loss.lpips_heads": lpips_files[1], "train.keep_checkpoints": 5})


@pytest.fixture(scope="module")
def kl_run(kl_config, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("ae_kl")
  return workdir, loop.run(kl_config, str(workdir))


@pytest.fixture(scope="module")
def vq_run(tfds_dir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("ae_vq")
  config = smoke_config(tfds_dir, autoencoder_vq_mnist)
  return config, workdir, loop.run(config, str(workdir))


def test_kl_job_trains_with_lpips_and_a_gan_from_disc_start(kl_config, kl_run):
  workdir, summary = kl_run
  assert summary["job"] == "autoencoder" and summary["step"] == 4 and np.isfinite(summary["final_loss"])
  grid = np.asarray(Image.open(summary["grid"]))
  assert grid.ndim == 2 and grid.shape[1] > grid.shape[0]  # pairs of 28x56 (input | reconstruction) tiles
  evaluation = summary["evaluation"]
  assert evaluation["examples"] == kl_config.autoencoder.eval_batches * kl_config.train.batch_size
  assert np.isfinite(evaluation["psnr"]) and -1 <= evaluation["ssim"] <= 1
  with open(summary["latent_scale_file"]) as f:
    scale = json.load(f)
  assert scale["step"] == 4 and scale["kind"] == "kl"
  assert scale["scale_factor"] == pytest.approx(1 / scale["latent_std"])
  logged = scalars(workdir)
  # disc_start=2: the step from state 1 to 2 has no GAN; the step from state 3 to 4 trains both networks.
  assert logged["train/disc_loss"][2] == 0 and logged["train/d_weight"][2] == 0
  assert logged["train/disc_loss"][4] > 0 and logged["train/d_weight"][4] > 0
  assert logged["train/disc_factor"][4] == 1.0
  assert all(logged["train/perceptual_loss"][s] > 0 for s in (2, 4))
  assert {"train/kl_loss", "train/rec_loss", "train/nll_loss", "train/gan_loss", "eval/psnr",
          "eval/latent_std"} <= set(logged)


def test_kl_job_resumes_bitwise(kl_config, kl_run, tmp_path):
  workdir, _ = kl_run
  short = kl_config.copy_and_resolve_references()
  short.train.num_steps = 2
  loop.run(short, str(tmp_path))
  resumed = loop.run(kl_config, str(tmp_path))
  assert resumed["resumed_from"] == 2
  assert states_equal(restore_state(kl_config, str(tmp_path)), restore_state(kl_config, str(workdir)))


def test_vq_job_logs_codebook_use_and_stores_continuous_latent_statistics(vq_run):
  _, workdir, summary = vq_run
  logged = scalars(workdir)
  config = autoencoder_vq_mnist.get_config("smoke")
  for step in (2, 4):
    assert 1 <= logged["train/perplexity"][step] <= config.autoencoder.num_embeddings
    assert 0 < logged["train/codebook_usage"][step] <= 1
    assert logged["train/codebook_loss"][step] > 0
  assert summary["latent_scale"]["kind"] == "vq" and summary["latent_scale"]["latent_std"] > 0


def _train_process(workdir, tfds_dir, *overrides):
  return subprocess.Popen(
      [sys.executable, "train.py", VQ_SMOKE, f"--workdir={workdir}", f"--config.data.data_dir={tfds_dir}",
       *overrides], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_sigkill_then_resume_is_bitwise_identical(tfds_dir, tmp_path):
  num_steps = 10
  overrides = [f"--config.train.num_steps={num_steps}", "--config.train.checkpoint_every=1"]
  straight = _train_process(tmp_path / "straight", tfds_dir, *overrides)
  killed = _train_process(tmp_path / "killed", tfds_dir, *overrides)
  deadline = time.time() + 300
  while not any(d.isdigit() for d in (os.listdir(tmp_path / "killed" / "checkpoints")
                                      if (tmp_path / "killed" / "checkpoints").exists() else [])):
    assert killed.poll() is None and time.time() < deadline, killed.stdout.read()
    time.sleep(0.2)
  time.sleep(0.3)  # somewhere mid-run, possibly mid-save
  killed.send_signal(signal.SIGKILL)
  killed.communicate(timeout=60)
  steps = [int(d) for d in os.listdir(tmp_path / "killed" / "checkpoints") if d.isdigit()]
  assert max(steps) < num_steps, steps
  assert straight.wait(timeout=300) == 0
  restarted = _train_process(tmp_path / "killed", tfds_dir, *overrides)
  output, _ = restarted.communicate(timeout=300)
  assert restarted.returncode == 0, output[-3000:]
  assert 1 <= int(re.search(rf"Resumed at step (\d+) of {num_steps}", output).group(1)) < num_steps
  config = smoke_config(tfds_dir, autoencoder_vq_mnist, **{"train.num_steps": num_steps})
  straight_state, killed_state = (restore_state(config, str(tmp_path / name)) for name in ("straight", "killed"))
  assert states_equal(straight_state, killed_state)


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
  path = tmp_path_factory.mktemp("inception") / "weights.npz"
  np.savez(path, **inception.random_state_dict(0))
  return str(path)


def test_evaluation_reports_psnr_ssim_lpips_and_rfid(tfds_dir, kl_run, lpips_files, inception_weights, capsys):
  workdir, summary = kl_run
  evaluation_cli.main(["autoencoder", KL_SMOKE, f"--workdir={workdir}", f"--config.data.data_dir={tfds_dir}",
                       f"--config.autoencoder_loss.lpips_vgg={lpips_files[0]}",
                       f"--config.autoencoder_loss.lpips_heads={lpips_files[1]}", f"--weights={inception_weights}",
                       "--config.autoencoder.eval_batches=2"])
  with open(workdir / "evaluation" / "reconstruction_train_4500.json") as f:
    result = json.load(f)
  assert result["examples"] == 16 and result["step"] == 4 and result["ema"] is True
  assert np.isfinite(result["psnr"]) and -1 <= result["ssim"] <= 1
  assert result["lpips"] > 0 and result["rfid"] >= 0
  # The job's own evaluation saw the first of these batches with the same weights.
  assert "PSNR" in capsys.readouterr().out


def test_evaluation_without_lpips_or_inception_weights_says_what_is_missing(tfds_dir, vq_run, monkeypatch):
  _, workdir, _ = vq_run
  monkeypatch.setenv(inception.WEIGHTS_ENV, "/nonexistent/inception.pth")
  evaluation_cli.main(["autoencoder", VQ_SMOKE, f"--workdir={workdir}", f"--config.data.data_dir={tfds_dir}"])
  with open(workdir / "evaluation" / "reconstruction_train_4500.json") as f:
    result = json.load(f)
  assert result["lpips"] is None and "lpips_vgg" in result["lpips_missing"]
  assert result["rfid"] is None and result["rfid_missing"]


def run_cli(job, args, capsys):
  with pytest.raises(SystemExit) as exit_info:
    cli.run_in_process(job, [job, *args])
  assert exit_info.value.code == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: "), err
  return err[0]


@pytest.mark.parametrize("overrides,message", [
    (["--config.autoencoder_loss.perceptual_weight=1.0"],
     "needs local weights: set --config.autoencoder_loss.lpips_vgg"),
    (["--config.data.image_size=27"], "must be a multiple of 2, the downsampling factor"),
    (["--config.autoencoder.norm_groups=3"], "autoencoder.norm_groups=3 must divide every level's channels"),
    (["--config.train.grad_accum_steps=2"], "set 1 (and lower train.batch_size for memory)"),
    (["--config.autoencoder.kind=vae"], "autoencoder.kind='vae' is not valid: use one of 'kl', 'vq'"),
    (["--config.autoencoder_loss.disc_loss=wasserstein"], "use one of 'hinge', 'vanilla'"),
])
def test_bad_autoencoder_configs_are_named_in_one_line(tfds_dir, tmp_path, capsys, overrides, message):
  error = run_cli("train", [KL_SMOKE, f"--workdir={tmp_path}", f"--config.data.data_dir={tfds_dir}", *overrides],
                  capsys)
  assert message in error, error
  assert not os.listdir(tmp_path)  # nothing written


def test_bad_autoencoder_jobs_are_named_in_one_line(tfds_dir, kl_run, tmp_path, capsys):
  workdir, _ = kl_run
  data = f"--config.data.data_dir={tfds_dir}"
  error = run_cli("sample", [KL_SMOKE, f"--workdir={tmp_path}", data], capsys)
  assert "trains an autoencoder, and sample runs diffusion models" in error
  assert "python -m jaxdiff.evaluation autoencoder" in error
  error = run_cli("evaluate", ["--config=configs/ddpm_mnist.py:smoke", f"--workdir={workdir}", data], capsys)
  assert "evaluates autoencoders" in error
  error = run_cli("evaluate", [KL_SMOKE, f"--workdir={tmp_path}", data], capsys)
  assert "No checkpoint" in error
  # An autoencoder checkpoint is not a VQ model's, nor a diffusion model's.
  error = run_cli("train", [VQ_SMOKE, f"--workdir={workdir}", data], capsys)
  assert "holds a checkpoint of a different model" in error and "autoencoder.kind: 'kl' in the checkpoint" in error
  error = run_cli("train", ["--config=configs/ddpm_mnist.py:smoke", f"--workdir={workdir}", data], capsys)
  assert "(config.job: 'autoencoder' in the checkpoint, 'diffusion' in the config)" in error


def test_two_processes_train_like_one_and_evaluate(tfds_dir, tmp_path):
  def train_args(workdir):
    return ["train.py", VQ_SMOKE, f"--workdir={workdir}", f"--config.data.data_dir={tfds_dir}"]

  multihost.run(train_args(tmp_path / "one"), num_processes=1, devices=2)
  outputs = multihost.run(train_args(tmp_path / "two"), num_processes=2, devices=1)
  assert "train finished:" in outputs[0] and "train finished:" not in outputs[1]
  config = smoke_config(tfds_dir, autoencoder_vq_mnist)
  assert states_equal(restore_state(config, str(tmp_path / "one")), restore_state(config, str(tmp_path / "two")))
  grids = [np.asarray(Image.open(tmp_path / name / "samples" / "reconstructions_step0000004.png"))
           for name in ("one", "two")]
  np.testing.assert_array_equal(*grids)
  for name in ("one", "two"):
    with open(tmp_path / name / "latent_scale.json") as f:
      scale = json.load(f)
    assert scale["step"] == 4
  outputs = multihost.run(["-m", "jaxdiff.evaluation", "autoencoder", VQ_SMOKE, f"--workdir={tmp_path / 'two'}",
                           f"--config.data.data_dir={tfds_dir}"], num_processes=2, devices=1)
  assert "evaluate finished:" in outputs[0]
  with open(tmp_path / "two" / "evaluation" / "reconstruction_train_4500.json") as f:
    assert np.isfinite(json.load(f)["psnr"])


def test_training_and_evaluation_start_from_imported_weights(tfds_dir, tmp_path, capsys):
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  from jaxdiff.convert.autoencoder import load_autoencoder
  torch.manual_seed(0)
  layout = autoencoder_kl_mnist.KL_SMOKE_LAYOUT
  vae = diffusers.AutoencoderKL(
      in_channels=1, out_channels=1, latent_channels=layout["latent_channels"],
      block_out_channels=tuple(layout["base_channels"] * m for m in layout["channel_mult"]),
      layers_per_block=layout["num_res_blocks"], norm_num_groups=layout["norm_groups"],
      down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
  vae.save_pretrained(str(tmp_path / "vae"))
  config = smoke_config(tfds_dir, autoencoder_kl_mnist, **{"autoencoder.init_from": str(tmp_path / "vae"),
                                                        "train.num_steps": 0})
  summary = loop.run(config, str(tmp_path / "run"))
  _, imported = load_autoencoder(str(tmp_path / "vae"), config.autoencoder)
  state = restore_state(config, str(tmp_path / "run"))
  assert int(state.step) == 0 and tree_equal(state.params, imported) and tree_equal(state.ema_params, imported)
  # The evaluation job reads the same weights straight from the folder.
  evaluation_cli.main(["autoencoder", KL_SMOKE, f"--workdir={tmp_path / 'eval'}", f"--config.data.data_dir={tfds_dir}",
                       f"--config.autoencoder.init_from={tmp_path / 'vae'}", "--config.autoencoder.eval_batches=1"])
  with open(tmp_path / "eval" / "evaluation" / "reconstruction_train_4500.json") as f:
    result = json.load(f)
  assert result["source"] == str(tmp_path / "vae")
  assert result["psnr"] == pytest.approx(summary["evaluation"]["psnr"], rel=1e-5)
  capsys.readouterr()
  error = run_cli("train", [KL_SMOKE, f"--workdir={tmp_path / 'other'}", f"--config.data.data_dir={tfds_dir}",
                            f"--config.autoencoder.init_from={tmp_path / 'vae'}",
                            "--config.autoencoder.latent_channels=3"], capsys)
  assert "latent_channels" in error, error
