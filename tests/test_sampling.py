"""Sampling jobs: a job is named by every setting that can change an image, and damaged or partial shards are
redrawn instead of crashing the job or mixing into it."""

import copy
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import smoke_config
from jaxdiff import sampling
from jaxdiff.train import loop


def _leaf_keys(tree, prefix=""):
  for key, value in tree.items():
    if isinstance(value, dict):
      yield from _leaf_keys(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}"


def _changed(value):
  """Another value of the same type."""
  if isinstance(value, bool):
    return not value
  if isinstance(value, int):
    return value + 1
  if isinstance(value, float):
    return value * 2 + 1
  if isinstance(value, str):
    return value + "x"
  if isinstance(value, (tuple, list)):
    return (*value, *value[-1:]) if value else ("x",)
  if value is None:
    return "x"
  raise TypeError(value)


def _excluded(key):
  return any(key == e or key.startswith(e + ".") for e in sampling.NOT_IN_JOB_IDENTITY)


def test_every_setting_that_can_change_an_image_names_a_new_job(tfds_dir):
  config = smoke_config(tfds_dir)
  base = sampling.job_name(sampling.job_identity(config, step=2, fingerprint="f0"))
  keys = list(_leaf_keys(json.loads(config.to_json_best_effort())))
  assert len(keys) > 60
  for key in keys:
    if key == "model.init_from":  # where converted weights come from: their fingerprint is what counts
      continue
    changed = copy.deepcopy(config)
    section, name = key.rsplit(".", 1) if "." in key else ("", key)
    target = changed
    for part in filter(None, section.split(".")):
      target = target[part]
    with changed.ignore_type():
      target[name] = _changed(target[name])
    name_after = sampling.job_name(sampling.job_identity(changed, step=2, fingerprint="f0"))
    assert (name_after == base) == _excluded(key), key
  assert sampling.job_name(sampling.job_identity(config, step=3, fingerprint="f0")) != base
  assert sampling.job_name(sampling.job_identity(config, step=2, fingerprint="f1")) != base


def test_converted_weights_are_named_by_their_fingerprint(tfds_dir):
  config = smoke_config(tfds_dir, **{"model.init_from": "a.pt"})
  other_file = smoke_config(tfds_dir, **{"model.init_from": "b.pt"})
  name = sampling.job_name(sampling.job_identity(config, step=0, fingerprint="f0"))
  assert name.startswith("pytorch_")
  assert name == sampling.job_name(sampling.job_identity(other_file, step=0, fingerprint="f0"))  # same weights
  assert name != sampling.job_name(sampling.job_identity(other_file, step=0, fingerprint="f1"))


def test_params_fingerprint_sees_every_value():
  params = {"a": jnp.arange(6, dtype=jnp.float32).reshape(2, 3), "b": {"c": jnp.ones((4,), jnp.bfloat16)}}
  base = sampling.params_fingerprint(params)
  assert base == sampling.params_fingerprint(jax.tree.map(jnp.copy, params))
  nudged = {**params, "a": params["a"].at[1, 2].set(jnp.nextafter(5.0, 6.0))}  # one ulp of one value
  swapped = {**params, "a": params["a"].at[0, 0].set(1.0).at[0, 1].set(0.0)}
  renamed = {"a": params["a"], "d": params["b"]}
  assert len({base, *map(sampling.params_fingerprint, (nudged, swapped, renamed))}) == 4


@pytest.fixture(scope="module")
def trained(tfds_dir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("trained")
  config = smoke_config(tfds_dir, **{"train.num_steps": 2, "sample.num_samples": 8,
                                     "sample.per_device_batch_size": 2})
  loop.run(config, str(workdir))
  return config, workdir


def _run(config, workdir, **overrides):
  config = copy.deepcopy(config)
  for key, value in overrides.items():
    section, name = key.split(".")
    config[section][name] = value
  summary = sampling.run(config, str(workdir))
  with np.load(summary["npz"]) as f:
    return summary, f["arr_0"]


def test_settings_start_a_new_job_and_batching_resumes_the_same(trained):
  config, workdir = trained
  first, images = _run(config, workdir, **{"sample.sampler": "ddim", "sample.timestep_respacing": "5"})
  assert first["sampled_now"] == 8
  # bfloat16 compute, another eta or no clipping: other images, so a fresh job each.
  for overrides in ({"model.dtype": "bfloat16"}, {"sample.eta": 1.0}, {"sample.clip_denoised": False}):
    summary, _ = _run(config, workdir, **{"sample.sampler": "ddim", "sample.timestep_respacing": "5", **overrides})
    assert summary["sampled_now"] == 8 and summary["job"] != first["job"], overrides
  # Another batch size or sample count only draws what the job lacks.
  again, same = _run(config, workdir, **{"sample.sampler": "ddim", "sample.timestep_respacing": "5",
                                         "sample.per_device_batch_size": 3})
  assert again["sampled_now"] == 0 and again["job"] == first["job"]
  np.testing.assert_array_equal(same, images)
  more, _ = _run(config, workdir, **{"sample.sampler": "ddim", "sample.timestep_respacing": "5",
                                     "sample.num_samples": 10})
  assert more["sampled_now"] == 2 and more["job"] == first["job"]
  with open(os.path.join(first["job"], "job.json")) as f:
    assert json.load(f)["settings"]["sample"]["sampler"] == "ddim"  # the identity in full, beside the shards


def test_truncated_shards_and_partial_files_are_redrawn(trained, caplog):
  config, workdir = trained
  summary, reference = _run(config, workdir)
  shard_dir = os.path.join(summary["job"], "shards")
  shards = sorted(f for f in os.listdir(shard_dir))
  assert len(shards) == 4 and all(f.startswith("shard_") for f in shards)
  damaged = os.path.join(shard_dir, shards[1])
  os.truncate(damaged, os.path.getsize(damaged) // 2)  # as a kill inside the write of a non-atomic copy leaves it
  with open(os.path.join(shard_dir, f"{sampling._PARTIAL_PREFIX}999-shard_00000006.npz"), "wb") as f:
    f.write(b"PK\x03\x04 half a zip")  # a killed writer's temporary file
  again, images = _run(config, workdir)
  assert again["sampled_now"] == 2 and "is unreadable" in caplog.text
  np.testing.assert_array_equal(images, reference)
  assert len(os.listdir(os.path.join(summary["job"], "shards_unreadable"))) == 1
  assert sorted(os.listdir(shard_dir)) == shards  # the temporary file is gone, the shard rewritten
