"""openai/guided-diffusion and openai/improved-diffusion `UNetModel` state dicts -> jaxdiff UNet params, and
guided-diffusion's noisy classifiers (`EncoderUNetModel`) -> jaxdiff EncoderUNet params.

Both repositories name modules by position: `input_blocks.{k}.{j}`, `middle_block.{j}`, `output_blocks.{k}.{j}`,
`out.{j}`. improved-diffusion is the special case without resblock_updown or num_head_channels whose attention
splits q, k, v heads-first (jaxdiff's legacy_qkv_order=True).
"""

import logging

import numpy as np

from jaxdiff.convert import common
from jaxdiff.errors import CheckpointError
from jaxdiff.models import EncoderUNet, UNet, param_shapes

RES = {'norm1': 'in_layers.0', 'conv1': 'in_layers.2', 'time_proj': 'emb_layers.1', 'norm2': 'out_layers.0',
       'conv2': 'out_layers.3', 'skip': 'skip_connection'}
LEAVES = {'kernel': 'weight', 'scale': 'weight', 'embedding': 'weight', 'bias': 'bias',
          'positional_embedding': 'positional_embedding'}
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


# The released classifiers (guided-diffusion's README and script_util.create_classifier), by parameter count: all
# width 128, attention at 32/16/8 with 64 channels per head in the legacy QKV order, scale-shift norm, BigGAN
# down-sampling and the attention pool; the 64x64 one has depth 4, the others 2. Counted from EncoderUNetModel.
CLASSIFIER_RELEASES = {
    65_438_568: ('64x64_classifier.pt', 64, dict(num_res_blocks=4, channel_mult=(1, 2, 3, 4))),
    42_568_040: ('128x128_classifier.pt', 128, dict(num_res_blocks=2, channel_mult=(1, 1, 2, 3, 4))),
    54_096_360: ('256x256_classifier.pt', 256, dict(num_res_blocks=2, channel_mult=(1, 1, 2, 2, 4, 4))),
    54_448_360: ('512x512_classifier.pt', 512, dict(num_res_blocks=2, channel_mult=(0.5, 1, 1, 2, 2, 4, 4))),
}
CLASSIFIER_FLAGS = dict(base_channels=128, attention_resolutions=(32, 16, 8), num_head_channels=64,
                        legacy_qkv_order=True, use_scale_shift_norm=True, resblock_updown=True, pool='attention')
# EncoderUNetModel's `out` Sequential per pool type: jaxdiff module -> torch prefix.
CLASSIFIER_HEADS = {
    'adaptive': {'out_norm': 'out.0', 'out_conv': 'out.3'},
    'attention': {'out_norm': 'out.0', 'pool': 'out.2', 'pool/qkv': 'out.2.qkv_proj', 'pool/c_proj': 'out.2.c_proj'},
    'spatial': {'out_linear_0': 'out.0', 'out_linear_1': 'out.2'},
    'spatial_v2': {'out_linear_0': 'out.0', 'out_norm': 'out.1', 'out_linear_1': 'out.3'},
}
# The jaxdiff module of each head that outputs the logits.
CLASSIFIER_LOGITS = {'adaptive': 'out_conv', 'attention': 'pool/c_proj', 'spatial': 'out_linear_1',
                     'spatial_v2': 'out_linear_1'}


def module_prefixes(model: UNet | EncoderUNet) -> dict[str, str]:
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


def _sources(prefixes: dict[str, str]):
  """`fill_params`' sources: a jaxdiff leaf path -> its torch key."""
  def sources(path):
    *modules, leaf = path
    name = '/'.join(modules)
    if name in prefixes:
      return [f'{prefixes[name]}.{LEAVES[leaf]}']
    block, sub = '/'.join(modules[:-1]), modules[-1]
    # Residual-block sub-layers; attention sub-layers (norm, qkv, proj_out) keep their names.
    return [f'{prefixes[block]}.{RES.get(sub, sub)}.{LEAVES[leaf]}']
  return sources


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
  shapes = param_shapes(model, image_size, in_channels, model.num_classes)
  return common.fill_params(state_dict, shapes, _sources(module_prefixes(model)), what=what)


def _check_classifier(state_dict: dict, model: EncoderUNet, image_size: int, what: str):
  """Refuses a released classifier under a config that differs from the flags it was trained with."""
  count = sum(int(np.prod(np.shape(v))) for v in state_dict.values())
  if count not in CLASSIFIER_RELEASES:
    logging.warning('%s: a state dict cannot tell the attention layout; assuming classifier.num_heads=%r, '
                    'classifier.num_head_channels=%r, classifier.legacy_qkv_order=%r from the config.', what,
                    model.num_heads, model.num_head_channels, model.legacy_qkv_order)
    return
  name, size, flags = CLASSIFIER_RELEASES[count]
  flags = dict(CLASSIFIER_FLAGS, **flags)
  attention_ds = tuple(sorted(size // r for r in flags.pop('attention_resolutions')))
  actual = dict(base_channels=model.base_channels, channel_mult=tuple(model.channel_mult),
                num_res_blocks=model.num_res_blocks, num_head_channels=model.num_head_channels,
                legacy_qkv_order=model.legacy_qkv_order, use_scale_shift_norm=model.use_scale_shift_norm,
                resblock_updown=model.resblock_updown, pool=model.pool)
  wrong = [f'classifier.{k}={actual[k]!r}' for k, v in flags.items() if actual[k] != v]
  if image_size != size:
    wrong.insert(0, f'data.image_size={image_size}')
  elif tuple(sorted(model.attention_ds)) != attention_ds:
    wrong.append('classifier.attention_resolutions')
  if wrong:
    raise CheckpointError(f"{what} is guided-diffusion's {name} ({count:,} parameters), trained at {size}x{size} with "
                          f"{', '.join(f'classifier.{k}={v!r}' for k, v in flags.items())}, attention at 32,16,8; "
                          f"the config has {', '.join(wrong)}: use configs/adm_imagenet{size}.py's classifier section.")


def convert_classifier(state_dict: dict, model: EncoderUNet, *, image_size: int, in_channels: int,
                       what: str = 'checkpoint'):
  """The params of `model` from a guided-diffusion EncoderUNetModel state dict, every key and shape checked."""
  if 'input_blocks.0.0.weight' not in state_dict or 'out.0.weight' not in state_dict:
    raise CheckpointError(f'{what} is not a guided-diffusion EncoderUNetModel state dict: it has no '
                          'input_blocks.0.0.weight or out.0.weight.')
  _check_classifier(state_dict, model, image_size, what)
  state = dict(state_dict)
  # Two tensors whose torch layout the generic rules do not cover: the adaptive head's 1x1 conv is a linear layer
  # here, and the attention pool's positional embedding is stored channels-first.
  if model.pool == 'adaptive' and np.ndim(state.get('out.3.weight')) == 4:
    state['out.3.weight'] = np.asarray(state['out.3.weight'])[:, :, 0, 0]
  if model.pool == 'attention' and np.ndim(state.get('out.2.positional_embedding')) == 2:
    state['out.2.positional_embedding'] = np.asarray(state['out.2.positional_embedding']).T
  sources = _sources(dict(module_prefixes(model), **CLASSIFIER_HEADS[model.pool]))
  return common.fill_params(state, param_shapes(model, image_size, in_channels, None), sources, what=what)
