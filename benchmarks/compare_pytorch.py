"""jaxdiff against diffusers (PyTorch) on the same network and weights: train step, samplers, compile, memory.

  python benchmarks/compare_pytorch.py --quick                    # reduced sizes, < 5 minutes on a 2-core CPU
  python benchmarks/compare_pytorch.py --dtype=bf16 --batch=256   # full-size networks on an accelerator

A random diffusers `UNet2DModel` is saved and converted with `jaxdiff.convert.load_diffusers`, so both frameworks
run the same weights. Times are medians over repeated runs after a warm-up, waiting for the device each time.
See benchmarks/README.md for what each row measures.
"""

import argparse
import contextlib
import dataclasses
import os
import statistics
import sys
import tempfile
import threading
import time

import jax
import numpy as np
import psutil

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import default  # pylint: disable=wrong-import-position
from jaxdiff import convert, sampling, xla_flags  # pylint: disable=wrong-import-position
from jaxdiff.train import experiment as experiment_lib  # pylint: disable=wrong-import-position
from jaxdiff.train import loop  # pylint: disable=wrong-import-position
from jaxdiff.train import mesh as mesh_lib  # pylint: disable=wrong-import-position
from jaxdiff.train.state import create_state  # pylint: disable=wrong-import-position

# UNet2DModel arguments. DDPM CIFAR-10 is the paper network (35.7M). ADM ImageNet-64 has guided-diffusion's widths,
# depth, heads, attention levels and 1000 classes, with plain conv up/down-sampling and additive time embedding:
# jaxdiff's converter refuses diffusers' resnet resampling and scale-shift middle block (no GroupNorm before its
# attention), so the BigGAN/scale-shift variant has no diffusers twin to compare with.
NETWORKS = {
    'ddpm_cifar10': dict(sample_size=32, block_out_channels=(128, 256, 256, 256), layers_per_block=2,
                         down_block_types=('DownBlock2D', 'AttnDownBlock2D', 'DownBlock2D', 'DownBlock2D'),
                         up_block_types=('UpBlock2D', 'UpBlock2D', 'AttnUpBlock2D', 'UpBlock2D'),
                         attention_head_dim=None, norm_eps=1e-6, downsample_padding=0, flip_sin_to_cos=False,
                         freq_shift=1, dropout=0.1),
    'adm_imagenet64': dict(sample_size=64, block_out_channels=(192, 384, 576, 768), layers_per_block=3,
                           down_block_types=('DownBlock2D',) + ('AttnDownBlock2D',) * 3,
                           up_block_types=('AttnUpBlock2D',) * 3 + ('UpBlock2D',), attention_head_dim=64,
                           num_class_embeds=1000, dropout=0.1),
}
# --quick: the same block structure at a fraction of the width (and ADM at one block per level).
QUICK = {'ddpm_cifar10': dict(block_out_channels=(32, 64, 64, 64)),
         'adm_imagenet64': dict(block_out_channels=(32, 64, 96, 128), layers_per_block=1, attention_head_dim=32)}
# Dense peak TFLOP/s by (device kind substring, dtype), for MFU when --peak-tflops is not given (SXM parts).
PEAK_TFLOPS = {('H100', 'bf16'): 989.0, ('H100', 'fp32'): 67.0, ('H200', 'bf16'): 989.0, ('H200', 'fp32'): 67.0,
               ('A100', 'bf16'): 312.0, ('A100', 'fp32'): 19.5}


@dataclasses.dataclass
class Settings:
  batch: int
  sample_batch: int
  ddim_steps: int = 50
  ancestral_steps: int = 1000
  train_reps: int = 5
  sample_reps: int = 3
  dtype: str = 'fp32'
  torch_compile: bool = True


@dataclasses.dataclass
class Result:
  """One measured quantity: jaxdiff, PyTorch eager and torch.compile (a number, or 'n/a (reason)')."""
  name: str
  unit: str
  jax: float | str
  torch: float | str
  compiled: float | str = 'n/a'


def is_gpu() -> bool:
  return jax.default_backend() == 'gpu'


def median_time(fn, reps: int, sync) -> float:
  """Median wall time of fn() over `reps` runs after one warm-up, each waited for with sync(result)."""
  sync(fn())
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    sync(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


@contextlib.contextmanager
def peak_memory(framework: str):
  """Yields a dict that holds 'bytes' afterwards: the peak device memory on GPU; on CPU the peak host RSS above
  the RSS at entry, sampled every 5 ms (XLA's and torch's allocators are invisible to tracemalloc)."""
  out = {}
  if is_gpu() and framework == 'torch':
    import torch  # pylint: disable=import-outside-toplevel
    torch.cuda.reset_peak_memory_stats()
    yield out
    out['bytes'] = torch.cuda.max_memory_allocated()
    return
  if is_gpu():
    # JAX keeps one peak for the process; jaxdiff phases run before any later jaxdiff phase would raise it.
    yield out
    out['bytes'] = jax.devices()[0].memory_stats()['peak_bytes_in_use']
    return
  proc = psutil.Process()
  base = proc.memory_info().rss
  peak = [base]
  stop = threading.Event()

  def watch():
    while not stop.wait(0.005):
      peak[0] = max(peak[0], proc.memory_info().rss)

  thread = threading.Thread(target=watch, daemon=True)
  thread.start()
  try:
    yield out
  finally:
    stop.set()
    thread.join()
    out['bytes'] = max(peak[0], proc.memory_info().rss) - base


def save_diffusers_model(net: dict, folder: str, seed: int = 0):
  """A random UNet2DModel (PyTorch's default init) saved with save_pretrained; returns the model."""
  import diffusers  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  torch.manual_seed(seed)
  model = diffusers.UNet2DModel(in_channels=3, out_channels=3, **net)
  model.save_pretrained(folder)
  return model


def jaxdiff_config(converted: convert.Converted, s: Settings):
  """A config for the converted network: DDPM's diffusion and optimizer, the given batches and dtype."""
  config = default.get_config()
  config.model.update(converted.model_config.to_dict())
  config.model.dtype = 'bfloat16' if s.dtype == 'bf16' else 'float32'
  config.data.image_size, config.data.channels = converted.image_size, converted.in_channels
  config.train.batch_size = s.batch
  config.train.warmup_steps = 1
  config.sample.num_samples = s.sample_batch
  config.sample.per_device_batch_size = s.sample_batch // jax.device_count()
  return config


def synthetic_batch(exp, batch: int, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  out = {'image': rng.uniform(-1, 1, (batch, *exp.sample_shape)).astype(np.float32)}
  if exp.num_classes:
    out['label'] = rng.integers(0, exp.num_classes, batch).astype(np.int32)
  return exp.shard_batch(out)


def jax_train(config, params, s: Settings) -> dict:
  """jaxdiff's donated, jitted train step (forward, backward, Adam, EMA) on the converted weights."""
  exp = experiment_lib.build(config)
  batch = synthetic_batch(exp, s.batch)
  start = time.perf_counter()
  compiled = loop.make_train_step(exp).lower(exp.abstract_state_with_sharding(), batch).compile()
  compile_s = time.perf_counter() - start
  # Measured from before the state is placed (torch: before it moves the model and creates the optimizer).
  with peak_memory('jax') as mem:
    state = create_state(params, exp.tx, num_timesteps=exp.diffusion.num_timesteps)
    holder = [mesh_lib.host_to_mesh(state, exp.state_sharding, process_local=False)]

    def step():
      holder[0], metrics = compiled(holder[0], batch)
      return metrics['loss']

    seconds = median_time(step, s.train_reps, jax.block_until_ready)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return dict(seconds=seconds, compile_s=compile_s, bytes=mem['bytes'], flops=float(cost.get('flops', 0.0)))


def torch_train(model, s: Settings, *, compile_model: bool) -> dict:
  """The same step in PyTorch: DDPM loss at uniform t, backward, grad clipping, Adam, EMA (foreach ops)."""
  device = 'cuda' if is_gpu() else 'cpu'
  with peak_memory('torch') as mem:
    result = _torch_train(model.to(device).train(), s, device, compile_model)
  return dict(result, bytes=mem['bytes'])


def _torch_train(model, s: Settings, device: str, compile_model: bool) -> dict:
  import torch  # pylint: disable=import-outside-toplevel
  ema = [p.detach().clone() for p in model.parameters()]
  opt = torch.optim.Adam(model.parameters(), lr=2e-4)
  abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0).float().to(device)
  size = model.config.sample_size
  gen = torch.Generator(device).manual_seed(0)
  x0 = torch.rand(s.batch, 3, size, size, generator=gen, device=device) * 2 - 1
  labels = (torch.randint(0, model.config.num_class_embeds, (s.batch,), generator=gen, device=device)
            if model.config.num_class_embeds else None)
  autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=s.dtype == 'bf16')
  forward = torch.compile(model) if compile_model else model

  def step():
    t = torch.randint(0, 1000, (s.batch,), generator=gen, device=device)
    noise = torch.randn(x0.shape, generator=gen, device=device)
    a = abar[t].view(-1, 1, 1, 1)
    with autocast:
      out = forward(a.sqrt() * x0 + (1 - a).sqrt() * noise, t, class_labels=labels).sample
    loss = torch.nn.functional.mse_loss(out.float(), noise)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    with torch.no_grad():
      params = [p.detach() for p in model.parameters()]
      torch._foreach_mul_(ema, 0.9999)  # pylint: disable=protected-access
      torch._foreach_add_(ema, params, alpha=1e-4)  # pylint: disable=protected-access
    return loss

  sync = (lambda _: torch.cuda.synchronize()) if device == 'cuda' else (lambda loss: loss.item())
  start = time.perf_counter()
  sync(step())  # the first step is where torch.compile compiles
  compile_s = time.perf_counter() - start
  return dict(seconds=median_time(step, s.train_reps, sync), compile_s=compile_s)


def jax_sample(config, params, sampler: str, steps: int, reps: int) -> dict:
  """jaxdiff's sampling program (one lax.scan over the respaced steps) as sampling.run builds it."""
  config = config.copy_and_resolve_references()
  config.sample.sampler = sampler
  config.sample.timestep_respacing = f'ddim{steps}' if sampler == 'ddim' else str(steps)
  exp = experiment_lib.build(config)
  params = mesh_lib.host_to_mesh(params, exp.state_sharding.params, process_local=False)
  fn = sampling.make_sample_fn(exp, clip_denoised=True)
  args = fn.device_args(params, 0, np.arange(config.sample.per_device_batch_size * jax.device_count()))
  start = time.perf_counter()
  compiled = fn.jitted.lower(*args).compile()
  compile_s = time.perf_counter() - start
  with peak_memory('jax') as mem:
    seconds = median_time(lambda: compiled(*args), reps, jax.block_until_ready)
  return dict(seconds=seconds, compile_s=compile_s, bytes=mem['bytes'])


def torch_sample(model, sampler: str, steps: int, batch: int, reps: int, dtype: str) -> dict:
  """The diffusers pipelines' loop (DDIMPipeline / DDPMPipeline): the model and scheduler.step per timestep."""
  import diffusers  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  device = 'cuda' if is_gpu() else 'cpu'
  model = model.to(device).eval()
  cls = diffusers.DDIMScheduler if sampler == 'ddim' else diffusers.DDPMScheduler
  scheduler = cls(num_train_timesteps=1000, beta_schedule='linear', clip_sample=True)
  size = model.config.sample_size
  labels = (torch.arange(batch, device=device) % model.config.num_class_embeds
            if model.config.num_class_embeds else None)

  def run():
    gen = torch.Generator(device).manual_seed(0)
    scheduler.set_timesteps(steps)
    x = torch.randn(batch, 3, size, size, generator=gen, device=device)
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == 'bf16'):
      for t in scheduler.timesteps:
        eps = model(x, t, class_labels=labels).sample.float()
        x = scheduler.step(eps, t, x, generator=gen).prev_sample
    return x

  sync = (lambda _: torch.cuda.synchronize()) if device == 'cuda' else (lambda x: x.cpu())
  with peak_memory('torch') as mem:
    seconds = median_time(run, reps, sync)
  return dict(seconds=seconds, bytes=mem['bytes'])


def attempt(fn):
  """fn()'s result, or 'n/a (reason)' when it raises (torch.compile without a working compiler, ...)."""
  try:
    return fn()
  except Exception as e:  # pylint: disable=broad-except
    reason = str(e).strip().splitlines()[0][:80] if str(e).strip() else type(e).__name__
    return f'n/a ({type(e).__name__}: {reason})'


def peak_tflops(dtype: str, given: float | None) -> float | None:
  if given:
    return given
  kind = jax.devices()[0].device_kind
  return next((v for (name, d), v in PEAK_TFLOPS.items() if name in kind and d == dtype), None)


def benchmark(name: str, net: dict, s: Settings, workdir: str, *, given_peak: float | None = None) -> list[Result]:
  """Every measurement of one network; returns the table rows."""
  folder = os.path.join(workdir, name)
  model = save_diffusers_model(net, folder)
  converted = convert.load_diffusers(folder)
  config = jaxdiff_config(converted, s)
  params = converted.params
  rows = []
  jt = jax_train(config, params, s)
  tt = torch_train(model, s, compile_model=False)
  if s.torch_compile:
    tc = attempt(lambda: torch_train(save_diffusers_model(net, folder), s, compile_model=True))
  else:
    tc = 'n/a (not run: --no-torch-compile)'
  get = lambda r, key: r[key] if isinstance(r, dict) else r
  rows.append(Result(f'train step (batch {s.batch})', 's', jt['seconds'], tt['seconds'], get(tc, 'seconds')))
  rows.append(Result('train images/s', 'img/s', s.batch / jt['seconds'], s.batch / tt['seconds'],
                     s.batch / tc['seconds'] if isinstance(tc, dict) else tc))
  rows.append(Result('train compile (jit / first step)', 's', jt['compile_s'], tt['compile_s'], get(tc, 'compile_s')))
  rows.append(Result('train peak memory', 'MiB', jt['bytes'] / 2 ** 20, tt['bytes'] / 2 ** 20,
                     tc['bytes'] / 2 ** 20 if isinstance(tc, dict) else tc))
  achieved = jt['flops'] / jt['seconds'] / 1e12
  peak = peak_tflops(s.dtype, given_peak)
  rows.append(Result('train TFLOP/s (XLA flop count)' + (f', MFU vs {peak:g}' if peak else ''), 'TFLOP/s',
                     f'{achieved:.3g}' + (f' ({100 * achieved / peak:.1f}% MFU)' if peak else ''), '-'))
  for sampler, steps in (('ddim', s.ddim_steps), ('ancestral', s.ancestral_steps)):
    js = jax_sample(config, params, sampler, steps, s.sample_reps)
    ts = torch_sample(model, sampler, steps, s.sample_batch, s.sample_reps, s.dtype)
    label = f'{"DDIM" if sampler == "ddim" else "ancestral"} {steps} steps (batch {s.sample_batch})'
    rows.append(Result(label, 's', js['seconds'], ts['seconds']))
    rows.append(Result(f'{label} images/s', 'img/s', s.sample_batch / js['seconds'], s.sample_batch / ts['seconds']))
    rows.append(Result(f'{label} compile', 's', js['compile_s'], '-'))
    rows.append(Result(f'{label} peak memory', 'MiB', js['bytes'] / 2 ** 20, ts['bytes'] / 2 ** 20))
  return rows


def cpu_description() -> str:
  """The CPU model and the extensions that decide which kernels XLA and oneDNN pick."""
  model, flags = "unknown CPU", set()
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name") and model == "unknown CPU":
          model = line.split(":", 1)[1].strip()
        elif line.startswith("flags") and not flags:
          flags = set(line.split(":", 1)[1].split())
  except OSError:
    pass
  wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16")
  return f"{model}, {os.cpu_count()} CPUs, {' '.join(f for f in wanted if f in flags) or 'no AVX2'}"


def fmt(value) -> str:
  return f'{value:.4g}' if isinstance(value, float) else str(value)


def table(results: dict[str, list[Result]]) -> str:
  """Markdown: one row per measurement, with jaxdiff / PyTorch eager and jaxdiff / the better of eager and
  torch.compile (for times below 1 means jaxdiff is faster; for images/s above 1)."""
  lines = ['| network | measurement | unit | jaxdiff | PyTorch eager | torch.compile | jaxdiff / eager | jaxdiff / best |',
           '|---|---|---|---|---|---|---|---|']
  for name, rows in results.items():
    for r in rows:
      ratio = lambda other: f'{r.jax / other:.2f}' if isinstance(r.jax, float) and other else '-'
      numbers = [v for v in (r.torch, r.compiled) if isinstance(v, float)]
      best = (max if r.unit == 'img/s' else min)(numbers) if numbers and r.unit in ('s', 'img/s') else None
      eager = r.torch if isinstance(r.torch, float) else None
      lines.append(f'| {name} | {r.name} | {r.unit} | {fmt(r.jax)} | {fmt(r.torch)} | {fmt(r.compiled)} | '
                   f'{ratio(eager)} | {ratio(best)} |')
  return '\n'.join(lines)


def settings(args) -> tuple[Settings, dict]:
  """The run's settings and networks from the command line."""
  nets = {name: dict(NETWORKS[name], **(QUICK[name] if args.quick else {})) for name in args.networks}
  if args.quick:
    s = Settings(batch=args.batch or 8, sample_batch=args.sample_batch or 4, ddim_steps=10, ancestral_steps=25,
                 train_reps=5, sample_reps=3, dtype=args.dtype, torch_compile=args.torch_compile)
  else:
    gpu = is_gpu()
    s = Settings(batch=args.batch or (128 if gpu else 16), sample_batch=args.sample_batch or (256 if gpu else 8),
                 dtype=args.dtype, torch_compile=args.torch_compile)
  return s, nets


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--quick', action='store_true', help='reduced widths, batches and sampler steps (CPU)')
  parser.add_argument('--networks', nargs='+', default=list(NETWORKS), choices=list(NETWORKS))
  parser.add_argument('--batch', type=int, default=0, help='train batch (default: 8 quick, 16 CPU, 128 GPU)')
  parser.add_argument('--sample-batch', type=int, default=0, help='sampling batch (default: 4 quick, 8 CPU, 256 GPU)')
  parser.add_argument('--dtype', choices=('fp32', 'bf16'), default='fp32', help='compute dtype of both frameworks')
  parser.add_argument('--peak-tflops', type=float, default=None, help='device peak for MFU (default: known GPUs)')
  parser.add_argument('--torch-compile', action=argparse.BooleanOptionalAction, default=None,
                      help='also time torch.compile (default: on, off with --quick: inductor takes minutes on CPU)')
  args = parser.parse_args(argv)
  added = xla_flags.add_cpu_defaults()  # what train.py and sample.py run with; before JAX starts a backend
  if args.torch_compile is None:
    args.torch_compile = not args.quick
  s, nets = settings(args)
  import torch  # pylint: disable=import-outside-toplevel
  # XLA flushes denormals on CPU; without this, torch's CPU kernels slow down up to tenfold on denormal values.
  torch.set_flush_denormal(True)
  print(f'jax {jax.__version__} on {jax.devices()[0].device_kind} ({jax.default_backend()}), torch {torch.__version__} '
        f'with {torch.get_num_threads()} threads; CPU: {cpu_description()}; {s}; '
        f'XLA_FLAGS: {os.environ.get("XLA_FLAGS", "")!r} ({added} added)', flush=True)
  results = {}
  with tempfile.TemporaryDirectory() as workdir:
    for name, net in nets.items():
      start = time.perf_counter()
      results[name] = benchmark(name, net, s, workdir, given_peak=args.peak_tflops)
      print(f'{name}: measured in {time.perf_counter() - start:.0f} s', flush=True)
  print(table(results))
  return results


if __name__ == '__main__':
  main()
