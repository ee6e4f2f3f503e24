"""The SDXL base UNet's train step sharded with mesh.fsdp=8: per-device bytes of the train state, and the time and
memory XLA reports for the step, from shapes alone (no weights are made), on 8 fake CPU devices.

  python benchmarks/sdxl_memory.py                      # configs/sdxl_base.py, lowered and compiled
  python benchmarks/sdxl_memory.py --no-compile         # the sharded byte counts and lowering only
  python benchmarks/sdxl_memory.py --config=configs/sdxl_base.py:smoke --json   # the tiny variant, as JSON

The step is the project's (`jaxdiff.train.state.train_step`: t and noise drawn, epsilon MSE, gradient clipping, Adam
from `train.experiment.optimizer`, EMA update), jitted as the jobs jit it (state donated, in/out shardings of
`train/mesh.py`'s state_sharding, the batch split over every device), at `--batch-per-device` latents of the config's
size (128x128x4 for SDXL) with the embedded conditions in the batch: context [B, 77, context_dim] and vector
[B, adm_in_channels]. The frozen text encoders and VAE are not part of it (their outputs are inputs here).
Per-device bytes are the shard shapes of each state leaf (params, EMA params, Adam's moments); XLA's memory analysis
is the compiled per-device program's (arguments, outputs, temporaries). The SDXL compile took 20 minutes on a shared
2-core CPU (benchmarks/RESULTS.md); the byte counts alone take seconds (--no-compile: about a minute).
"""

import argparse
import dataclasses
import functools
import json
import math
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402  pylint: disable=wrong-import-position
import jax.numpy as jnp  # noqa: E402  pylint: disable=wrong-import-position

from jaxdiff import models, xla_flags  # noqa: E402  pylint: disable=wrong-import-position
from jaxdiff.models import conditioning  # noqa: E402  pylint: disable=wrong-import-position
from jaxdiff.diffusion import create_diffusion  # noqa: E402  pylint: disable=wrong-import-position
from jaxdiff.train import experiment, mesh as mesh_lib  # noqa: E402  pylint: disable=wrong-import-position
from jaxdiff.train.state import create_state, train_step  # noqa: E402  pylint: disable=wrong-import-position

DEVICES = 8
CONTEXT_LEN = 77  # CLIP's tokens per prompt
GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class EmbeddedCondition:
  """The conditioner of the step: the batch already holds the embedded conditions (the frozen text encoders' work);
  a dropped condition is zeros (SDXL's latent.text_null='zeros')."""
  keys: tuple[str, ...]

  def from_batch(self, batch: dict) -> dict:
    return {k: batch[k] for k in self.keys}

  def drop(self, key: jax.Array, cond: dict, prob: float) -> dict:
    return conditioning.drop(key, cond, jax.tree.map(jnp.zeros_like, cond), prob)


def load_config(spec: str):
  """A configs/<name>.py[:variant] path -> its ConfigDict."""
  import importlib.util  # pylint: disable=import-outside-toplevel
  path, _, variant = spec.partition(':')
  module_spec = importlib.util.spec_from_file_location('benchmark_config', os.path.join(ROOT, path))
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(variant or None)


def abstract_train(config):
  """(UNet, diffusion, optimizer, latent size, abstract TrainState) of a latent config's UNet, from shapes alone."""
  stage_factor = 2 ** (len(config.autoencoder.channel_mult) - 1)
  latent, channels = config.data.image_size // stage_factor, config.autoencoder.latent_channels
  diffusion = create_diffusion(config.diffusion)
  model = models.create_model(config.model, image_size=latent, in_channels=channels,
                              out_channels=channels * diffusion.output_channels_factor, num_classes=None)
  tx = experiment.optimizer(config, config.train.learning_rate)

  def init(key):
    params = model.init(key, *models.dummy_inputs(model, latent, channels), train=False)['params']
    return create_state(params, tx, num_timesteps=diffusion.num_timesteps)
  return model, diffusion, tx, latent, jax.eval_shape(init, jax.random.key(0))


def tree_bytes(tree, shardings=None) -> int:
  """Bytes of a tree of ShapeDtypeStructs: whole, or of one device's shards under `shardings`."""
  leaves = jax.tree.leaves(tree)
  shapes = ([s.shard_shape(leaf.shape) for leaf, s in zip(leaves, jax.tree.leaves(shardings))] if shardings
            else [leaf.shape for leaf in leaves])
  return sum(math.prod(shape) * leaf.dtype.itemsize for leaf, shape in zip(leaves, shapes))


def state_bytes(state, shardings) -> dict:
  """{part: (bytes whole, bytes per device)} of a TrainState's params, EMA params and optimizer state."""
  parts = {'params': (state.params, shardings.params), 'ema_params': (state.ema_params, shardings.ema_params),
           'opt_state': (state.opt_state, shardings.opt_state)}
  out = {name: (tree_bytes(tree), tree_bytes(tree, sh)) for name, (tree, sh) in parts.items()}
  out['total'] = (tree_bytes(state), tree_bytes(state, shardings))
  return out


def measure(spec: str, *, fsdp: int, batch_per_device: int, compile_step: bool, remat: bool, dtype: str) -> dict:
  config = load_config(spec)
  config.model.remat, config.model.dtype = remat, dtype
  config.mesh.fsdp = fsdp
  model, diffusion, tx, latent, state = abstract_train(config)
  mesh = mesh_lib.make_mesh(config.mesh)
  shardings = mesh_lib.state_sharding(state, mesh)
  row = dict(config=spec, devices=jax.device_count(), fsdp=fsdp, dtype=dtype, remat=remat,
             parameters=sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(state.params)),
             bytes={k: list(v) for k, v in state_bytes(state, shardings).items()})
  m = config.model
  batch_size = batch_per_device * jax.device_count()
  f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32, sharding=mesh_lib.batch_sharding(mesh))
  batch = {'image': f32(batch_size, latent, latent, config.autoencoder.latent_channels)}
  if m.context_dim:
    batch['context'] = f32(batch_size, CONTEXT_LEN, m.context_dim)
  if m.adm_in_channels:
    batch['vector'] = f32(batch_size, m.adm_in_channels)
  step = functools.partial(
      train_step, apply_fn=model.apply, diffusion=diffusion, tx=tx, base_key=jax.random.key(0),
      ema_decay=config.train.ema_decay, condition=EmbeddedCondition(tuple(k for k in batch if k != 'image')),
      cond_drop_prob=config.train.cond_drop_prob)
  jitted = jax.jit(step, donate_argnums=0, in_shardings=(shardings, mesh_lib.batch_sharding(mesh)),
                   out_shardings=(shardings, None))
  abstract_state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), state, shardings)
  start = time.perf_counter()
  lowered = jitted.lower(abstract_state, batch)
  row.update(batch=batch_size, latent=latent, lower_s=round(time.perf_counter() - start, 1))
  if compile_step:
    start = time.perf_counter()
    compiled = lowered.compile()
    row['compile_s'] = round(time.perf_counter() - start, 1)
    analysis = compiled.memory_analysis()
    if analysis is not None:
      row['memory_analysis'] = {k: int(getattr(analysis, f'{k}_size_in_bytes')) for k in
                                ('argument', 'output', 'alias', 'temp', 'generated_code')}
  return row


def table(row: dict) -> str:
  """Two markdown tables: the train state's bytes, whole and per device; the step's times and XLA's memory analysis."""
  gib = lambda n: f'{n / GIB:.2f}'
  b = row['bytes']
  lines = [f"| {row['config']}: {row['parameters']:,} parameters, mesh.fsdp={row['fsdp']} on {row['devices']} "
           'devices | whole GiB | per device GiB |', '|---|---|---|']
  for name, label in (('params', 'params'), ('ema_params', 'EMA params'), ('opt_state', 'Adam state (mu, nu)'),
                      ('total', 'train state')):
    lines.append(f'| {label} | {gib(b[name][0])} | {gib(b[name][1])} |')
  analysis = row.get('memory_analysis') or {}
  cells = [gib(analysis[k]) if analysis else '-' for k in ('argument', 'output', 'temp')]
  peak = (gib(analysis['argument'] + analysis['output'] - analysis['alias'] + analysis['temp']) if analysis
          else '-')
  lines += ['', '| train step | lower s | compile s | per device (XLA): arguments GiB | outputs GiB | temporaries GiB '
            '| arguments + outputs - donated + temporaries GiB |', '|---|---|---|---|---|---|---|',
            f"| batch {row['batch']} ({row['batch'] // row['devices']} per device), {row['latent']}x{row['latent']} "
            f"latents, {row['dtype']}, remat {row['remat']} | {row['lower_s']} | {row.get('compile_s', '-')} | "
            + ' | '.join(cells) + f' | {peak} |']
  return '\n'.join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--config', default='configs/sdxl_base.py', help='configs/<name>.py[:variant]')
  parser.add_argument('--fsdp', type=int, default=DEVICES)
  parser.add_argument('--batch-per-device', type=int, default=1)
  parser.add_argument('--no-compile', dest='compile_step', action='store_false')
  parser.add_argument('--remat', action='store_true')
  parser.add_argument('--dtype', choices=('float32', 'bfloat16'), default='float32')
  parser.add_argument('--json', action='store_true', help='print the measurements as one JSON line')
  args = parser.parse_args(argv)
  # Before JAX starts its CPU backend: the fake devices, and the flags train.py runs with.
  os.environ['XLA_FLAGS'] = f'{os.environ.get("XLA_FLAGS", "")} --xla_force_host_platform_device_count={DEVICES}'
  xla_flags.add_cpu_defaults()
  jax.config.update('jax_platforms', 'cpu')
  row = measure(args.config, fsdp=args.fsdp, batch_per_device=args.batch_per_device, compile_step=args.compile_step,
                remat=args.remat, dtype=args.dtype)
  print(json.dumps(row) if args.json else table(row))


if __name__ == '__main__':
  main()
