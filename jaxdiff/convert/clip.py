"""CLIP text encoders from PyTorch -> a `config.text_encoder` section and CLIPTextTransformer params.

  section, params = load_text_encoder('sd-v1-5/text_encoder')          # transformers CLIPTextModel[WithProjection]
  section, params = load_text_encoder('v2-1_768-ema-pruned.safetensors', config.text_encoder)  # its cond_stage_model
  section, params = load_text_encoder('sd_xl_base_1.0.safetensors', index=1)  # SDXL's second encoder (OpenCLIP bigG)

A transformers folder's config.json fixes the network. A single-file Stable Diffusion checkpoint is read by its
tensor shapes: SD 1.x holds OpenAI's CLIP ViT-L/14 text tower in transformers' names
(cond_stage_model.transformer.text_model.*, quick GELU); SD 2.x holds OpenCLIP ViT-H/14's (cond_stage_model.model.*,
exact GELU), whose last block and text projection SD 2.x never uses: they are left out, and the UNet attends to the
final LayerNorm of the block before (what diffusers' single-file loader builds: a 23-layer CLIPTextModel).
SGM (SDXL) checkpoints number their encoders, conditioner.embedders.{i}.transformer.text_model.* (CLIP ViT-L/14) and
conditioner.embedders.{i}.model.* (OpenCLIP ViT-bigG/14): the base holds both (index 0 and 1), the refiner bigG alone
(index 0). SDXL reads the penultimate output of each and the projected pooled output of bigG, so every block and the
projection are kept.
"""

import json
import os
import re

import ml_collections
import numpy as np

from jaxdiff.convert import autoencoder, common
from jaxdiff.errors import CheckpointError
from jaxdiff.models import clip
from jaxdiff.models.tokenizer import EOS

WEIGHTS = ('model.safetensors', 'pytorch_model.bin')
ARCHITECTURES = ('CLIPTextModel', 'CLIPTextModelWithProjection')
# The prefixes of a text encoder inside a Stable Diffusion checkpoint -> the naming of the keys under it.
PREFIXES = {'cond_stage_model.transformer.': 'transformers', 'cond_stage_model.model.': 'openclip'}
# SGM's numbered conditioners (SDXL): a text encoder in either naming, or one with no weights (micro-conditioning).
SGM_PREFIX = re.compile(r'conditioner\.embedders\.(\d+)\.(?:transformer|model)\.')
# The tensor that marks a text encoder under a prefix (transformers' names with and without `text_model.`, OpenCLIP's).
TOKEN_EMBEDDINGS = ('text_model.embeddings.token_embedding.weight', 'embeddings.token_embedding.weight',
                    'token_embedding.weight')
# jaxdiff module -> torch module, per naming ({i}: the layer).
NAMINGS = {
    'transformers': dict(
        token_embedding='embeddings.token_embedding', position_embedding='embeddings.position_embedding.weight',
        layer='encoder.layers.{i}', layer_norm1='layer_norm1', layer_norm2='layer_norm2',
        qkv=('self_attn.q_proj', 'self_attn.k_proj', 'self_attn.v_proj'), out_proj='self_attn.out_proj',
        fc1='mlp.fc1', fc2='mlp.fc2', final_layer_norm='final_layer_norm', text_projection='text_projection'),
    'openclip': dict(
        token_embedding='token_embedding', position_embedding='positional_embedding', layer='transformer.resblocks.{i}',
        layer_norm1='ln_1', layer_norm2='ln_2', qkv='attn.in_proj', out_proj='attn.out_proj', fc1='mlp.c_fc',
        fc2='mlp.c_proj', final_layer_norm='ln_final', text_projection='text_projection'),
}
LEAVES = {'kernel': 'weight', 'scale': 'weight', 'embedding': 'weight', 'bias': 'bias'}
# Tensors that are no weights of the network: transformers' old position_ids buffer, OpenCLIP's attention mask buffer
# and its contrastive temperature.
_NOT_WEIGHTS = re.compile(r'(^|\.)(position_ids|attn_mask|logit_scale)$')
HEAD_CHANNELS = 64  # every CLIP and OpenCLIP text tower: heads = width // 64


def naming_of(state: dict, what: str = 'checkpoint') -> str:
  """'transformers' or 'openclip', by the token embedding's name."""
  if 'embeddings.token_embedding.weight' in state:
    return 'transformers'
  if 'token_embedding.weight' in state:
    return 'openclip'
  raise CheckpointError(f'{what} holds no CLIP text encoder: it has neither embeddings.token_embedding.weight '
                        '(transformers) nor token_embedding.weight (OpenCLIP), bare or under cond_stage_model.'
                        'transformer.[text_model.] / cond_stage_model.model. / conditioner.embedders.N.')


def _prefixes(state: dict) -> list[str]:
  """The prefixes of the text encoders of a state dict in the file's order ('' for a bare one)."""
  sgm = {m.group(0): int(m.group(1)) for m in map(SGM_PREFIX.match, state) if m}
  candidates = [*PREFIXES, *sorted(sgm, key=sgm.get)]
  found = [p for p in candidates if any(p + name in state for name in TOKEN_EMBEDDINGS)]
  if not found and any(name in state for name in TOKEN_EMBEDDINGS):
    found = ['']
  return found


def text_encoder_count(state: dict) -> int:
  """How many CLIP text encoders a state dict holds: 1 for SD 1.x/2.x, a transformers or bare OpenCLIP one; 2 for an
  SDXL base (CLIP ViT-L/14, OpenCLIP bigG); 1 for the SDXL refiner (bigG); 0 for none."""
  return len(_prefixes(state))


def _select(state: dict, what: str, index: int) -> tuple[str, dict]:
  """(prefix, the tensors under it without the prefix, transformers' `text_model.` or buffers) of text encoder
  `index`."""
  prefixes = _prefixes(state)
  if not prefixes:
    naming_of({}, what)  # raises: no text encoder
  if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not 0 <= index < len(prefixes):
    held = ', '.join(f'{i}: {p or "bare"}' for i, p in enumerate(prefixes))
    raise CheckpointError(f'{what} holds {len(prefixes)} CLIP text encoder(s) ({held}): index={index!r} is not one '
                          f'of them; use {" or ".join(map(str, range(len(prefixes))))}.')
  prefix = prefixes[index]
  state = {k[len(prefix):].removeprefix('text_model.'): v for k, v in state.items()
           if k.startswith(prefix) and not _NOT_WEIGHTS.search(k)}
  naming_of(state, what)
  return prefix, state


def text_encoder_state(state: dict, what: str = 'checkpoint', index: int = 0) -> dict:
  """The tensors of the file's text encoder `index` (see text_encoder_count), without a Stable Diffusion prefix or
  transformers' `text_model.` (the text_projection of CLIPTextModelWithProjection sits beside it), and without
  buffers."""
  return _select(state, what, index)[1]


def _count(state: dict, naming: str) -> int:
  layer = NAMINGS[naming]['layer']
  norm = NAMINGS[naming]['layer_norm1']
  return next(n for n in range(10_000) if f'{layer.format(i=n)}.{norm}.weight' not in state)


def convert_state_dict(state_dict: dict, module: clip.CLIPTextTransformer, *, what: str = 'checkpoint',
                       index: int = 0) -> dict:
  """The params of `module` from a CLIP text encoder state dict in transformers' or OpenCLIP's names (bare, or the
  file's text encoder `index` inside a Stable Diffusion checkpoint), every key and shape checked.

  An OpenCLIP tower with one block more than a module without projection (SD 2.x) loses that block, and its
  text_projection when the module has none; nothing else is left out. A module with a projection keeps every block:
  the projected pooled output is computed after the last one.
  """
  state = text_encoder_state(state_dict, what, index)
  naming = naming_of(state)
  names = NAMINGS[naming]
  if naming == 'openclip':
    blocks = _count(state, naming)
    if blocks == module.num_layers + 1:
      if module.projection_dim:
        raise CheckpointError(f'The OpenCLIP text encoder of {what} has {blocks} blocks, the config {blocks - 1} '
                              f'with projection_dim={module.projection_dim}: the projected pooled output needs every '
                              f'block; set text_encoder.num_layers={blocks} (or projection_dim=0 to drop the last '
                              'block, as SD 2.x does).')
      extra = names['layer'].format(i=module.num_layers) + '.'
      state = {k: v for k, v in state.items() if not k.startswith(extra)}
    if not module.projection_dim:
      state.pop('text_projection', None)
    if 'text_projection' in state:  # used as x @ P: already [in, out], so transposed here to torch's [out, in]
      state['text_projection'] = np.asarray(state['text_projection']).T

  def sources(path):
    *parents, leaf = path
    if not parents or (parents == ['text_projection'] and naming == 'openclip'):  # bare tensors, no .weight
      return [names[parents[0] if parents else leaf]]
    if len(parents) == 1:
      return [f'{names[parents[0]]}.{LEAVES[leaf]}']
    layer, sub = names['layer'].format(i=parents[0].split('_')[1]), parents[1]
    if naming == 'openclip' and sub == 'qkv':  # one fused in_proj_weight / in_proj_bias
      return [f'{layer}.{names[sub]}_{LEAVES[leaf]}']
    return [f'{layer}.{torch_module}.{LEAVES[leaf]}' for torch_module in
            (names[sub] if isinstance(names[sub], tuple) else (names[sub],))]

  return common.fill_params(state, clip.text_encoder_shapes(module), sources, what=what)


def section_from_state_dict(state_dict: dict, what: str = 'checkpoint', index: int = 0) -> dict:
  """The text_encoder section keys the tensor shapes (and the naming) of the file's CLIP text encoder `index` fix
  (see text_encoder_count: SD 1.x/2.x and the SDXL refiner hold one, the SDXL base two).

  heads = width // 64 as in every CLIP text tower; transformers' names mean OpenAI CLIP (quick GELU), OpenCLIP's
  exact GELU; eos is the last token of the vocabulary (CLIP's layout). SD 2.x's OpenCLIP tower keeps all blocks but
  the last and no projection (see convert_state_dict). SGM (SDXL) encoders keep every block and OpenCLIP's projection,
  and add the keys SDXL reads them with: output='penultimate' and the pad token SGM tokenized with (OpenCLIP's "!",
  transformers' eos).
  """
  prefix, state = _select(state_dict, what, index)
  naming = naming_of(state)
  names = NAMINGS[naming]
  sgm = SGM_PREFIX.fullmatch(prefix) is not None
  vocab, width = state[names['token_embedding'] + '.weight'].shape
  if width % HEAD_CHANNELS:
    raise CheckpointError(f'The CLIP text encoder of {what} is {width} wide, not a multiple of {HEAD_CHANNELS}: its '
                          'number of heads cannot be inferred; load it from a transformers folder (config.json).')
  blocks = layers = _count(state, naming)
  projection = 0
  if naming == 'transformers':
    projection = state['text_projection.weight'].shape[0] if 'text_projection.weight' in state else 0
  elif sgm:
    projection = state['text_projection'].shape[1] if 'text_projection' in state else 0
  else:
    layers -= 1
  if layers < 1:
    raise CheckpointError(f'The CLIP text encoder of {what} has {blocks} transformer block(s): too few to convert '
                          '(SD 2.x\'s OpenCLIP towers lose their last block).')
  section = dict(kind='clip', vocab_size=vocab, width=width, num_layers=layers, num_heads=width // HEAD_CHANNELS,
                 max_length=state[names['position_embedding']].shape[0],
                 activation='quick_gelu' if naming == 'transformers' else 'gelu', projection_dim=projection,
                 eos_token_id=vocab - 1)
  if sgm:  # SDXL's context is every encoder's penultimate output; SGM padded OpenCLIP's tokens with "!" (id 0)
    section.update(output='penultimate', pad_token='!' if naming == 'openclip' else EOS)
  return section


def _read_config(folder: str) -> dict:
  path = os.path.join(folder, 'config.json')
  if not os.path.isfile(path):
    raise CheckpointError(f'{folder} is not a transformers model folder: it has no config.json.')
  try:
    with open(path, encoding='utf-8') as f:
      return json.load(f)
  except ValueError as e:
    raise CheckpointError(f'{path} is not valid JSON ({e}).') from None


def folder_section(cfg: dict, folder: str) -> dict:
  """The section keys a transformers CLIPTextModel[WithProjection] config.json fixes."""
  architecture = (cfg.get('architectures') or ['CLIPTextModel'])[0]
  if architecture not in ARCHITECTURES or cfg.get('model_type', 'clip_text_model') != 'clip_text_model':
    raise CheckpointError(f'{folder} holds a {architecture} ({cfg.get("model_type")}), not a CLIP text encoder: give '
                          f'a {" or ".join(ARCHITECTURES)} folder (a pipeline\'s text_encoder/).')
  width, act = cfg.get('hidden_size', 512), cfg.get('hidden_act', 'quick_gelu')
  if act not in clip.ACTIVATIONS:
    raise CheckpointError(f'{architecture} hidden_act={act!r} in {folder} is not expressed by the jaxdiff CLIP text '
                          f'encoder (supported: {", ".join(clip.ACTIVATIONS)}).')
  if cfg.get('intermediate_size', 2048) != clip.MLP_RATIO * width:
    raise CheckpointError(f'{architecture} intermediate_size={cfg.get("intermediate_size", 2048)} in {folder} is not '
                          f'{clip.MLP_RATIO} x hidden_size={width}, the only MLP width the jaxdiff CLIP expresses.')
  eps = cfg.get('layer_norm_eps', clip.NORM_EPS)
  if abs(eps - clip.NORM_EPS) > 1e-12:
    raise CheckpointError(f'{architecture} layer_norm_eps={eps} in {folder}: the jaxdiff CLIP uses {clip.NORM_EPS}.')
  vocab, eos = cfg.get('vocab_size', 49408), cfg.get('eos_token_id', 49407)
  if not isinstance(eos, int):
    raise CheckpointError(f'{architecture} eos_token_id={eos!r} in {folder}: give one token id.')
  if eos == 2:  # transformers' legacy value: pools at the largest id, CLIP's eos (the vocabulary's last token)
    eos = vocab - 1
  return dict(kind='clip', vocab_size=vocab, width=width, num_layers=cfg.get('num_hidden_layers', 12),
              num_heads=cfg.get('num_attention_heads', 8), max_length=cfg.get('max_position_embeddings', 77),
              activation=act, projection_dim=cfg.get('projection_dim', 512) if architecture == ARCHITECTURES[1] else 0,
              eos_token_id=eos)


def merge(found: dict, section, path: str) -> ml_collections.ConfigDict:
  """`section` (a config.text_encoder section, or None) completed with what the checkpoint fixes; the structural keys
  both give must agree. What the checkpoint only suggests (an SGM encoder's output and pad_token) yields to the
  section's."""
  given = {} if section is None else (section.to_dict() if isinstance(section, ml_collections.ConfigDict)
                                      else dict(section))
  diffs = [f'text_encoder.{key}: {found[key]!r} in {path}, {given[key]!r} in the config' for key in clip.STRUCTURE
           if key in given and given[key] != found[key]]
  if diffs:
    raise CheckpointError(f'The config does not describe the text encoder ({"; ".join(diffs[:3])}'
                          f'{"; ..." if len(diffs) > 3 else ""}): fix those config keys.')
  fixed = {k: v for k, v in found.items() if k in clip.STRUCTURE or k == 'kind'}
  return ml_collections.ConfigDict({**clip.SECTION_DEFAULTS, **found, **given, **fixed})


def load_text_encoder(path: str, section=None, index: int = 0) -> tuple[ml_collections.ConfigDict, dict]:
  """(the config.text_encoder section, params) of a transformers CLIPTextModel[WithProjection] folder, or of the
  text encoder `index` in a Stable Diffusion checkpoint (.ckpt/.safetensors; SDXL base: 0 = CLIP ViT-L/14, 1 =
  OpenCLIP bigG), every key and shape checked; `section`'s structural keys must agree with it, its other keys
  (output, tokenizer, ...) are kept. A folder holds one encoder (index 0; SDXL's second is its text_encoder_2/)."""
  if os.path.isdir(path):
    if index != 0:
      raise CheckpointError(f'{path} is a transformers folder holding one text encoder: index={index!r} picks one of '
                            "a single-file checkpoint's; use index=0 (a diffusers SDXL's second is text_encoder_2/).")
    found = folder_section(_read_config(path), path)
    weights = next((os.path.join(path, n) for n in WEIGHTS if os.path.isfile(os.path.join(path, n))), None)
    if weights is None:
      raise CheckpointError(f'{path} has no {" or ".join(WEIGHTS)}: give a folder saved by save_pretrained (a sharded '
                            'one is not supported).')
    state = common.read_state_dict(weights)
  else:
    state = autoencoder.read_weights(path)  # also reads a Lightning .ckpt's state_dict
    found = section_from_state_dict(state, path, index)
  merged = merge(found, section, path)
  return merged, convert_state_dict(state, clip.create_text_encoder(merged), what=path, index=index)
