"""openai/guided-diffusion and openai/improved-diffusion `UNetModel` state dicts -> jaxdiff UNet params.

Both repositories name modules by position: `input_blocks.{k}.{j}`, `middle_block.{j}`, `output_blocks.{k}.{j}`,
`out.{j}`. improved-diffusion is the special case without resblock_updown or num_head_channels whose attention
splits q, k, v heads-first (jaxdiff's legacy_qkv_order=True).
"""

from jaxdiff.convert import common
from jaxdiff.errors import CheckpointError
from jaxdiff.models import UNet, param_shapes

RES = {'norm1': 'in_layers.0', 'conv1': 'in_layers.2', 'time_proj': 'emb_layers.1', 'norm2': 'out_layers.0',
       'conv2': 'out_layers.3', 'skip': 'skip_connection'}
LEAVES = {'kernel': 'weight', 'scale': 'weight', 'embedding': 'weight', 'bias': 'bias'}
# The UNet fields whose guided-diffusion values are fixed by its code rather than by a flag.
LAYOUT = dict(flip_sin_to_cos=True, freq_shift=0, norm_eps=1e-5, norm_groups=32, downsample_padding='symmetric',
              mid_block_scale_factor=1.0)


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


def convert(state_dict: dict, model: UNet, *, image_size: int, in_channels: int, what: str = 'checkpoint'):
  """The jaxdiff params of `model` from a guided-/improved-diffusion state dict, every key and shape checked."""
  check_layout(model)
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
