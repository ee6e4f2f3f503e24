"""diffusers `UNet2DModel` folders (config.json + diffusion_pytorch_model.safetensors) -> jaxdiff UNet params.

The folder's config.json fixes the whole network, so the jaxdiff model section is derived from it; options that
UNet2DModel has and the jaxdiff UNet does not express (Fourier time embedding, resnet/FIR resampling, no middle
attention, ...) are refused by name.
"""

import json
import os

import ml_collections

from jaxdiff.convert import common
from jaxdiff.errors import CheckpointError
from jaxdiff.models import UNet, param_shapes

RES = {'norm1': 'norm1', 'conv1': 'conv1', 'time_proj': 'time_emb_proj', 'norm2': 'norm2', 'conv2': 'conv2',
       'skip': 'conv_shortcut'}
ATTN = {'norm': ['group_norm'], 'qkv': ['to_q', 'to_k', 'to_v'], 'proj_out': ['to_out.0']}
# Names of diffusers checkpoints saved before its attention refactor; diffusers itself still loads them.
DEPRECATED_ATTN = {'to_q': 'query', 'to_k': 'key', 'to_v': 'value', 'to_out.0': 'proj_attn'}
LEAVES = {'kernel': 'weight', 'scale': 'weight', 'embedding': 'weight', 'bias': 'bias'}
WEIGHTS = ('diffusion_pytorch_model.safetensors', 'diffusion_pytorch_model.bin')
# UNet2DModel options jaxdiff expresses only at these values: key -> allowed values.
SUPPORTED = dict(center_input_sample=(False,), time_embedding_type=('positional',), time_embedding_dim=(None,),
                 mid_block_type=('UNetMidBlock2D',), downsample_type=('conv',), upsample_type=('conv',),
                 act_fn=('silu',), add_attention=(True,), class_embed_type=(None,), attn_norm_num_groups=(None,),
                 # With scale_shift, UNetMidBlock2D's attention drops its GroupNorm; jaxdiff's always has one.
                 resnet_time_scale_shift=('default',))


def read_config(folder: str) -> dict:
  path = os.path.join(folder, 'config.json')
  if not os.path.isfile(path):
    raise CheckpointError(f'{folder} is not a diffusers model folder: it has no config.json.')
  with open(path) as f:
    try:
      return json.load(f)
    except ValueError as e:
      raise CheckpointError(f'{path} is not valid JSON ({e}).') from None


def model_config(cfg: dict) -> tuple[ml_collections.ConfigDict, dict]:
  """The jaxdiff `model` section of a UNet2DModel config.json dict, and its image_size/in_channels/out_channels."""
  if cfg.get('_class_name', 'UNet2DModel') != 'UNet2DModel':
    raise CheckpointError(f'The diffusers model is a {cfg["_class_name"]}; jaxdiff converts UNet2DModel only.')
  for key, allowed in SUPPORTED.items():
    if cfg.get(key, allowed[0]) not in allowed:
      raise CheckpointError(f'UNet2DModel {key}={cfg[key]!r} is not expressed by the jaxdiff UNet (supported: '
                            f'{allowed[0]!r}).')
  channels = list(cfg.get('block_out_channels', (224, 448, 672, 896)))
  down = list(cfg.get('down_block_types', ('DownBlock2D',) + ('AttnDownBlock2D',) * 3))
  up = list(cfg.get('up_block_types', ('AttnUpBlock2D',) * 3 + ('UpBlock2D',)))
  known = {'DownBlock2D', 'AttnDownBlock2D', 'UpBlock2D', 'AttnUpBlock2D'}
  if set(down + up) - known or len(down) != len(channels) or len(up) != len(channels):
    raise CheckpointError(f'UNet2DModel blocks {down} / {up} are not expressed by the jaxdiff UNet: it takes '
                          f'{sorted(known)}, one down and one up block per block_out_channels entry.')
  attn_down = [d.startswith('Attn') for d in down]
  if attn_down != [u.startswith('Attn') for u in reversed(up)]:
    raise CheckpointError(f'UNet2DModel attention in {down} is not mirrored in {up}; the jaxdiff UNet attends at '
                          'the same levels on both paths.')
  if any(c % channels[0] for c in channels):
    raise CheckpointError(f'UNet2DModel block_out_channels={channels} are not multiples of the first.')
  size = cfg.get('sample_size')
  size = size[0] if isinstance(size, (list, tuple)) else size
  if not size:
    raise CheckpointError('UNet2DModel config.json has no sample_size: jaxdiff needs the image size.')
  head_dim = cfg.get('attention_head_dim', 8)
  m = ml_collections.ConfigDict(dict(
      base_channels=channels[0], channel_mult=tuple(c // channels[0] for c in channels),
      num_res_blocks=cfg.get('layers_per_block', 2),
      attention_resolutions=tuple(size // 2 ** level for level, a in enumerate(attn_down) if a),
      num_heads=1, num_head_channels=-1 if head_dim is None else head_dim, legacy_qkv_order=False,
      use_scale_shift_norm=False, resblock_updown=False,
      dropout=float(cfg.get('dropout', 0.0)), norm_groups=cfg.get('norm_num_groups', 32),
      norm_eps=cfg.get('norm_eps', 1e-5), conv_resample=True,
      downsample_padding='symmetric' if cfg.get('downsample_padding', 1) == 1 else 'asymmetric',
      flip_sin_to_cos=cfg.get('flip_sin_to_cos', True), freq_shift=cfg.get('freq_shift', 0),
      mid_block_scale_factor=float(cfg.get('mid_block_scale_factor', 1)),
      class_conditional=cfg.get('num_class_embeds') is not None, num_classes=cfg.get('num_class_embeds') or 0,
      dtype='float32', param_dtype='float32', remat=False))
  if cfg.get('downsample_padding', 1) not in (0, 1):
    raise CheckpointError(f'UNet2DModel downsample_padding={cfg["downsample_padding"]}: jaxdiff supports 0 and 1.')
  return m, dict(image_size=size, in_channels=cfg.get('in_channels', 3), out_channels=cfg.get('out_channels', 3))


def module_prefixes(model: UNet) -> dict[str, str]:
  """jaxdiff module name -> diffusers module prefix."""
  levels = len(model.channel_mult)
  num_res = model.num_res_blocks if isinstance(model.num_res_blocks, tuple) else (model.num_res_blocks,) * levels
  prefixes = {'time_embed/linear_1': 'time_embedding.linear_1', 'time_embed/linear_2': 'time_embedding.linear_2',
              'label_emb': 'class_embedding', 'conv_in': 'conv_in', 'mid_res_0': 'mid_block.resnets.0',
              'mid_attn': 'mid_block.attentions.0', 'mid_res_1': 'mid_block.resnets.1', 'norm_out': 'conv_norm_out',
              'conv_out': 'conv_out'}
  for level in range(levels):
    up = levels - 1 - level
    for i in range(num_res[level]):
      prefixes[f'down_{level}_res_{i}'] = f'down_blocks.{level}.resnets.{i}'
      prefixes[f'down_{level}_attn_{i}'] = f'down_blocks.{level}.attentions.{i}'
    for i in range(num_res[level] + 1):
      prefixes[f'up_{level}_res_{i}'] = f'up_blocks.{up}.resnets.{i}'
      prefixes[f'up_{level}_attn_{i}'] = f'up_blocks.{up}.attentions.{i}'
    prefixes[f'down_{level}_downsample/conv'] = f'down_blocks.{level}.downsamplers.0.conv'
    prefixes[f'up_{level}_upsample/conv'] = f'up_blocks.{up}.upsamplers.0.conv'
  return prefixes


def convert(state_dict: dict, model: UNet, *, image_size: int, in_channels: int, what: str = 'checkpoint'):
  """The jaxdiff params of `model` from a UNet2DModel state dict, every key and shape checked."""
  prefixes = module_prefixes(model)
  deprecated = any(k.endswith('.query.weight') for k in state_dict)

  def sources(path):
    *modules, leaf = path
    name = '/'.join(modules)
    if name in prefixes:
      return [f'{prefixes[name]}.{LEAVES[leaf]}']
    block, sub = '/'.join(modules[:-1]), modules[-1]
    if sub in RES:
      return [f'{prefixes[block]}.{RES[sub]}.{LEAVES[leaf]}']
    names = [DEPRECATED_ATTN.get(n, n) if deprecated else n for n in ATTN[sub]]
    return [f'{prefixes[block]}.{n}.{LEAVES[leaf]}' for n in names]

  shapes = param_shapes(model, image_size, in_channels, model.num_classes)
  return common.fill_params(state_dict, shapes, sources, what=what)


def weights_path(folder: str) -> str:
  for name in WEIGHTS:
    if os.path.isfile(os.path.join(folder, name)):
      return os.path.join(folder, name)
  raise CheckpointError(f'{folder} has no {" or ".join(WEIGHTS)}: save the model with save_pretrained().')
