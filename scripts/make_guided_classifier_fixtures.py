"""Writes tests/fixtures/guided_diffusion/classifier_*: random tiny noisy classifiers and guided trajectories.

  GUIDED_DIFFUSION_PATH=/path/to/guided-diffusion python scripts/make_guided_classifier_fixtures.py

1. `EncoderUNetModel` at several flag sets (each pool type, attention orders and resolutions, head settings,
   scale-shift norm, BigGAN down-sampling), every parameter random (float16 values, stored as float16), and its
   logits on fixed inputs: classifier_nets.safetensors (all state dicts, keys prefixed by the flag set's name),
   classifier_nets.json (the flags) and classifier_nets_io.npz (x NCHW, t, and one logits array per flag set).
2. One guided ancestral and one guided DDIM trajectory (guided-diffusion's p_sample_loop / ddim_sample_loop with
   classifier_sample.py's cond_fn): a random unconditional learned-sigma UNetModel and a random classifier, 1000
   linear steps respaced to 8 (ancestral) and ddim8, scale 3. The noise is jaxdiff's (x_T and every step's noise
   from the same per-sample keys the jaxdiff samplers derive), fed to torch in place of its own draws, so both sides
   sample the same trajectory: classifier_guided.safetensors, classifier_guided.json, classifier_guided_io.npz.
"""

import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from make_guided_diffusion_fixtures import FIXTURES, randomize  # noqa: E402

BASE = dict(image_size=16, in_channels=3, model_channels=32, out_channels=10, dropout=0.0, channel_mult=(1, 1))
NETS = {
    'attention_new': dict(BASE, num_res_blocks=1, attention_resolutions=(1, 2), num_head_channels=16,
                          use_new_attention_order=True, use_scale_shift_norm=True, resblock_updown=True,
                          pool='attention'),
    'attention_legacy': dict(BASE, num_res_blocks=2, attention_resolutions=(2,), num_head_channels=32,
                             use_new_attention_order=False, use_scale_shift_norm=True, resblock_updown=True,
                             pool='attention'),
    'adaptive': dict(BASE, num_res_blocks=1, attention_resolutions=(2,), num_heads=2, use_new_attention_order=False,
                     use_scale_shift_norm=False, resblock_updown=False, pool='adaptive'),
    # One level: the spatial heads' 2048-wide first layer grows with every activation they average.
    'spatial': dict(BASE, channel_mult=(1,), num_res_blocks=1, attention_resolutions=(), use_scale_shift_norm=True,
                    resblock_updown=False, pool='spatial'),
    'spatial_v2': dict(BASE, channel_mult=(1,), num_res_blocks=1, attention_resolutions=(1,), num_head_channels=16,
                       use_scale_shift_norm=False, resblock_updown=True, pool='spatial_v2'),
}
GUIDED_UNET = dict(image_size=16, in_channels=3, model_channels=32, out_channels=6, num_res_blocks=1,
                   attention_resolutions=(2,), dropout=0.0, channel_mult=(1, 1), num_classes=None,
                   num_head_channels=16, use_scale_shift_norm=True, resblock_updown=True)
GUIDED_CLASSIFIER = NETS['attention_new']
GUIDED = dict(steps=1000, noise_schedule='linear', learn_sigma=True, classifier_scale=3.0, seed=7,
              ancestral_respacing='8', ddim_respacing='ddim8', batch=4)


def import_guided_diffusion(path):
  sys.path.insert(0, path)
  try:
    from guided_diffusion import script_util, unet  # pylint: disable=import-outside-toplevel
  finally:
    sys.path.remove(path)
  return script_util, unet


def jax_noise(seed, batch, shape, num_steps):
  """(x_T, [noise of step i for i in 0..N-1]) as jaxdiff's samplers draw them for sample indices 0..batch-1, NCHW."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from jaxdiff.diffusion import samplers  # pylint: disable=import-outside-toplevel
  from jaxdiff.sampling import sample_keys  # pylint: disable=import-outside-toplevel
  init_keys, step_keys = samplers.split_keys(sample_keys(seed, jnp.arange(batch)))
  nchw = lambda a: torch.from_numpy(np.asarray(a).transpose(0, 3, 1, 2).copy())
  x_T = nchw(samplers.per_sample_normal(init_keys, shape))
  steps = [nchw(samplers.step_noise(step_keys, jnp.int32(i), shape)) for i in range(num_steps)]
  return x_T, steps


def guided_trajectories(script_util, unet_mod):
  """Final samples of guided ancestral and DDIM sampling, with jaxdiff's noise."""
  unet = randomize(unet_mod.UNetModel(**GUIDED_UNET).eval(), seed=10)
  classifier = randomize(unet_mod.EncoderUNetModel(**GUIDED_CLASSIFIER).eval(), seed=11)
  g = GUIDED
  labels = torch.tensor([0, 3, 7, 9])

  def cond_fn(x, t, y=None):  # guided-diffusion's scripts/classifier_sample.py
    with torch.enable_grad():
      x_in = x.detach().requires_grad_(True)
      log_probs = torch.nn.functional.log_softmax(classifier(x_in, t), dim=-1)
      selected = log_probs[range(len(log_probs)), y.view(-1)]
      return torch.autograd.grad(selected.sum(), x_in)[0] * g['classifier_scale']

  def model_fn(x, t, y=None):
    del y  # unconditional diffusion model: the classifier alone steers
    return unet(x, t)

  outputs = {}
  for name, respacing in (('ancestral', g['ancestral_respacing']), ('ddim', g['ddim_respacing'])):
    diffusion = script_util.create_gaussian_diffusion(steps=g['steps'], learn_sigma=g['learn_sigma'],
                                                      noise_schedule=g['noise_schedule'],
                                                      timestep_respacing=respacing)
    x_T, step_noise = jax_noise(g['seed'], g['batch'], (16, 16, 3), diffusion.num_timesteps)
    pending = list(reversed(step_noise))  # the loop runs i = N-1, ..., 0
    original = torch.randn_like
    torch.randn_like = lambda x, **kw: pending.pop(0)
    try:
      loop = diffusion.p_sample_loop if name == 'ancestral' else diffusion.ddim_sample_loop
      with torch.no_grad():
        outputs[name] = loop(model_fn, (g['batch'], 3, 16, 16), noise=x_T, clip_denoised=True, cond_fn=cond_fn,
                             device='cpu', model_kwargs={'y': labels}).numpy()
    finally:
      torch.randn_like = original
  return unet, classifier, labels, outputs


def main():
  from safetensors.torch import save_file  # pylint: disable=import-outside-toplevel
  script_util, unet_mod = import_guided_diffusion(os.environ['GUIDED_DIFFUSION_PATH'])
  gen = torch.Generator().manual_seed(3)
  x = torch.randn(3, 3, 16, 16, generator=gen)
  t = torch.tensor([0, 517, 999])
  states, logits = {}, {}
  for i, (name, flags) in enumerate(NETS.items()):
    net = randomize(unet_mod.EncoderUNetModel(**flags).eval(), seed=20 + i)
    with torch.no_grad():
      logits[name] = net(x, t).numpy()
    states.update({f'{name}/{k}': v.half() for k, v in net.state_dict().items()})
  os.makedirs(FIXTURES, exist_ok=True)
  save_file(states, os.path.join(FIXTURES, 'classifier_nets.safetensors'))
  with open(os.path.join(FIXTURES, 'classifier_nets.json'), 'w') as f:
    json.dump(NETS, f, indent=2)
  np.savez(os.path.join(FIXTURES, 'classifier_nets_io.npz'), x=x.numpy(), t=t.numpy(), **logits)

  unet, classifier, labels, samples = guided_trajectories(script_util, unet_mod)
  save_file({**{f'unet/{k}': v.half() for k, v in unet.state_dict().items()},
             **{f'classifier/{k}': v.half() for k, v in classifier.state_dict().items()}},
            os.path.join(FIXTURES, 'classifier_guided.safetensors'))
  with open(os.path.join(FIXTURES, 'classifier_guided.json'), 'w') as f:
    json.dump(dict(unet=GUIDED_UNET, classifier=GUIDED_CLASSIFIER, sampling=GUIDED), f, indent=2)
  np.savez(os.path.join(FIXTURES, 'classifier_guided_io.npz'), labels=labels.numpy(), **samples)
  print(f'wrote {FIXTURES}')


if __name__ == '__main__':
  main()
