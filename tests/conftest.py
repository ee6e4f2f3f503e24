"""Shared test setup: a persistent compilation cache so the many small end-to-end runs compile each program once."""

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


# Subprocesses (CLI, kill/resume and multi-process tests) share the cache through JAX's environment variables.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", jax.config.jax_compilation_cache_dir)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
