"""Stable Diffusion 1.x/2.x and SDXL UNets (and LDM's cross-attending ones) from PyTorch -> a `config.model` section
and params.

  section, shape = folder_section('sd15/unet')            # diffusers UNet2DConditionModel: config.json fixes it
  section, shape, params = load_diffusers('sd15/unet')
  section, shape = section_from_ldm_state_dict(state)      # a CompVis/Stability checkpoint: read from its shapes
  params = load_unet('v1-5-pruned-emaonly.safetensors', config.model, image_size=64)

`shape` is dict(image_size, in_channels, out_channels) of the UNet's input grid (latents), and for an SDXL UNet (a
vector condition: model.adm_in_channels > 0) also micro_embed_dim, the width of each micro-conditioning sinusoid
(latent.micro_embed_dim; diffusers' addition_time_embed_dim). Sections hold the keys that fix the network, not dtype,
remat or dropout (a run's choices).

SDXL's vector condition is embedded by diffusers' add_embedding.linear_1/2 (addition_embed_type='text_time'), SGM's
label_emb.0.0/label_emb.0.2: both become the UNet's vector_emb/linear_1/2.

diffusers' UNet2DConditionModel names its head COUNT `attention_head_dim` (a naming slip it keeps for the configs
already published, diffusers issue 2011): SD 1.x's 8 is 8 heads per level (of 40, 80, 160 channels), SD 2.x's
[5, 10, 20, 20] heads of 64 channels. `num_attention_heads`, when a config sets it, takes precedence, as in diffusers.

A single file's UNet (`model.diffusion_model.*`: input_blocks, middle_block, output_blocks, time_embed, out) is
LDM's openaimodel layout, guided-diffusion's with SpatialTransformers, whose insides carry the same names as
diffusers' (transformer_blocks.{j}.attn1.to_q, ff.net.0.proj, ...). Channels, levels, blocks, attention levels,
transformer depths (per level: SDXL's differ), context width, projection type, vector width, classes and channels
are read from tensor shapes. What no tensor tells, and the rule used (pass a model section, or image_size, where it
does not hold):
  heads:      1x1-conv projections (SD 1.x, LDM's text/class models) -> 8 heads per level;
              linear projections (SD 2.x; SDXL) -> 64 channels per head.
  image_size: a vector condition (SDXL base and refiner) -> 128 latents (1024px); context width 1024 (OpenCLIP ViT-H:
              SD 2.x) -> 96 latents (the 768px v-models); else 64 (512px).
  micro_embed_dim (with a vector condition): 256, both SDXL releases' (SGM's ConcatTimestepEmbedderND outdim).
"""

import dataclasses
import logging
import os

import ml_collections

from jaxdiff.convert import autoencoder, common, diffusers, guided_diffusion
from jaxdiff.errors import CheckpointError
from jaxdiff.models import UNet, create_model, param_shapes

LDM_PREFIX = 'model.diffusion_model.'
# Inside a spatial transformer: jaxdiff module path -> torch module (the same in diffusers and LDM).
TRANSFORMER = {'norm': 'norm', 'proj_in': 'proj_in', 'proj_out': 'proj_out'}
BLOCK = {'norm1': 'norm1', 'norm2': 'norm2', 'norm3': 'norm3', 'ff/proj_in': 'ff.net.0.proj', 'ff/proj_out': 'ff.net.2',
         **{f'{attn}/{ours}': f'{attn}.{theirs}' for attn in ('attn1', 'attn2')
            for ours, theirs in (('q', 'to_q'), ('k', 'to_k'), ('v', 'to_v'), ('out', 'to_out.0'))}}
NAMINGS = {'diffusers': (diffusers.module_prefixes, diffusers.RES),
           'ldm': (guided_diffusion.module_prefixes, guided_diffusion.RES)}
# The vector condition's MLP (SDXL): jaxdiff module -> torch module, per naming.
VECTOR_PREFIXES = {'diffusers': {'vector_emb/linear_1': 'add_embedding.linear_1',
                                 'vector_emb/linear_2': 'add_embedding.linear_2'},
                   'ldm': {'vector_emb/linear_1': 'label_emb.0.0', 'vector_emb/linear_2': 'label_emb.0.2'}}
SDXL_MICRO_EMBED_DIM = 256  # what no SGM tensor tells: both SDXL releases' micro-conditioning sinusoid width
# UNet2DConditionModel options the jaxdiff UNet expresses only at these values: key -> allowed values, default first.
# (upcast_attention is accepted: jaxdiff's attention logits are float32 whatever the compute dtype.)
SUPPORTED = dict(
    center_input_sample=(False,), time_embedding_type=('positional',), time_embedding_dim=(None,),
    time_embedding_act_fn=(None,), timestep_post_act=(None,), time_cond_proj_dim=(None,), act_fn=('silu',),
    class_embed_type=(None,), addition_embed_type=(None, 'text_time'), class_embeddings_concat=(False,),
    encoder_hid_dim=(None,), encoder_hid_dim_type=(None,), dual_cross_attention=(False,),
    mid_block_type=('UNetMidBlock2DCrossAttn',),
    mid_block_only_cross_attention=(None, False), resnet_time_scale_shift=('default',), resnet_skip_time_act=(False,),
    resnet_out_scale_factor=(1.0,), conv_in_kernel=(3,), conv_out_kernel=(3,), attention_type=('default',),
    cross_attention_norm=(None,), reverse_transformer_layers_per_block=(None,))
DOWN_BLOCKS = {'DownBlock2D': False, 'CrossAttnDownBlock2D': True}  # -> attends
UP_BLOCKS = {'UpBlock2D': False, 'CrossAttnUpBlock2D': True}
# What LDM's openaimodel fixes in code: GroupNorm32(32) with eps 1e-5, [cos, sin] embedding, padded stride-2 convs.
LDM_LAYOUT = dict(norm_groups=32, norm_eps=1e-5, flip_sin_to_cos=True, freq_shift=0, downsample_padding='symmetric',
                  mid_block_scale_factor=1.0, conv_resample=True, resblock_updown=False, legacy_qkv_order=False,
                  patch_size=1)
LDM_HEADS = {False: dict(num_heads=8, num_head_channels=-1), True: dict(num_heads=1, num_head_channels=64)}
# What no LDM tensor tells: taken from a given model section (else the rule above and LDM's 32 groups).
LDM_UNTOLD = ('num_heads', 'num_head_channels', 'norm_groups')
# A run's choices, not the network's: added to a bare section to build the model.
RUN_KEYS = dict(dropout=0.0, dtype='float32', param_dtype='float32', remat=False)
# UNet fields that change nothing a checkpoint holds or that a state dict cannot tell (compared separately).
_FREE_FIELDS = ('parent', 'name', 'dtype', 'param_dtype', 'remat', 'dropout', 'num_heads', 'num_head_channels',
                'transformer_depth', 'num_res_blocks', 'legacy_qkv_order')


def _per_level(value, levels: int, key: str, what: str) -> tuple:
  if isinstance(value, (list, tuple)):
    if len(value) != levels or any(isinstance(v, (list, tuple)) for v in value):
      raise CheckpointError(f'UNet2DConditionModel {key}={value} in {what} is not one value per level ({levels}); '
                            'per-block lists are not expressed by the jaxdiff UNet.')
    return tuple(value)
  return (value,) * levels


def model_section(cfg: dict, what: str = 'config.json') -> tuple[ml_collections.ConfigDict, dict]:
  """The `model` keys of a UNet2DConditionModel config.json dict, and its image_size/in_channels/out_channels (and
  micro_embed_dim with a text_time addition embedding: SDXL)."""
  if cfg.get('_class_name', 'UNet2DConditionModel') != 'UNet2DConditionModel':
    raise CheckpointError(f'{what} holds a diffusers {cfg["_class_name"]}; this converter reads UNet2DConditionModel '
                          '(a UNet2DModel is read by jaxdiff.convert.load_diffusers).')
  for key, allowed in SUPPORTED.items():
    if cfg.get(key, allowed[0]) not in allowed:
      raise CheckpointError(f'UNet2DConditionModel {key}={cfg[key]!r} in {what} is not expressed by the jaxdiff UNet '
                            f'(supported: {allowed[0]!r}).')
  widths = list(cfg.get('block_out_channels', (320, 640, 1280, 1280)))
  levels = len(widths)
  down = list(cfg.get('down_block_types', ('CrossAttnDownBlock2D',) * 3 + ('DownBlock2D',)))
  up = list(cfg.get('up_block_types', ('UpBlock2D',) + ('CrossAttnUpBlock2D',) * 3))
  if (len(down) != levels or len(up) != levels or not set(down) <= set(DOWN_BLOCKS) or not set(up) <= set(UP_BLOCKS)):
    raise CheckpointError(f'UNet2DConditionModel down_block_types={down} / up_block_types={up} in {what} are not '
                          f'expressed by the jaxdiff UNet: it takes one of {sorted(DOWN_BLOCKS)} and one of '
                          f'{sorted(UP_BLOCKS)} per level.')
  attends = [DOWN_BLOCKS[d] for d in down]
  if attends != [UP_BLOCKS[u] for u in reversed(up)]:
    raise CheckpointError(f'UNet2DConditionModel attention in {down} is not mirrored in {up} ({what}); the jaxdiff '
                          'UNet attends at the same levels on both paths.')
  if any(w % widths[0] for w in widths):
    raise CheckpointError(f'UNet2DConditionModel block_out_channels={widths} in {what} are not multiples of the first.')
  if cfg.get('norm_num_groups', 32) is None:
    raise CheckpointError(f'UNet2DConditionModel norm_num_groups=None in {what} (no GroupNorms) is not expressed by '
                          'the jaxdiff UNet.')
  only_cross = cfg.get('only_cross_attention', False)
  if any(_per_level(only_cross, levels, 'only_cross_attention', what)):
    raise CheckpointError(f'UNet2DConditionModel only_cross_attention={only_cross} in {what} is not expressed by the '
                          'jaxdiff UNet (its first attention always attends to the image itself).')
  context = set(_per_level(cfg.get('cross_attention_dim', 1280), levels, 'cross_attention_dim', what))
  if len(context) > 1:
    raise CheckpointError(f'UNet2DConditionModel cross_attention_dim={cfg["cross_attention_dim"]} in {what}: the '
                          'jaxdiff UNet cross-attends to one context width at every level.')
  padding = cfg.get('downsample_padding', 1)
  if padding not in (0, 1):
    raise CheckpointError(f'UNet2DConditionModel downsample_padding={padding} in {what}: jaxdiff supports 0 and 1.')
  size = cfg.get('sample_size')
  size = size[0] if isinstance(size, (list, tuple)) else size
  if not size:
    raise CheckpointError(f'UNet2DConditionModel config.json in {what} has no sample_size: jaxdiff needs the latent '
                          'size.')
  heads = _per_level(cfg.get('num_attention_heads') or cfg.get('attention_head_dim', 8), levels, 'attention_head_dim',
                     what)
  depths = _per_level(cfg.get('transformer_layers_per_block', 1), levels, 'transformer_layers_per_block', what)
  num_res = _per_level(cfg.get('layers_per_block', 2), levels, 'layers_per_block', what)
  classes = cfg.get('num_class_embeds')
  adm, micro = _addition_embedding(cfg, what)
  section = dict(
      base_channels=widths[0], channel_mult=tuple(w // widths[0] for w in widths),
      num_res_blocks=num_res[0] if len(set(num_res)) == 1 else num_res,
      attention_resolutions=tuple(size // 2 ** level for level in range(levels) if attends[level]),
      transformer_depth=_depth_field(depths, attends), context_dim=context.pop() or 0,
      use_linear_projection=bool(cfg.get('use_linear_projection', False)), adm_in_channels=adm,
      **_heads_section(heads, widths, attends), legacy_qkv_order=False, use_scale_shift_norm=False,
      resblock_updown=False, norm_groups=cfg.get('norm_num_groups', 32), norm_eps=float(cfg.get('norm_eps', 1e-5)),
      conv_resample=True, downsample_padding='symmetric' if padding == 1 else 'asymmetric',
      flip_sin_to_cos=bool(cfg.get('flip_sin_to_cos', True)), freq_shift=cfg.get('freq_shift', 0),
      mid_block_scale_factor=float(cfg.get('mid_block_scale_factor', 1)), patch_size=1,
      class_conditional=classes is not None, num_classes=classes or 0)
  shape = dict(image_size=size, in_channels=cfg.get('in_channels', 4), out_channels=cfg.get('out_channels', 4))
  return ml_collections.ConfigDict(section), dict(shape, micro_embed_dim=micro) if adm else shape


def _addition_embedding(cfg: dict, what: str) -> tuple[int, int]:
  """(adm_in_channels, micro_embed_dim) of diffusers' text_time addition embedding (SDXL), or (0, 0) without one."""
  if cfg.get('addition_embed_type') != 'text_time':
    return 0, 0
  adm, micro = cfg.get('projection_class_embeddings_input_dim'), cfg.get('addition_time_embed_dim')
  for key, value in (('projection_class_embeddings_input_dim', adm), ('addition_time_embed_dim', micro)):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise CheckpointError(f"UNet2DConditionModel addition_embed_type='text_time' in {what} needs a positive {key}, "
                            f'not {value!r}: the config.json is incomplete.')
  return adm, micro


def _depth_field(depths, attends) -> int | tuple:
  """transformer_depth of per-level depths: 0 where a level does not attend (except the last, whose depth the
  middle block takes), and one int where the remaining depths agree (SD 1.x/2.x, the SDXL refiner)."""
  last = len(depths) - 1
  depths = tuple(d if attends[level] or level == last else 0 for level, d in enumerate(depths))
  used = {d for d in depths if d}
  return used.pop() if len(used) == 1 else depths


def _heads_section(heads: tuple, widths: list, attends: list) -> dict:
  """num_heads/num_head_channels of diffusers' per-level head counts: one count, or one head size (SD 2.x's 64)
  where the counts differ, or else one count per level. The middle block takes the last level's."""
  used = [level for level in range(len(widths)) if attends[level]] + [len(widths) - 1]
  if len({heads[level] for level in used}) == 1:
    return dict(num_heads=heads[used[0]], num_head_channels=-1)
  sizes = {widths[level] / heads[level] for level in used}
  if len(sizes) == 1 and float(sizes.pop()).is_integer():
    return dict(num_heads=1, num_head_channels=widths[used[0]] // heads[used[0]])
  return dict(num_heads=tuple(heads), num_head_channels=-1)


def folder_section(folder: str) -> tuple[ml_collections.ConfigDict, dict]:
  """(the model keys, dict(image_size, in_channels, out_channels[, micro_embed_dim])) of a UNet2DConditionModel
  folder."""
  return model_section(diffusers.read_config(folder), folder)


def _prefix(state: dict) -> str:
  return LDM_PREFIX if any(k.startswith(LDM_PREFIX) for k in state) else ''


def unet_state(state: dict, what: str = 'checkpoint') -> dict:
  """The UNet's tensors of an LDM/SD checkpoint (model.diffusion_model.*, the raw weights: a full checkpoint's EMA
  copy under model_ema.* is not read), or a bare UNet state dict, without the prefix."""
  prefix = _prefix(state)
  state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
  if 'input_blocks.0.0.weight' not in state or 'out.2.weight' not in state:
    raise CheckpointError(f'{what} holds no LDM/SD UNet: it has no {LDM_PREFIX}input_blocks.0.0.weight or '
                          f'{LDM_PREFIX}out.2.weight (a diffusers unet/ folder is read by folder_section).')
  return state


def _count(state: dict, prefix: str) -> int:
  """How many transformer blocks the spatial transformer at `prefix` holds (0: none there)."""
  return next(j for j in range(10_000) if f'{prefix}.transformer_blocks.{j}.norm1.weight' not in state)


def section_from_ldm_state_dict(state_dict: dict, *, image_size: int | None = None,
                                what: str = 'checkpoint') -> tuple[ml_collections.ConfigDict, dict]:
  """(the model keys, dict(image_size, in_channels, out_channels[, micro_embed_dim])) of an LDM/SD/SGM checkpoint's
  UNet, read from its tensor shapes; heads, micro_embed_dim and (without `image_size`) the latent size by the rules
  of the module docstring."""
  state = unet_state(state_dict, what)
  vector = state.get('label_emb.0.0.weight')  # SGM's vector condition (SDXL), Linear(adm_in_channels, 4 x base)
  if vector is not None and 'label_emb.0.2.weight' not in state:
    raise CheckpointError(f'{what} has label_emb.0.0 but no label_emb.0.2: not SGM\'s vector-condition MLP (Linear, '
                          'SiLU, Linear), which the jaxdiff UNet expresses.')
  levels, k = [[]], 1  # the input_blocks index of each level's ResBlocks
  while True:
    if f'input_blocks.{k}.0.in_layers.0.weight' in state:
      levels[-1].append(k)
    elif f'input_blocks.{k}.0.op.weight' in state:
      levels.append([])
    else:
      break
    k += 1
  if not all(levels):
    raise CheckpointError(f'{what}: input_blocks do not follow the LDM UNet layout (a level without ResBlocks).')
  base = int(state['input_blocks.0.0.weight'].shape[0])
  widths = [int(state[f'input_blocks.{blocks[0]}.0.out_layers.3.weight'].shape[0]) for blocks in levels]
  if any(w % base for w in widths):
    raise CheckpointError(f'{what}: level widths {widths} are not multiples of conv_in\'s {base} channels.')
  if any(f'{block}.qkv.weight' in state for block in ['middle_block.1'] + [f'input_blocks.{b[0]}.1' for b in levels]):
    raise CheckpointError(f'{what} attends with ADM attention blocks, not spatial transformers: it is a '
                          'guided-diffusion-style UNet (jaxdiff.convert.load_guided_diffusion).')
  depths = [_count(state, f'input_blocks.{blocks[0]}.1') for blocks in levels]
  mid_depth = _count(state, 'middle_block.1')
  if not mid_depth:
    raise CheckpointError(f'{what} has no spatial transformer in its middle block (middle_block.1); the jaxdiff UNet '
                          'always has one.')
  if depths[-1] and depths[-1] != mid_depth:
    raise CheckpointError(f'{what}: the last level\'s transformers have {depths[-1]} blocks and the middle one '
                          f'{mid_depth}; the jaxdiff UNet gives the middle block the last level\'s depth.')
  attends = [d > 0 for d in depths]
  depths[-1] = mid_depth  # the middle block takes the last level's depth
  transformer = next((f'input_blocks.{blocks[0]}.1' for blocks, a in zip(levels, attends) if a), 'middle_block.1')
  proj_in = state[f'{transformer}.proj_in.weight']
  linear = proj_in.ndim == 2
  cross = state.get(f'{transformer}.transformer_blocks.0.attn2.to_k.weight')
  context_dim = 0 if cross is None else int(cross.shape[1])
  if image_size is None:
    image_size = 128 if vector is not None else 96 if context_dim == 1024 else 64
  emb = state[f'input_blocks.{levels[0][0]}.0.emb_layers.1.weight']
  num_res = [len(blocks) for blocks in levels]
  labels = state.get('label_emb.weight')
  section = dict(
      base_channels=base, channel_mult=tuple(w // base for w in widths),
      num_res_blocks=num_res[0] if len(set(num_res)) == 1 else tuple(num_res),
      attention_resolutions=tuple(image_size // 2 ** level for level in range(len(levels)) if attends[level]),
      transformer_depth=_depth_field(depths, attends), context_dim=context_dim,
      adm_in_channels=0 if vector is None else int(vector.shape[1]), use_linear_projection=bool(linear),
      **LDM_HEADS[linear], use_scale_shift_norm=emb.shape[0] == 2 * widths[0],
      **LDM_LAYOUT, class_conditional=labels is not None, num_classes=0 if labels is None else int(labels.shape[0]))
  shape = dict(image_size=image_size, in_channels=int(state['input_blocks.0.0.weight'].shape[1]),
               out_channels=int(state['out.2.weight'].shape[0]))
  if vector is not None:
    shape['micro_embed_dim'] = SDXL_MICRO_EMBED_DIM
  return ml_collections.ConfigDict(section), shape


def build(section, shape: dict, run_cfg=None) -> UNet:
  """The UNet of a converter's section; dtypes, remat and dropout from `run_cfg` (a config.model) or float32."""
  # New ConfigDicts, not update(): a typed section refuses a per-level tuple where it holds an int.
  run = {} if run_cfg is None else {k: run_cfg[k] for k in RUN_KEYS if k in run_cfg}
  cfg = ml_collections.ConfigDict({**RUN_KEYS, **(section.to_dict() if hasattr(section, 'to_dict') else section),
                                   **run})
  return create_model(cfg, image_size=shape['image_size'], in_channels=shape['in_channels'],
                      out_channels=shape['out_channels'], num_classes=cfg.num_classes or None)


def torch_keys(prefixes: dict[str, str], res: dict[str, str], root: str = ''):
  """`fill_params`' sources: a jaxdiff leaf path -> its torch key (under `root`), for ResBlocks named by `res`."""
  def sources(path):
    *modules, leaf = path
    leaf = diffusers.LEAVES[leaf]
    if '/'.join(modules) in prefixes:
      return [f'{root}{prefixes["/".join(modules)]}.{leaf}']
    block, rest = root + prefixes[modules[0]], modules[1:]
    if rest[0] in res:
      return [f'{block}.{res[rest[0]]}.{leaf}']
    if rest[0].startswith('block_'):
      return [f'{block}.transformer_blocks.{rest[0][len("block_"):]}.{BLOCK["/".join(rest[1:])]}.{leaf}']
    return [f'{block}.{TRANSFORMER[rest[0]]}.{leaf}']
  return sources


def sources(model: UNet, naming: str, root: str = ''):
  """`fill_params`' sources of `model`'s params in a state dict in `naming` ('diffusers' or 'ldm'), under `root`."""
  prefixes, res = NAMINGS[naming]
  return torch_keys({**prefixes(model), **VECTOR_PREFIXES[naming]}, res, root)


def convert(state: dict, model: UNet, *, naming: str, image_size: int, in_channels: int, what: str = 'checkpoint'):
  """The jaxdiff params of `model` from a UNet state dict in `naming` ('diffusers', or 'ldm': a whole SD checkpoint
  or a bare UNet), every key and shape checked; errors name the keys as the file does."""
  root = _prefix(state) if naming == 'ldm' else ''
  state = {k: v for k, v in state.items() if k.startswith(root)}  # the UNet's of a whole checkpoint
  shapes = param_shapes(model, image_size, in_channels, model.num_classes)
  return common.fill_params(state, shapes, sources(model, naming, root), what=what)


def load_diffusers(folder: str) -> tuple[ml_collections.ConfigDict, dict, dict]:
  """(model keys, dict(image_size, in_channels, out_channels[, micro_embed_dim]), params) of a UNet2DConditionModel
  folder."""
  section, shape = folder_section(folder)
  state = common.read_state_dict(diffusers.weights_path(folder))
  params = convert(state, build(section, shape), naming='diffusers', image_size=shape['image_size'],
                   in_channels=shape['in_channels'], what=folder)
  return section, shape, params


def convert_ldm(state_dict: dict, model_cfg, *, image_size: int, what: str = 'checkpoint'):
  """The params of the UNet that `model_cfg` (a config.model section) describes at `image_size` latents, from an
  LDM/SD checkpoint's state dict; its shapes must agree with the section (else one line naming the keys)."""
  return _load(state_dict, 'ldm', model_cfg, image_size, what)


def load_unet(path: str, model_cfg=None, *, image_size: int | None = None):
  """Params from a UNet2DConditionModel folder or an LDM/SD single file (.ckpt/.safetensors). With `model_cfg` (a
  config.model section, run at `image_size` latents; default the file's size) the params are those of its network,
  which must be the file's: one line names each key where they differ."""
  if os.path.isdir(path):
    state, naming = common.read_state_dict(diffusers.weights_path(path)), 'diffusers'
  else:
    state, naming = autoencoder.read_weights(path), 'ldm'
  return _load(state, naming, model_cfg, image_size, path)


def _structure(model: UNet) -> dict:
  """What a checkpoint fixes about `model`, per level where a field can be given per level."""
  levels = len(model.channel_mult)
  attending = sorted({level for level in range(levels) if 2 ** level in model.attention_ds} | {levels - 1})
  per_level = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v,) * levels
  fields = {f.name: getattr(model, f.name) for f in dataclasses.fields(UNet) if f.name not in _FREE_FIELDS}
  depth = per_level(model.transformer_depth)
  return dict(fields, num_res_blocks=per_level(model.num_res_blocks),
              transformer_depth=tuple(depth[level] for level in attending))


def _heads(model: UNet, rule: bool = False) -> tuple:
  """The heads of each attending level (the last one's: the middle block's); with `rule`, as the LDM rule gives."""
  levels = len(model.channel_mult)
  widths = [int(model.base_channels * m) for m in model.channel_mult]
  if rule:
    heads = [w // 64 if model.use_linear_projection else 8 for w in widths]
  elif model.num_head_channels != -1:
    heads = [w // model.num_head_channels for w in widths]
  else:
    heads = model._per_level(model.num_heads)  # pylint: disable=protected-access
  return tuple(heads[level] for level in sorted({lv for lv in range(levels) if 2 ** lv in model.attention_ds}
                                                 | {levels - 1}))


def _load(state: dict, naming: str, model_cfg, image_size, what: str):
  if naming == 'diffusers':
    found, shape = folder_section(what)
  else:
    found, shape = section_from_ldm_state_dict(state, what=what)
    if model_cfg is not None:  # no tensor tells these: the config's are used (and compared with LDM's below)
      found = ml_collections.ConfigDict({**found.to_dict(), **{k: model_cfg[k] for k in LDM_UNTOLD if k in model_cfg}})
  expected = build(found, shape, model_cfg)
  if model_cfg is None:
    return convert(state, expected, naming=naming, image_size=shape['image_size'], in_channels=shape['in_channels'],
                   what=what)
  model_cfg = ml_collections.ConfigDict({**RUN_KEYS, **model_cfg.to_dict()})
  image_size = image_size or shape['image_size']
  model = create_model(model_cfg, image_size=image_size, in_channels=shape['in_channels'],
                       out_channels=shape['out_channels'],
                       num_classes=(model_cfg.num_classes or None) if model_cfg.get('class_conditional') else None)
  mine, theirs = _structure(expected), _structure(model)
  diffs = [f'model.{k}: {mine[k]!r} in {what}, {theirs[k]!r} in the config' for k in mine if mine[k] != theirs[k]]
  if naming == 'diffusers' and _heads(expected) != _heads(model):
    diffs.append(f'heads per attending level: {_heads(expected)} in {what}, {_heads(model)} in the config '
                 '(model.num_heads / num_head_channels)')
  if diffs:
    raise CheckpointError(f'The config does not describe the UNet ({"; ".join(diffs[:3])}'
                          f'{"; ..." if len(diffs) > 3 else ""}): fix those config keys.')
  if naming == 'ldm' and (_heads(model, rule=True) != _heads(model) or model.norm_groups != 32):
    logging.warning('%s: a state dict cannot tell the attention heads or GroupNorm groups; using the config\'s %s '
                    'heads per attending level and %d groups (LDM: 32 groups; SD 1.x has 8 heads, SD 2.x 64 '
                    'channels per head: %s here).', what, _heads(model), model.norm_groups, _heads(model, rule=True))
  return convert(state, model, naming=naming, image_size=image_size, in_channels=shape['in_channels'], what=what)
