"""Stable Diffusion 1.5's UNet on this machine: attention implementations at its 512px shapes, and the time XLA takes
to lower and compile (and, where memory allows, run) a sampling step and a train step.

  python benchmarks/sd_unet_compile.py                    # both tables, each measurement in a fresh process
  python benchmarks/sd_unet_compile.py --what=attention   # one table
  python benchmarks/sd_unet_compile.py --what=compile --execute=sample  # skip running the train step

attention: one layer at 64x64 latents (4096 tokens, 8 heads of 40 channels, batch 1): self-attention over the 4096
tokens and cross-attention to 77 text tokens, forward and forward+backward, fp32, best of --repeats runs after a
warm-up, for XLA's jax.nn.dot_product_attention (it materialises [B, heads, T, S]), the blocked kernel of the ADM
blocks (token-major), the same kernel over head-major copies, and models.attention.fast_attention (the spatial
transformers' choice on this backend); PyTorch's scaled_dot_product_attention for reference when torch is installed.

compile: the SD 1.5 UNet (configs/sd15.py, fp32) lowered from ShapeDtypeStructs (no weights needed) and compiled:
  sample  one classifier-free-guided denoiser call: the UNet at batch 2 (unconditional and conditional halves of
          one 64x64x4 latent, 77x768 contexts), eps = u + 7.5 (c - u)
  train   epsilon-prediction MSE at batch 1, its gradient and an Adam update (optax), params and state donated
--execute runs the compiled programs on constant weights (values do not change the time), timed after one warm-up
run: 3.4 GB of weights; the train step holds Adam's state and the gradients too (16.6 GiB peak RSS on a 2-core CPU).
The whole script takes about 6 minutes there.
"""

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from jaxdiff import xla_flags  # noqa: E402  pylint: disable=wrong-import-position

LATENT, CONTEXT, CONTEXT_LEN, GUIDANCE = 64, 768, 77, 7.5


def best_time(fn, *args, repeats: int) -> float:
  import jax  # pylint: disable=import-outside-toplevel
  jax.block_until_ready(fn(*args))  # warm-up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return min(times)


def measure_torch_attention(keys: int, repeats: int) -> dict:
  """PyTorch's scaled_dot_product_attention on the same shapes, for reference (its CPU flash-attention kernel)."""
  import torch  # pylint: disable=import-outside-toplevel
  torch.set_num_threads(os.cpu_count())
  q = torch.randn(1, 8, LATENT * LATENT, 40, requires_grad=True)
  k, v = (torch.randn(1, 8, keys, 40, requires_grad=True) for _ in range(2))
  cotangent = torch.randn(q.shape)
  attend = torch.nn.functional.scaled_dot_product_attention

  def forward():
    with torch.no_grad():
      attend(q, k, v)

  def backward():
    torch.autograd.grad((attend(q, k, v) * cotangent).sum(), (q, k, v))

  row = dict(keys=keys, impl='torch_sdpa')
  for name, fn in (('forward_ms', forward), ('backward_ms', backward)):
    fn()
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      fn()
      times.append(time.perf_counter() - start)
    row[name] = round(1e3 * min(times), 1)
  return row


def measure_attention(keys: int, impl: str, repeats: int) -> dict:
  if impl == 'torch_sdpa':
    return measure_torch_attention(keys, repeats)
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from jaxdiff.models import attention  # pylint: disable=import-outside-toplevel
  fns = {'xla': lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation='xla'),
         'blocked': attention.dot_product_attention, 'blocked_heads_first': attention.blocked_attention_heads_first,
         'fast_attention': attention.fast_attention}
  fn = fns[impl]
  q = jax.random.normal(jax.random.key(0), (1, LATENT * LATENT, 8, 40))
  k, v = (jax.random.normal(jax.random.key(i), (1, keys, 8, 40)) for i in (1, 2))
  cotangent = jax.random.normal(jax.random.key(3), q.shape)
  forward = jax.jit(fn)
  backward = jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) * cotangent), argnums=(0, 1, 2)))
  return dict(keys=keys, impl=impl, forward_ms=round(1e3 * best_time(forward, q, k, v, repeats=repeats), 1),
              backward_ms=round(1e3 * best_time(backward, q, k, v, repeats=repeats), 1))


def sd15_unet():
  from configs import sd15  # pylint: disable=import-outside-toplevel
  from jaxdiff import models  # pylint: disable=import-outside-toplevel
  config = sd15.get_config()
  model = models.create_model(config.model, image_size=LATENT, in_channels=4, out_channels=4, num_classes=None)
  return model, models.param_shapes(model, LATENT, 4, None)


def measure_compile(program: str, execute: bool) -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  model, params = sd15_unet()
  f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  if program == 'sample':
    def step(params, x, t, context):
      eps = model.apply({'params': params}, jnp.concatenate([x, x]), jnp.concatenate([t, t]), {'context': context},
                        train=False)
      uncond, cond = jnp.split(eps, 2)
      return uncond + GUIDANCE * (cond - uncond)
    args = (params, f32(1, LATENT, LATENT, 4), f32(1), f32(2, CONTEXT_LEN, CONTEXT))
    jitted = jax.jit(step)
  else:
    tx = optax.adam(1e-4)

    def step(params, opt_state, x, noise, t, context):
      def loss_fn(params):
        eps = model.apply({'params': params}, x + noise, t, {'context': context}, train=True)
        return jnp.mean(jnp.square(eps - noise))
      loss, grads = jax.value_and_grad(loss_fn)(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, loss
    args = (params, jax.eval_shape(tx.init, params), f32(1, LATENT, LATENT, 4), f32(1, LATENT, LATENT, 4), f32(1),
            f32(1, CONTEXT_LEN, CONTEXT))
    jitted = jax.jit(step, donate_argnums=(0, 1))
  start = time.perf_counter()
  lowered = jitted.lower(*args)
  lower_s = time.perf_counter() - start
  start = time.perf_counter()
  compiled = lowered.compile()
  row = dict(program=program, lower_s=round(lower_s, 1), compile_s=round(time.perf_counter() - start, 1))
  if execute:
    concrete = jax.tree.map(lambda s: jnp.full(s.shape, 0.01, s.dtype), args)
    if program == 'sample':
      row['run_s'] = round(best_time(compiled, *concrete, repeats=1), 2)
    else:  # params and Adam state are donated: the second run takes the first one's outputs
      params, opt_state, _ = jax.block_until_ready(compiled(*concrete))
      start = time.perf_counter()
      jax.block_until_ready(compiled(params, opt_state, *concrete[2:]))
      row['run_s'] = round(time.perf_counter() - start, 2)
    row['peak_rss_gib'] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 1)
  return row


def child(args) -> dict:
  """One measurement in a fresh process, so compile caches and peak memory are its own."""
  out = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True, text=True).stdout
  return json.loads(out.strip().splitlines()[-1])


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--what', choices=('attention', 'compile', 'all'), default='all')
  parser.add_argument('--execute', default='sample,train', help="programs to run: '', sample, train or sample,train")
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--one', help=argparse.SUPPRESS)  # internal: one measurement, as JSON
  args = parser.parse_args(argv)
  xla_flags.add_cpu_defaults()  # what train.py and sample.py run with
  if args.one:
    kind, *rest = args.one.split(':')
    row = (measure_attention(int(rest[0]), rest[1], args.repeats) if kind == 'attention'
           else measure_compile(rest[0], rest[1] == '1'))
    print(json.dumps(row))
    return
  import jax  # pylint: disable=import-outside-toplevel
  print(f'backend {jax.default_backend()}, {os.cpu_count()} CPUs, jax {jax.__version__}, '
        f'XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}')
  if args.what in ('attention', 'all'):
    print('\n| attention (1 x 4096 queries, 8 heads x 40, fp32) | implementation | forward ms | forward+backward ms |')
    print('|---|---|---|---|')
    for keys in (LATENT * LATENT, CONTEXT_LEN):
      for impl in ('xla', 'blocked', 'blocked_heads_first', 'fast_attention', 'torch_sdpa'):
        if impl == 'torch_sdpa' and importlib.util.find_spec('torch') is None:
          continue
        row = child([f'--one=attention:{keys}:{impl}', f'--repeats={args.repeats}'])
        what = 'self (4096 keys)' if keys == LATENT * LATENT else 'cross (77 keys)'
        print(f'| {what} | {impl} | {row["forward_ms"]} | {row["backward_ms"]} |', flush=True)
  if args.what in ('compile', 'all'):
    execute = set(filter(None, args.execute.split(',')))
    print('\n| SD 1.5 UNet, fp32 | lower s | compile s | one run s | peak RSS GiB |')
    print('|---|---|---|---|---|')
    for program, label in (('sample', 'sampling step (CFG, batch 2x1, 64x64x4, 77x768)'),
                           ('train', 'train step (loss + grad + Adam, batch 1)')):
      row = child([f'--one=compile:{program}:{int(program in execute)}'])
      print(f'| {label} | {row["lower_s"]} | {row["compile_s"]} | {row.get("run_s", "-")} | '
            f'{row.get("peak_rss_gib", "-")} |', flush=True)


if __name__ == '__main__':
  main()
