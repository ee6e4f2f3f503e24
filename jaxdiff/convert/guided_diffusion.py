"""openai/guided-diffusion and openai/improved-diffusion `UNetModel` state dicts -> jaxdiff UNet params.

Both repositories name modules by position: `input_blocks.{k}.{j}`, `middle_block.{j}`, `output_blocks.{k}.{j}`,
`out.{j}`. improved-diffusion is the special case without resblock_updown or num_head_channels whose attention
splits q, k, v heads-first (jaxdiff's legacy_qkv_order=True).
"""

import logging

import numpy as np

from jaxdiff.convert import common
from jaxdiff.errors import CheckpointError
from jaxdiff.models import UNet, param_shapes

RES = {'norm1': 'in_layers.0', 'conv1': 'in_layers.2', 'time_proj': 'emb_layers.1', 'norm2': 'out_layers.0',
       'conv2': 'out_layers.3', 'skip': 'skip_connection'}
LEAVES = {'kernel': 'weight', 'scale': 'weight', 'embedding': 'weight', 'bias': 'bias'}
# The UNet fields whose guided-diffusion values are fixed by its code rather than by a flag.
LAYOUT = dict(flip_sin_to_cos=True, freq_shift=0, norm_eps=1e-5, norm_groups=32, downsample_padding='symmetric',
              mid_block_scale_factor=1.0, patch_size=1)
# Flags a state dict cannot tell: the qkv weight has the same shape for any head split and either order.
# (guided-diffusion's --num_heads, --num_head_channels, and --use_new_attention_order = not legacy_qkv_order.)
ATTENTION_FIELDS = ('num_heads', 'num_head_channels', 'legacy_qkv_order')
# The released checkpoints, known by their parameter count, and their attention flags (guided-diffusion's README).
RELEASES = {
    295_904_454: ('64x64_diffusion.pt', dict(num_head_channels=64, legacy_qkv_order=False)),
    421_529_606: ('128x128_diffusion.pt', dict(num_heads=4, num_head_channels=-1, legacy_qkv_order=True)),
    553_838_086: ('256x256_diffusion.pt', dict(num_head_channels=64, legacy_qkv_order=True)),
    552_814_086: ('256x256_diffusion_uncond.pt or an LSUN model', dict(num_head_channels=64, legacy_qkv_order=True)),
}


def module_prefixes(model: UNet) -> dict[str, str]:
  """jaxdiff module name -> torch module prefix, following UNetModel's construction order."""
  levels = len(model.channel_mult)
  num_res = model.num_res_blocks if isinstance(model.num_res_blocks, tuple) else (model.num_res_blocks,) * levels
  prefixes = {'time_embed/linear_1': 'time_embed.0', 'time_embed/linear_2': 'time_embed.2', 'label_emb': 'label_emb',
              'conv_in': 'input_blocks.0.0', 'mid_res_0': 'middle_block.0', 'mid_attn': 'middle_block.1',
              'mid_res_1': 'middle_block.2', 'norm_out': 'out.0', 'conv_out': 'out.2'}
  # A resampling ResBlock maps through RES below; a plain Downsample/Upsample holds one conv.
  k = 1
  for level in range(levels):
    for i in range(num_res[level]):
      prefixes[f'down_{level}_res_{i}'] = f'input_blocks.{k}.0'
      prefixes[f'down_{level}_attn_{i}'] = f'input_blocks.{k}.1'
      k += 1
    if level != levels - 1:
      prefixes[f'down_{level}_downsample'] = f'input_blocks.{k}.0'
      prefixes[f'down_{level}_downsample/conv'] = f'input_blocks.{k}.0.op'
      k += 1
  k = 0
  for level in reversed(range(levels)):
    attention = 2 ** level in model.attention_ds
    for i in range(num_res[level] + 1):
      prefixes[f'up_{level}_res_{i}'] = f'output_blocks.{k}.0'
      prefixes[f'up_{level}_attn_{i}'] = f'output_blocks.{k}.1'
      if level and i == num_res[level]:
        prefixes[f'up_{level}_upsample'] = f'output_blocks.{k}.{1 + attention}'
        prefixes[f'up_{level}_upsample/conv'] = f'output_blocks.{k}.{1 + attention}.conv'
      k += 1
  return prefixes


def check_layout(model: UNet):
  wrong = [f'model.{k}={getattr(model, k)!r}' for k, v in LAYOUT.items() if getattr(model, k) != v]
  if wrong:
    raise CheckpointError(f'guided-diffusion checkpoints need {", ".join(f"model.{k}={v!r}" for k, v in LAYOUT.items())}'
                          f'; the config has {", ".join(wrong)}: start from configs/adm_imagenet64.py.')


def check_attention(state_dict: dict, model: UNet, what: str):
  """Refuses a released checkpoint under other attention flags than it was trained with; for any other file, warns
  which values are assumed (wrong ones load without error but sample wrong images)."""
  count = sum(int(np.prod(np.shape(v))) for v in state_dict.values())
  if count in RELEASES:
    name, flags = RELEASES[count]
    if flags.get('num_head_channels', -1) != -1:
      flags = {k: v for k, v in flags.items() if k != 'num_heads'}  # heads follow from the channels per head
    wrong = [f'model.{k}={getattr(model, k)!r}' for k, v in flags.items() if getattr(model, k) != v]
    if wrong:
      raise CheckpointError(f'{what} is guided-diffusion\'s {name} ({count:,} parameters), trained with '
                            f'{", ".join(f"model.{k}={v!r}" for k, v in flags.items())}; the config has '
                            f'{", ".join(wrong)}: set those keys.')
    return
  logging.warning('%s: a state dict cannot tell the attention layout; assuming %s from the config. Wrong values load '
                  'but sample wrong images: check them against the checkpoint\'s --num_heads, --num_head_channels '
                  'and --use_new_attention_order (= not legacy_qkv_order).', what,
                  ', '.join(f'model.{k}={getattr(model, k)!r}' for k in ATTENTION_FIELDS))


def convert(state_dict: dict, model: UNet, *, image_size: int, in_channels: int, what: str = 'checkpoint'):
  """The jaxdiff params of `model` from a guided-/improved-diffusion state dict, every key and shape checked."""
  check_layout(model)
  check_attention(state_dict, model, what)
  prefixes = module_prefixes(model)

  def sources(path):
    *modules, leaf = path
    name = '/'.join(modules)
    if name in prefixes:
      return [f'{prefixes[name]}.{LEAVES[leaf]}']
    block, sub = '/'.join(modules[:-1]), modules[-1]
    # Residual-block sub-layers; attention sub-layers (norm, qkv, proj_out) keep their names.
    return [f'{prefixes[block]}.{RES.get(sub, sub)}.{LEAVES[leaf]}']

  shapes = param_shapes(model, image_size, in_channels, model.num_classes)
  return common.fill_params(state_dict, shapes, sources, what=what)
