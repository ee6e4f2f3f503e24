"""End-to-end: the same functions the CLIs call, on the bundled digits with the smoke configs."""

import os

import jax
import numpy as np
import pytest

from configs import ddpm_cifar10
from jaxdiff import sampling
from jaxdiff.errors import CheckpointError, ConfigError, DataError
from helpers import restore_state, smoke_config, tree_digest, tree_equal
from jaxdiff.train import checkpoint as checkpoint_lib
from jaxdiff.train import experiment as experiment_lib
from jaxdiff.train import loop


def test_train_then_sample(tfds_dir, tmp_path):
  config = smoke_config(tfds_dir)
  summary = loop.run(config, str(tmp_path))
  assert summary["step"] == config.train.num_steps and np.isfinite(summary["final_loss"])
  assert os.path.exists(summary["grid"]) and summary["grid"].endswith(".png")
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(summary["tensorboard"]))
  assert checkpoint_lib.Checkpointer(summary["checkpoints"], signature={}).all_steps()[-1] == config.train.num_steps

  out = sampling.run(config, str(tmp_path))
  with np.load(out["npz"]) as f:
    images = f["arr_0"]
    assert f["arr_1"].tolist() == [i % 10 for i in range(config.sample.num_samples)]  # the main job is conditional
  assert images.shape == (config.sample.num_samples, 28, 28, 1) and images.dtype == np.uint8
  assert images.std() > 0 and os.path.exists(out["grid"])


def test_loss_falls_when_training_longer(tfds_dir, tmp_path):
  config = smoke_config(tfds_dir, **{"train.num_steps": 40, "train.log_every": 1, "train.checkpoint_every": 40,
                                     "train.learning_rate": 2e-3, "train.num_grid_samples": 1,
                                     # the unweighted loss: Min-SNR weights start it low (tested in test_diffusion)
                                     "diffusion.min_snr_gamma": 0.0})
  from tensorboard.backend.event_processing import event_accumulator
  summary = loop.run(config, str(tmp_path))
  acc = event_accumulator.EventAccumulator(summary["tensorboard"])
  acc.Reload()
  losses = [e.value for e in acc.Scalars("train/loss")]
  assert len(losses) == 40
  assert np.mean(losses[-10:]) < 0.7 * np.mean(losses[:5]), losses  # an untrained network stays near 1.0


def test_class_conditional_samples_carry_labels(tfds_dir, tmp_path):
  config = ddpm_cifar10.get_config("smoke")  # 3-channel 32x32 digits
  config.data.data_dir = tfds_dir
  config.model.class_conditional = True
  config.train.num_steps = 1
  loop.run(config, str(tmp_path))
  out = sampling.run(config, str(tmp_path))
  with np.load(out["npz"]) as f:
    assert f["arr_0"].shape == (4, 32, 32, 3)
    np.testing.assert_array_equal(f["arr_1"], [0, 1, 2, 3])


@pytest.mark.parametrize("timestep_sampler", ["uniform", "loss_second_moment"])
def test_resume_continues_the_step_count_and_matches_an_uninterrupted_run(tfds_dir, tmp_path, timestep_sampler):
  config = smoke_config(tfds_dir, **{"train.num_steps": 4, "train.checkpoint_every": 2,
                                     "train.timestep_sampler": timestep_sampler})
  loop.run(config, str(tmp_path / "straight"))

  config.train.num_steps = 2  # the "interrupted" run stops after its step-2 checkpoint
  loop.run(config, str(tmp_path / "resumed"))
  config.train.num_steps = 4
  summary = loop.run(config, str(tmp_path / "resumed"))
  assert summary["resumed_from"] == 2 and summary["steps_run"] == 2 and summary["step"] == 4

  straight = restore_state(config, str(tmp_path / "straight"))
  resumed = restore_state(config, str(tmp_path / "resumed"))
  assert int(resumed.step) == 4
  assert tree_equal(straight.params, resumed.params) and tree_equal(straight.opt_state, resumed.opt_state)
  # The importance sampler's per-timestep loss history is part of the checkpoint.
  assert tree_equal(straight.loss_history, resumed.loss_history)
  if timestep_sampler == "loss_second_moment":
    assert np.count_nonzero(np.asarray(jax.tree.leaves(resumed.loss_history)[0])) > 0


def test_checkpoint_round_trip(tfds_dir, tmp_path):
  exp = experiment_lib.build(smoke_config(tfds_dir))
  state = exp.init_state(jax.random.key(3))
  checkpointer = exp.checkpointer(str(tmp_path))
  checkpointer.save(7, state)
  checkpointer.close()
  restored = restore_state(exp.config, str(tmp_path))
  assert int(restored.step) == 0
  assert tree_equal(state.params, restored.params) and tree_equal(state.opt_state, restored.opt_state)
  assert jax.tree.structure(state) == jax.tree.structure(restored)


def test_workdir_of_another_model_is_refused_and_left_intact(tfds_dir, tmp_path):
  loop.run(smoke_config(tfds_dir), str(tmp_path))
  before = tree_digest(tmp_path / "checkpoints")
  other = smoke_config(tfds_dir, **{"model.base_channels": 32, "train.num_steps": 8})
  with pytest.raises(CheckpointError, match=r"different model \(model.base_channels: 16 in the checkpoint, 32"):
    loop.run(other, str(tmp_path))
  with pytest.raises(CheckpointError, match="different model"):
    sampling.run(other, str(tmp_path))
  assert tree_digest(tmp_path / "checkpoints") == before


def test_a_fixed_variance_model_samples_with_either_fixed_variance(tfds_dir, tmp_path):
  loop.run(smoke_config(tfds_dir, **{"train.num_steps": 1}), str(tmp_path))  # trained with fixed_large
  summary = sampling.run(smoke_config(tfds_dir, **{"diffusion.var_type": "fixed_small"}), str(tmp_path))
  assert summary["sampled_now"] == 4
  learned = smoke_config(tfds_dir, **{"diffusion.var_type": "learned_range", "diffusion.loss": "hybrid"})
  with pytest.raises(CheckpointError, match="diffusion.var_type: 'fixed' in the checkpoint, 'learned_range'"):
    sampling.run(learned, str(tmp_path))


def test_sampling_without_checkpoint_says_train_first(tfds_dir, tmp_path):
  with pytest.raises(CheckpointError, match="train first"):
    sampling.run(smoke_config(tfds_dir), str(tmp_path))


@pytest.mark.parametrize("overrides,error,match", [
    ({"data.name": "no_such_dataset"}, DataError, "no_such_dataset"),
    ({"data.name": "image_folder", "data.image_dir": "/nonexistent/images"}, ConfigError, "/nonexistent/images"),
    ({"diffusion.schedule": "cosin"}, ConfigError, "diffusion.schedule"),
    ({"diffusion.mean_type": "eps"}, ConfigError, "diffusion.mean_type"),
    ({"train.batch_size": 0}, ConfigError, "train.batch_size"),
    ({"model.attention_resolutions": (5,)}, ConfigError, "attention_resolutions"),
    ({"model.dtype": "float8"}, ConfigError, "model.dtype"),
])
def test_bad_config_values(tfds_dir, tmp_path, overrides, error, match):
  with pytest.raises(error, match=match):
    loop.run(smoke_config(tfds_dir, **overrides), str(tmp_path))
  assert not os.path.exists(tmp_path / "checkpoints") or not os.listdir(tmp_path / "checkpoints")


def test_unreadable_image_is_named(tfds_dir, tmp_path):
  from PIL import Image
  images = tmp_path / "images"
  images.mkdir()
  for i in range(8):
    Image.fromarray(np.full((30, 30), i * 30, np.uint8)).save(images / f"{i}.png")
  (images / "broken.png").write_bytes(b"not a png")
  config = smoke_config(tfds_dir, **{"data.name": "image_folder", "data.image_dir": str(images),
                                     "model.class_conditional": False})
  with pytest.raises(DataError, match="broken.png"):
    loop.run(config, str(tmp_path / "work"))
