"""jaxdiff's XLA:CPU defaults: added only where missing, only on the measured jaxlib, and accepted by XLA."""

import importlib.metadata
import os
import subprocess
import sys

from jaxdiff import xla_flags

NAME = next(iter(xla_flags.CPU_FLAGS))


def test_adds_missing_flags_and_keeps_the_users(monkeypatch):
  monkeypatch.setattr(importlib.metadata, 'version', lambda _: '0.10.2')
  env = {'XLA_FLAGS': '--xla_force_host_platform_device_count=2'}
  assert xla_flags.add_cpu_defaults(env) == [f'--{NAME}={xla_flags.CPU_FLAGS[NAME]}']
  assert env['XLA_FLAGS'].startswith('--xla_force_host_platform_device_count=2 ')
  assert xla_flags.add_cpu_defaults(env) == []  # a second call adds nothing
  users = {'XLA_FLAGS': f'--{NAME}=individual_dot'}
  assert xla_flags.add_cpu_defaults(users) == [] and users['XLA_FLAGS'] == f'--{NAME}=individual_dot'


def test_other_jaxlib_versions_keep_xla_defaults(monkeypatch):
  monkeypatch.setattr(importlib.metadata, 'version', lambda _: '0.11.0')
  env = {}
  assert xla_flags.add_cpu_defaults(env) == [] and env == {}


def test_the_installed_xla_accepts_the_flags():
  """XLA aborts on a flag it does not know: a jaxlib upgrade that drops one fails here, not in users' jobs."""
  env = dict(os.environ)
  env.pop('XLA_FLAGS', None)
  added = xla_flags.add_cpu_defaults(env)
  code = 'import jax, jax.numpy as jnp; print(float(jnp.ones((1, 4, 4, 2)).sum()))'
  result = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True, timeout=300,
                          check=False)
  assert result.returncode == 0 and result.stdout.strip() == '32.0', (added, result.stderr[-2000:])
