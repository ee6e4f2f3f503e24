"""Autoencoders (the first stage of latent diffusion) from PyTorch -> a `config.autoencoder` section and params.

  section, params = load_autoencoder('sd-vae-ft-mse')          # a diffusers AutoencoderKL/VQModel folder
  section, params = load_autoencoder('v1-5-pruned-emaonly.ckpt')  # SD/LDM checkpoint: its first_stage_model.*
  section, params = load_autoencoder('kl-f8/model.ckpt', cfg)  # an LDM first stage; cfg gives the scale factor

A folder's config.json fixes the network; options the jaxdiff autoencoder does not express are refused by name.
A CompVis/Stability state dict (diffusers-named ones too) is read by its tensor shapes: channels, levels, blocks,
attention, latent and code sizes, KL or VQ. Neither says what norm_groups (32 in LDM's code) or the latent scale
factor was unless the folder's config does; `cfg` supplies them (else 32, and 0.0 for "unknown").
"""

import os
import re

import ml_collections

from jaxdiff.convert import common, diffusers
from jaxdiff.errors import CheckpointError
from jaxdiff.models import autoencoder

# jaxdiff module -> torch module, as templates of {side} (encoder/decoder), {level}, {up} (diffusers' up-block
# index of a level) and {i}; `skip` and `attn` name the ResBlock shortcut and the attention projections.
NAMINGS = {
    'diffusers': dict(
        norm_out='{side}.conv_norm_out', mid_res_0='{side}.mid_block.resnets.0',
        mid_attn='{side}.mid_block.attentions.0', mid_res_1='{side}.mid_block.resnets.1',
        down_res='encoder.down_blocks.{level}.resnets.{i}', down_attn='encoder.down_blocks.{level}.attentions.{i}',
        downsample='encoder.down_blocks.{level}.downsamplers.0.conv', up_res='decoder.up_blocks.{up}.resnets.{i}',
        up_attn='decoder.up_blocks.{up}.attentions.{i}', upsample='decoder.up_blocks.{up}.upsamplers.0.conv',
        skip='conv_shortcut', attn=diffusers.ATTN),
    'compvis': dict(
        norm_out='{side}.norm_out', mid_res_0='{side}.mid.block_1', mid_attn='{side}.mid.attn_1',
        mid_res_1='{side}.mid.block_2', down_res='encoder.down.{level}.block.{i}',
        down_attn='encoder.down.{level}.attn.{i}', downsample='encoder.down.{level}.downsample.conv',
        up_res='decoder.up.{level}.block.{i}', up_attn='decoder.up.{level}.attn.{i}',
        upsample='decoder.up.{level}.upsample.conv', skip='nin_shortcut',
        # LDM's AttnBlock: q, k, v and proj_out are 1x1 convolutions (squeezed to linear weights on reading).
        attn={'norm': ['norm'], 'qkv': ['q', 'k', 'v'], 'proj_out': ['proj_out']}),
}
_ATTENTION_WEIGHT = re.compile(r'\.(attn_1|attn\.\d+|attentions\.\d+)\.(q|k|v|proj_out|to_q|to_k|to_v|to_out\.0|'
                               r'query|key|value|proj_attn)\.weight$')
# What every autoencoder state dict holds, whatever its layout.
_REQUIRED = ('encoder.conv_in.weight', 'encoder.conv_out.weight', 'decoder.conv_in.weight', 'decoder.conv_out.weight',
             'quant_conv.weight')
# Options of diffusers' classes jaxdiff expresses only at these values (key -> allowed values, default first).
SUPPORTED = {
    'AutoencoderKL': dict(act_fn=('silu',), use_quant_conv=(True,), use_post_quant_conv=(True,), shift_factor=(None,),
                          latents_mean=(None,), latents_std=(None,)),
    'VQModel': dict(act_fn=('silu',), norm_type=('group',), lookup_from_codebook=(False,)),
}
DIFFUSERS_SCALE = 0.18215  # diffusers' default scaling_factor (SD's)
DOWN_BLOCKS = {'DownEncoderBlock2D': False, 'AttnDownEncoderBlock2D': True}  # -> attends
UP_BLOCKS = {'UpDecoderBlock2D': False, 'AttnUpDecoderBlock2D': True}
# Section keys a file fixes, compared with a given cfg (embedding_dim as the code size it resolves to).
_STRUCTURE = ('kind', 'base_channels', 'channel_mult', 'num_res_blocks', 'latent_channels', 'mid_attention',
              'attention_levels', 'norm_groups', 'num_embeddings', 'embedding_dim')


def module_prefixes(model, naming: str) -> dict[str, str]:
  """jaxdiff module path -> torch module prefix of an AutoencoderKL/VQModel in `naming` ('diffusers', 'compvis')."""
  names, levels = NAMINGS[naming], len(model.channel_mult)
  prefixes = {'quant_conv': 'quant_conv', 'post_quant_conv': 'post_quant_conv', 'quantize': 'quantize.embedding'}
  for side in ('encoder', 'decoder'):
    prefixes.update({f'{side}/conv_in': f'{side}.conv_in', f'{side}/conv_out': f'{side}.conv_out'})
    for name in ('norm_out', 'mid_res_0', 'mid_attn', 'mid_res_1'):
      prefixes[f'{side}/{name}'] = names[name].format(side=side)
  for level in range(levels):
    where = dict(level=level, up=levels - 1 - level)
    prefixes[f'encoder/down_{level}_downsample/conv'] = names['downsample'].format(**where)
    prefixes[f'decoder/up_{level}_upsample/conv'] = names['upsample'].format(**where)
    for i in range(model.num_res_blocks + 1):
      for ours, theirs in (('encoder/down_{level}_res_{i}', 'down_res'), ('encoder/down_{level}_attn_{i}', 'down_attn'),
                           ('decoder/up_{level}_res_{i}', 'up_res'), ('decoder/up_{level}_attn_{i}', 'up_attn')):
        prefixes[ours.format(level=level, i=i)] = names[theirs].format(i=i, **where)
  return prefixes


def convert(state_dict: dict, model, *, naming: str, what: str = 'checkpoint'):
  """The params of `model` (AutoencoderKL or VQModel) from a torch state dict, every key and shape checked."""
  prefixes, names = module_prefixes(model, naming), NAMINGS[naming]
  res = dict(diffusers.RES, skip=names['skip'])
  deprecated = naming == 'diffusers' and any(k.endswith('.query.weight') for k in state_dict)
  # 1x1-conv attention projections (LDM, and some converted diffusers files) as the linear weights they are.
  state_dict = {k: v[:, :, 0, 0] if v.ndim == 4 and v.shape[2:] == (1, 1) and _ATTENTION_WEIGHT.search(k) else v
                for k, v in state_dict.items()}

  def sources(path):
    *modules, leaf = path
    name, leaf = '/'.join(modules), diffusers.LEAVES[leaf]
    if name in prefixes:
      return [f'{prefixes[name]}.{leaf}']
    block, sub = prefixes['/'.join(modules[:-1])], modules[-1]
    if sub in res:
      return [f'{block}.{res[sub]}.{leaf}']
    attn = [diffusers.DEPRECATED_ATTN.get(n, n) if deprecated else n for n in names['attn'][sub]]
    return [f'{block}.{n}.{leaf}' for n in attn]

  return common.fill_params(state_dict, autoencoder.param_shapes(model), sources, what=what)


def folder_section(cfg: dict, folder: str) -> tuple[dict, int]:
  """The section keys a diffusers AutoencoderKL/VQModel config.json fixes, and the image channels."""
  cls = cfg.get('_class_name')
  if cls not in SUPPORTED:
    raise CheckpointError(f'{folder} holds a diffusers {cls}, not an AutoencoderKL or VQModel: give an autoencoder '
                          'folder (a pipeline\'s vae/ or vqvae/).')
  for key, allowed in SUPPORTED[cls].items():
    if cfg.get(key, allowed[0]) not in allowed:
      raise CheckpointError(f'{cls} {key}={cfg[key]!r} in {folder} is not expressed by the jaxdiff autoencoder '
                            f'(supported: {allowed[0]!r}).')
  widths = list(cfg.get('block_out_channels', (64,)))
  down = list(cfg.get('down_block_types', ('DownEncoderBlock2D',)))
  up = list(cfg.get('up_block_types', ('UpDecoderBlock2D',)))
  if (len(down) != len(widths) or len(up) != len(widths) or not set(down) <= set(DOWN_BLOCKS)
      or not set(up) <= set(UP_BLOCKS)):
    raise CheckpointError(f'{cls} blocks {down} / {up} in {folder} are not expressed by the jaxdiff autoencoder: it '
                          f'takes one of {sorted(DOWN_BLOCKS)} and one of {sorted(UP_BLOCKS)} per block_out_channels '
                          'entry.')
  attention = tuple(level for level, block in enumerate(down) if DOWN_BLOCKS[block])
  if attention != tuple(level for level, block in enumerate(reversed(up)) if UP_BLOCKS[block]):
    raise CheckpointError(f'{cls} attention in {down} is not mirrored in {up} ({folder}); the jaxdiff autoencoder '
                          'attends at the same levels on both paths.')
  if any(w % widths[0] for w in widths):
    raise CheckpointError(f'{cls} block_out_channels={widths} in {folder} are not multiples of the first.')
  channels = cfg.get('in_channels', 3)
  if cfg.get('out_channels', 3) != channels:
    raise CheckpointError(f'{cls} in {folder} maps {channels} channels to {cfg["out_channels"]}; the jaxdiff '
                          'autoencoder reconstructs images of the channels it encodes.')
  latent = cfg.get('latent_channels', 4 if cls == 'AutoencoderKL' else 3)
  scale = float(cfg.get('scaling_factor', DIFFUSERS_SCALE))
  if cls == 'VQModel' and scale == DIFFUSERS_SCALE:
    scale = 0.0  # diffusers writes its KL default for every VQModel; LDM's VQ models scale by 1, its pipelines by none
  section = dict(kind='kl' if cls == 'AutoencoderKL' else 'vq', base_channels=widths[0],
                 channel_mult=tuple(w // widths[0] for w in widths), num_res_blocks=cfg.get('layers_per_block', 1),
                 latent_channels=latent, mid_attention=cfg.get('mid_block_add_attention', True),
                 attention_levels=attention, norm_groups=cfg.get('norm_num_groups', 32), scale_factor=scale)
  if cls == 'VQModel':
    section.update(num_embeddings=cfg.get('num_vq_embeddings', 256), embedding_dim=cfg.get('vq_embed_dim') or latent)
  return section, channels


class _Skipped:
  """Stands in for the classes a Lightning .ckpt pickles beside its weights (callbacks, hyper-parameters), so the
  weights load with weights_only=True without importing or running any of them."""

  def __init__(self, *args, **kwargs):
    del args, kwargs

  def __setstate__(self, state):
    del state


def read_weights(path: str) -> dict:
  """A state dict from .safetensors, or from a torch file (LDM/SD .ckpt: its `state_dict`)."""
  if path.endswith('.safetensors') or not os.path.isfile(path):
    return common.read_state_dict(path)
  try:
    import torch  # pylint: disable=import-outside-toplevel
    unknown = torch.serialization.get_unsafe_globals_in_checkpoint(path)
  except Exception:  # no torch, or not a zip checkpoint: read_state_dict names the problem.
    return common.read_state_dict(path)
  with torch.serialization.safe_globals([(_Skipped, name) for name in unknown]):
    return common.read_state_dict(path)


def first_stage(state: dict, path: str) -> dict:
  """The autoencoder's tensors of an LDM/SD checkpoint (first_stage_model.*) or of a bare first stage, without the
  LPIPS and discriminator weights (loss.*) LDM saves in its first-stage checkpoints."""
  prefix = 'first_stage_model.'
  if any(k.startswith(prefix) for k in state):
    state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
  state = {k: v for k, v in state.items() if not k.startswith('loss.')}
  absent = [k for k in _REQUIRED if k not in state]
  if absent:
    raise CheckpointError(f'{path} is not an autoencoder checkpoint: it has no {absent[0]} (nor {prefix}'
                          f'{absent[0]}); give an LDM/SD first stage, a checkpoint holding one, or a diffusers '
                          'AutoencoderKL/VQModel folder.')
  return state


def infer_section(state: dict, path: str) -> tuple[str, dict, int]:
  """(naming, the section keys the tensor shapes fix, image channels) of a first-stage state dict."""
  naming = next((n for n, t in NAMINGS.items() if f'{t["down_res"].format(level=0, i=0)}.conv1.weight' in state),
                None)
  if naming is None:
    raise CheckpointError(f'{path} is not an autoencoder in the CompVis or diffusers layout: it has neither '
                          'encoder.down.0.block.0.conv1.weight nor encoder.down_blocks.0.resnets.0.conv1.weight.')
  names = NAMINGS[naming]
  res = lambda level, i: f'{names["down_res"].format(level=level, i=i)}.conv1.weight'
  levels = next(n for n in range(1, 64) if res(n, 0) not in state)
  num_res = next(n for n in range(1, 64) if res(0, n) not in state)
  base = state['encoder.conv_in.weight'].shape[0]
  widths = [state[res(level, 0)].shape[0] for level in range(levels)]
  if any(w % base for w in widths):
    raise CheckpointError(f'{path}: level widths {widths} are not multiples of conv_in\'s {base} channels.')
  norm = names['attn']['norm'][0]
  attention = tuple(level for level in range(levels)
                    if f'{names["down_attn"].format(level=level, i=0)}.{norm}.weight' in state)
  latent = state['decoder.conv_in.weight'].shape[1]
  moments, quant = state['encoder.conv_out.weight'].shape[0], state['quant_conv.weight'].shape[0]
  vq = 'quantize.embedding.weight' in state
  if moments != (latent if vq else 2 * latent):
    raise CheckpointError(f'{path}: the encoder writes {moments} channels for {latent} latent channels, which is '
                          f'neither a {"VQ" if vq else "KL"} autoencoder\'s {latent if vq else 2 * latent}.')
  if not vq and quant != moments:
    raise CheckpointError(f'{path}: a KL autoencoder with embed_dim {quant // 2} != z_channels {latent} is not '
                          'expressed by the jaxdiff autoencoder (its quant_conv keeps the latent width).')
  channels = state['encoder.conv_in.weight'].shape[1]
  if state['decoder.conv_out.weight'].shape[0] != channels:
    raise CheckpointError(f'{path} maps {channels} channels to {state["decoder.conv_out.weight"].shape[0]}; the '
                          'jaxdiff autoencoder reconstructs images of the channels it encodes.')
  section = dict(kind='vq' if vq else 'kl', base_channels=base, channel_mult=tuple(w // base for w in widths),
                 num_res_blocks=num_res, latent_channels=latent, attention_levels=attention,
                 mid_attention=f'{names["mid_attn"].format(side="encoder")}.{norm}.weight' in state)
  if vq:
    codes, dim = state['quantize.embedding.weight'].shape
    section.update(num_embeddings=codes, embedding_dim=dim)
  return naming, section, channels


def _code_dim(section) -> int:
  return section.get('embedding_dim') or section.get('latent_channels')


def merge(found: dict, cfg, path: str) -> ml_collections.ConfigDict:
  """`cfg` (a config.autoencoder section, or None) completed with what the file fixes; keys they both give must
  agree (scale_factor 0 meaning unknown)."""
  given = {} if cfg is None else (cfg.to_dict() if isinstance(cfg, ml_collections.ConfigDict) else dict(cfg))
  diffs = []
  for key in _STRUCTURE:
    if key not in given or key not in found or (key in ('num_embeddings', 'embedding_dim') and found['kind'] != 'vq'):
      continue
    mine, theirs = (_code_dim(found), _code_dim({**autoencoder.SECTION_DEFAULTS, **given})) \
        if key == 'embedding_dim' else (found[key], given[key])
    if isinstance(mine, tuple):
      theirs = tuple(theirs)
    if mine != theirs:
      diffs.append(f'autoencoder.{key}: {mine!r} in {path}, {theirs!r} in the config')
  scale = given.get('scale_factor', 0.0)
  if found.get('scale_factor') and scale and abs(found['scale_factor'] - scale) > 1e-9:
    diffs.append(f'autoencoder.scale_factor: {found["scale_factor"]} in {path}, {scale} in the config')
  if diffs:
    raise CheckpointError(f'The config does not describe the autoencoder ({"; ".join(diffs[:3])}'
                          f'{"; ..." if len(diffs) > 3 else ""}): fix those config keys.')
  section = {**autoencoder.SECTION_DEFAULTS, **given, **found}
  section['scale_factor'] = float(found.get('scale_factor') or scale)
  return ml_collections.ConfigDict(section)


def load_autoencoder(path: str, cfg=None) -> tuple[ml_collections.ConfigDict, dict]:
  """(the config.autoencoder section, params) of a diffusers AutoencoderKL/VQModel folder, an LDM/SD checkpoint
  (.ckpt with first_stage_model.* keys, or .safetensors) or a bare first-stage state dict, every key and shape
  checked. `cfg` gives what the file cannot tell (scale_factor, norm_groups of a state dict, beta) and is checked
  against what it does."""
  if os.path.isdir(path):
    found, channels = folder_section(diffusers.read_config(path), path)
    naming, state = 'diffusers', common.read_state_dict(diffusers.weights_path(path))
  else:
    state = first_stage(read_weights(path), path)
    naming, found, channels = infer_section(state, path)
  section = merge(found, cfg, path)
  model = autoencoder.create_autoencoder(section, channels=channels)
  return section, convert(state, model, naming=naming, what=path)
