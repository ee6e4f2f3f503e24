"""Shared test setup: a persistent compilation cache so the many small end-to-end runs compile each program once."""

import importlib.util
import os
import tempfile

import jax
import pytest

jax.config.update("jax_compilation_cache_dir",
                  os.environ.get("JAXDIFF_TEST_CACHE", os.path.join(tempfile.gettempdir(), "jaxdiff_test_cache")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


@pytest.fixture(scope="session")
def tfds_dir(tmp_path_factory):
  """One TFDS data_dir for the session, so the bundled datasets are prepared once."""
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def torch_one_thread():
  """PyTorch on one thread for a module: once JAX has run, PyTorch's OpenMP threads contend with XLA's on a small CPU
  (a tiny decode takes 0.5 s on 2 threads, 16 ms on 1). Restored after the module."""
  if importlib.util.find_spec("torch") is None:
    yield
    return
  import torch  # pylint: disable=import-outside-toplevel
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(threads)


# Subprocesses (CLI, kill/resume and multi-process tests) share the cache through JAX's environment variables.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", jax.config.jax_compilation_cache_dir)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
