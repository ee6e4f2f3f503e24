"""SDXL's text side against transformers and diffusers: the penultimate and projected outputs of one call, the two
text encoders of an SGM (Stability) single-file base and the one of the refiner against diffusers' own single-file
conversion, diffusers' SDXL tokenizer folders (pads "<|endoftext|>" and "!") against transformers' CLIPTokenizer, the
whole prompt encoding against StableDiffusionXLPipeline.encode_prompt, and bad indices."""

import functools
import json
import shutil
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import randomize_torch as randomize
from jaxdiff.convert import clip as convert_clip
from jaxdiff.errors import CheckpointError
from jaxdiff.models import clip
from jaxdiff.models.tokenizer import BOS, EOS, build_tokenizer, load_tokenizer

CORPUS = ['a photo of an astronaut riding a horse on mars', 'a handwritten seven, written quickly.',
          'the quick brown fox jumps over the lazy dog', 'Café crème brûlée 😀 and 日本語', 'numbers 123 and 3.14'] * 4
# No "!": transformers registers tokenizer_2's "!" pad as a special token, so a typed "!" becomes id 0 there, where
# SGM (open_clip) and jaxdiff read "!</w>" (tests/test_clip.py checks the rest of that convention).
PROMPTS = ['a photo of an astronaut riding a horse on mars', '', 'A Handwritten SEVEN', 'unseen words zyxw 42',
           ' '.join(['the quick brown fox jumps over the lazy dog'] * 10)]  # > 77 tokens: truncated, eos last
VOCAB = 600  # eos 599, bos 598, "!" 0 (CORPUS supports a few more tokens: build_tokenizer stops at this)
CLIP_L = dict(hidden_size=64, num_hidden_layers=2, hidden_act='quick_gelu')  # heads = width // 64, as in the files
BIG_G = dict(hidden_size=128, num_hidden_layers=3, hidden_act='gelu', projection_dim=32)
CLIP_L_PREFIX = 'conditioner.embedders.0.transformer.'  # SGM's names: the base's two encoders, the refiner's one
BASE_G_PREFIX, REFINER_G_PREFIX = 'conditioner.embedders.1.model.', 'conditioner.embedders.0.model.'

pytestmark = pytest.mark.usefixtures('torch_one_thread')


def rel_err(a, b):
  b = np.asarray(b, np.float64)
  return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


@functools.cache
def jitted(module):
  return jax.jit(lambda params, tokens: module.apply({'params': params}, tokens))


@pytest.fixture(scope='module')
def tokenizer_folders(tmp_path_factory):
  """A diffusers SDXL pipeline's tokenizer/ (CLIP ViT-L/14's: pads with eos) and tokenizer_2/ (OpenCLIP's: pads with
  "!", also registered as a special token), with the files and forms the hub folders have (no tokenizer.json)."""
  root = tmp_path_factory.mktemp('sdxl')
  assert build_tokenizer(CORPUS, str(root / 'built'), vocab_size=VOCAB).vocab_size == VOCAB
  added = lambda content, normalized=True: dict(content=content, lstrip=False, normalized=normalized, rstrip=False,
                                                single_word=False)
  for name, pad in (('tokenizer', EOS), ('tokenizer_2', '!')):
    folder = root / name
    folder.mkdir()
    for file in ('vocab.json', 'merges.txt'):
      shutil.copy(root / 'built' / file, folder / file)
    special = dict(bos_token=added(BOS), eos_token=added(EOS), unk_token=added(EOS),
                   pad_token=pad if pad == '!' else added(EOS))
    config = dict(add_prefix_space=False, bos_token=BOS, clean_up_tokenization_spaces=True, do_lower_case=True,
                  eos_token=EOS, errors='replace', model_max_length=77, pad_token=pad, tokenizer_class='CLIPTokenizer',
                  unk_token=EOS)
    if pad == '!':
      config['added_tokens_decoder'] = {'0': dict(added('!', False), special=True),
                                        str(VOCAB - 2): dict(added(BOS), special=True),
                                        str(VOCAB - 1): dict(added(EOS), special=True)}
    (folder / 'special_tokens_map.json').write_text(json.dumps(special, indent=2))
    (folder / 'tokenizer_config.json').write_text(json.dumps(config, indent=2))
  return {name: str(root / name) for name in ('tokenizer', 'tokenizer_2')}


def transformers_model(options, *, eos_token_id=2, seed=0):
  """A random CLIPTextModel (CLIPTextModelWithProjection with a projection_dim) at 77 positions; eos_token_id 2 is
  SDXL's configs' legacy value (pools at the largest id, eos)."""
  torch = pytest.importorskip('torch', reason='the torch extra is not installed')
  transformers = pytest.importorskip('transformers', reason='transformers is not installed')
  config = transformers.CLIPTextConfig(**dict(
      vocab_size=VOCAB, intermediate_size=4 * options['hidden_size'], num_attention_heads=options['hidden_size'] // 64,
      max_position_embeddings=77, bos_token_id=VOCAB - 2, eos_token_id=eos_token_id, pad_token_id=1), **options)
  cls = transformers.CLIPTextModelWithProjection if 'projection_dim' in options else transformers.CLIPTextModel
  torch.manual_seed(seed)
  return randomize(cls(config).eval(), seed)


def reference(model, tokens):
  """transformers' outputs as SDXL reads them: hidden_states[-2] and (with a projection) text_embeds, and the rest."""
  import torch  # pylint: disable=import-outside-toplevel
  ids = torch.as_tensor(np.asarray(tokens), dtype=torch.long)
  with torch.no_grad():
    out = model(ids, output_hidden_states=True)
    ref = dict(penultimate=out.hidden_states[-2], last=out.last_hidden_state)
    if hasattr(out, 'text_embeds'):
      ref.update(projected=out.text_embeds, pooled=model.text_model(ids).pooler_output)
    else:
      ref['pooled'] = out.pooler_output
  return {k: v.numpy() for k, v in ref.items()}


def errors_against(model, section, params, tokens):
  ours = jitted(clip.create_text_encoder(section))(params, jnp.asarray(tokens, jnp.int32))  # one call, every output
  ref = reference(model, tokens)
  assert set(ours) == set(ref)
  return {k: rel_err(ours[k], ref[k]) for k in ref}


def openclip_state(model, prefix):
  """A transformers CLIPTextModelWithProjection's weights in OpenCLIP's names under `prefix`, as SGM saves bigG
  (fused in_proj, text_projection [width, dim] used as x @ P, logit_scale)."""
  import torch  # pylint: disable=import-outside-toplevel
  renames = (('embeddings.token_embedding.', 'token_embedding.'), ('embeddings.position_embedding.weight',
                                                                    'positional_embedding'),
             ('encoder.layers.', 'transformer.resblocks.'), ('layer_norm1', 'ln_1'), ('layer_norm2', 'ln_2'),
             ('self_attn.out_proj', 'attn.out_proj'), ('mlp.fc1', 'mlp.c_fc'), ('mlp.fc2', 'mlp.c_proj'),
             ('final_layer_norm', 'ln_final'))
  state, qkv = {}, {}
  for key, value in model.state_dict().items():
    key = key.removeprefix('text_model.')
    if key == 'text_projection.weight':
      state['text_projection'] = value.T
    elif '.self_attn.' in key and '.out_proj.' not in key:
      layer, proj = key.split('.self_attn.')
      name, leaf = proj.split('.')
      qkv.setdefault((layer, leaf), {})[name[0]] = value
    else:
      for old, new in renames:
        key = key.replace(old, new)
      state[key] = value
  for (layer, leaf), parts in qkv.items():
    state[f'{layer.replace("encoder.layers.", "transformer.resblocks.")}.attn.in_proj_{leaf}'] = torch.cat(
        [parts[p] for p in 'qkv'])
  state['logit_scale'] = torch.tensor(4.6)
  return {prefix + k: v.contiguous() for k, v in state.items()}


def transformers_state(model, prefix):
  import torch  # pylint: disable=import-outside-toplevel
  state = {f'{prefix}text_model.{k.removeprefix("text_model.")}': v.contiguous() for k, v in model.state_dict().items()}
  state[f'{prefix}text_model.embeddings.position_ids'] = torch.arange(77)[None]  # the old buffer SDXL files keep
  return state


@pytest.fixture(scope='module')
def sgm_files(tmp_path_factory):
  """(folder, models) with an SDXL base file (CLIP-L at embedders.0, bigG at .1, beside UNet and VAE tensors) and a
  refiner file (bigG at embedders.0)."""
  torch = pytest.importorskip('torch', reason='the torch extra is not installed')
  save_file = pytest.importorskip('safetensors.torch', reason='safetensors is not installed').save_file
  models = dict(clip_l=transformers_model(CLIP_L, seed=1), big_g=transformers_model(BIG_G, seed=2))
  other = {'model.diffusion_model.label_emb.0.0.weight': torch.zeros(8, 4),
           'first_stage_model.decoder.conv_out.bias': torch.zeros(3)}
  folder = tmp_path_factory.mktemp('sgm')
  save_file({**transformers_state(models['clip_l'], CLIP_L_PREFIX), **openclip_state(models['big_g'], BASE_G_PREFIX),
             **other}, str(folder / 'base.safetensors'))
  save_file({**openclip_state(models['big_g'], REFINER_G_PREFIX), **other}, str(folder / 'refiner.safetensors'))
  return folder, models


# ---------------------------------------------------------------------------------------------------------------------
# One call gives what SDXL reads


@pytest.mark.torch
@pytest.mark.parametrize('pad', ['!', EOS])
@pytest.mark.parametrize('eos_token_id', [2, VOCAB - 1])
def test_penultimate_and_projected_from_one_call(tmp_path, tokenizer_folders, pad, eos_token_id):
  """A gelu CLIPTextModelWithProjection folder (text_encoder_2/): hidden_states[-2] and text_embeds from one apply,
  for "!" and eos padding, SDXL's legacy eos_token_id 2 (argmax of the ids) and the newer one (first eos); pooled sits
  at the prompt's own eos."""
  model = transformers_model(BIG_G, eos_token_id=eos_token_id)
  model.save_pretrained(str(tmp_path))
  section, params = convert_clip.load_text_encoder(str(tmp_path), dict(output='penultimate'))
  assert (section.num_layers, section.projection_dim, section.eos_token_id, section.output) == (
      3, 32, VOCAB - 1, 'penultimate')
  tokenizer = load_tokenizer(tokenizer_folders['tokenizer_2'], max_length=77, pad_token=pad)
  tokens = tokenizer(PROMPTS)
  assert tokenizer.pad_id == (0 if pad == '!' else VOCAB - 1)
  errors = errors_against(model, section, params, tokens)
  print(f'pad {pad!r}, eos_token_id {eos_token_id}: fp32 relative errors ' +
        ', '.join(f'{k} {v:.1e}' for k, v in errors.items()))
  assert max(errors.values()) < 1e-5
  out = jitted(clip.create_text_encoder(section))(params, jnp.asarray(tokens))
  own_eos = [list(row).index(VOCAB - 1) for row in tokens]
  assert own_eos[1] == 1 and own_eos[-1] == 76  # "" and the truncated prompt
  np.testing.assert_array_equal(out['pooled'], np.asarray(out['last'])[np.arange(len(PROMPTS)), own_eos])


# ---------------------------------------------------------------------------------------------------------------------
# SGM single files against diffusers' single-file conversion


@pytest.mark.torch
def test_sgm_base_two_encoders(sgm_files, tokenizer_folders):
  """The base file holds two encoders: index 0 is CLIP ViT-L/14 (quick GELU, every block, no projection), index 1
  OpenCLIP bigG (GELU, every block, its projection); both with output penultimate and SGM's pad tokens. The weights are
  what diffusers' convert_ldm_clip_checkpoint / convert_open_clip_checkpoint load, and the outputs those models'."""
  transformers = pytest.importorskip('transformers', reason='transformers is not installed')
  single_file = pytest.importorskip('diffusers.loaders.single_file_utils', reason='diffusers is not installed')
  from safetensors.torch import load_file  # pylint: disable=import-outside-toplevel
  folder, models = sgm_files
  path = str(folder / 'base.safetensors')
  state = load_file(path)
  assert convert_clip.text_encoder_count(state) == 2

  # diffusers' conversions of the same file, loaded strictly into fresh models.
  clip_l = transformers.CLIPTextModel(models['clip_l'].config).eval()
  converted = single_file.convert_ldm_clip_checkpoint(state)
  missing, unexpected = clip_l.load_state_dict({k.removeprefix('text_model.'): v for k, v in converted.items()},
                                               strict=False)
  assert not missing and set(unexpected) <= {'embeddings.position_ids'}
  big_g = transformers.CLIPTextModelWithProjection(models['big_g'].config).eval()
  big_g.load_state_dict(single_file.convert_open_clip_checkpoint(big_g, state, prefix=BASE_G_PREFIX), strict=True)
  import torch  # pylint: disable=import-outside-toplevel
  assert all(torch.equal(big_g.state_dict()[k], v) for k, v in models['big_g'].state_dict().items())  # our inverse

  expected = [dict(width=64, num_layers=2, num_heads=1, activation='quick_gelu', projection_dim=0, pad_token=EOS),
              dict(width=128, num_layers=3, num_heads=2, activation='gelu', projection_dim=32, pad_token='!')]
  for index, (theirs, want, tokenizer) in enumerate(zip((clip_l, big_g), expected, ('tokenizer', 'tokenizer_2'))):
    found = convert_clip.section_from_state_dict(state, what=path, index=index)
    assert found == dict(want, kind='clip', vocab_size=VOCAB, max_length=77, eos_token_id=VOCAB - 1,
                         output='penultimate')
    section, params = convert_clip.load_text_encoder(path, index=index)
    assert {k: section[k] for k in found} == found
    tokens = load_tokenizer(tokenizer_folders[tokenizer], pad_token=section.pad_token)(PROMPTS)
    errors = errors_against(theirs, section, params, tokens)
    print(f'SDXL base encoder {index}: fp32 relative errors ' + ', '.join(f'{k} {v:.1e}' for k, v in errors.items()))
    assert max(errors.values()) < 1e-5
  # A config's own output and pad_token win over what the file suggests; its structure must agree.
  kept, _ = convert_clip.load_text_encoder(path, dict(output='last', pad_token=''), index=1)
  assert (kept.output, kept.pad_token, kept.num_layers) == ('last', '', 3)


@pytest.mark.torch
def test_sgm_refiner_one_encoder(sgm_files):
  """The refiner file holds bigG alone at embedders.0: the same section and weights as the base's index 1, and what
  diffusers' convert_open_clip_checkpoint loads."""
  transformers = pytest.importorskip('transformers', reason='transformers is not installed')
  single_file = pytest.importorskip('diffusers.loaders.single_file_utils', reason='diffusers is not installed')
  from safetensors.torch import load_file  # pylint: disable=import-outside-toplevel
  folder, models = sgm_files
  path = str(folder / 'refiner.safetensors')
  state = load_file(path)
  assert convert_clip.text_encoder_count(state) == 1
  section, params = convert_clip.load_text_encoder(path)
  base_section, base_params = convert_clip.load_text_encoder(str(folder / 'base.safetensors'), index=1)
  assert section == base_section and section.projection_dim == 32 and section.output == 'penultimate'
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(base_params)))
  theirs = transformers.CLIPTextModelWithProjection(models['big_g'].config).eval()
  theirs.load_state_dict(single_file.convert_open_clip_checkpoint(theirs, state, prefix=REFINER_G_PREFIX), strict=True)
  ours = jax.tree.map(np.asarray, convert_clip.convert_state_dict(state, clip.create_text_encoder(section)))
  np.testing.assert_array_equal(ours['text_projection']['kernel'], theirs.text_projection.weight.detach().numpy().T)
  np.testing.assert_array_equal(ours['layers_2']['qkv']['kernel'], np.concatenate(
      [getattr(theirs.text_model.encoder.layers[2].self_attn, f'{p}_proj').weight.detach().numpy() for p in 'qkv']).T)


def test_text_encoder_count():
  """Counts by the token embeddings under each prefix: SD 1.x / 2.x / bare ones hold one, SGM's weightless
  micro-conditioning embedders count nothing."""
  w = np.zeros(1, np.float32)
  assert convert_clip.text_encoder_count({'cond_stage_model.transformer.text_model.embeddings.token_embedding.weight':
                                          w, 'model.diffusion_model.out.2.bias': w}) == 1
  assert convert_clip.text_encoder_count({'cond_stage_model.model.token_embedding.weight': w}) == 1
  assert convert_clip.text_encoder_count({'token_embedding.weight': w}) == 1
  assert convert_clip.text_encoder_count({'text_model.embeddings.token_embedding.weight': w}) == 1
  assert convert_clip.text_encoder_count({'conditioner.embedders.10.model.token_embedding.weight': w,
                                          'conditioner.embedders.2.transformer.text_model.embeddings.token_embedding.'
                                          'weight': w, 'conditioner.embedders.3.model.ln_final.weight': w}) == 2
  assert convert_clip.text_encoder_count({'model.diffusion_model.out.2.bias': w}) == 0


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizers and the whole prompt encoding


@pytest.mark.parametrize('name', ['tokenizer', 'tokenizer_2'])
@pytest.mark.parametrize('max_length', [77, 12])
def test_sdxl_tokenizer_folders(tokenizer_folders, name, max_length):
  """diffusers' SDXL tokenizer/ (pads with eos) and tokenizer_2/ (pads with "!"): the same ids as transformers'
  CLIPTokenizer with padding='max_length', truncation=True, for the empty prompt and a truncated one too."""
  transformers = pytest.importorskip('transformers', reason='transformers is not installed')
  folder = tokenizer_folders[name]
  ours = load_tokenizer(folder, max_length=max_length)
  assert (ours.bos_id, ours.eos_id, ours.pad_id) == (VOCAB - 2, VOCAB - 1, 0 if name == 'tokenizer_2' else VOCAB - 1)
  ids = ours(PROMPTS)
  for cls in {transformers.CLIPTokenizer, getattr(transformers, 'CLIPTokenizerFast', transformers.CLIPTokenizer)}:
    ref = cls.from_pretrained(folder)
    assert ref.pad_token_id == ours.pad_id
    theirs = ref(PROMPTS, padding='max_length', max_length=max_length, truncation=True, return_tensors='np')
    np.testing.assert_array_equal(ids, theirs['input_ids'])
  assert list(ids[1, :3]) == [ours.bos_id, ours.eos_id, ours.pad_id] and ids[-1, -1] == ours.eos_id


@pytest.mark.torch
def test_prompt_encoding_matches_diffusers(sgm_files, tokenizer_folders):
  """Our tokenizers and the base file's two encoders give what diffusers' StableDiffusionXLPipeline.encode_prompt
  gives with transformers' tokenizers and diffusers-converted encoders: context = the two penultimate outputs
  concatenated, the pooled vector = bigG's projected output."""
  transformers = pytest.importorskip('transformers', reason='transformers is not installed')
  sdxl = pytest.importorskip('diffusers', reason='diffusers is not installed').StableDiffusionXLPipeline
  import torch  # pylint: disable=import-outside-toplevel
  folder, models = sgm_files
  path = str(folder / 'base.safetensors')
  pipe = types.SimpleNamespace(
      tokenizer=transformers.CLIPTokenizer.from_pretrained(tokenizer_folders['tokenizer']),
      tokenizer_2=transformers.CLIPTokenizer.from_pretrained(tokenizer_folders['tokenizer_2']),
      text_encoder=models['clip_l'], text_encoder_2=models['big_g'], unet=None,
      config=types.SimpleNamespace(force_zeros_for_empty_prompt=True))
  with torch.no_grad():
    context, _, pooled, _ = sdxl.encode_prompt(pipe, PROMPTS, device=torch.device('cpu'), num_images_per_prompt=1,
                                               do_classifier_free_guidance=False)
  outs = []
  for index, name in enumerate(('tokenizer', 'tokenizer_2')):
    section, params = convert_clip.load_text_encoder(path, index=index)
    tokens = load_tokenizer(tokenizer_folders[name], max_length=section.max_length, pad_token=section.pad_token)
    outs.append(jitted(clip.create_text_encoder(section))(params, jnp.asarray(tokens(PROMPTS))))
  errors = dict(context=rel_err(jnp.concatenate([o['penultimate'] for o in outs], -1), context.numpy()),
                pooled=rel_err(outs[1]['projected'], pooled.numpy()))
  print('SDXL prompt encoding vs diffusers: fp32 relative errors ' +
        ', '.join(f'{k} {v:.1e}' for k, v in errors.items()))
  assert max(errors.values()) < 1e-5


# ---------------------------------------------------------------------------------------------------------------------
# Bad inputs: one line naming the fix


@pytest.mark.torch
@pytest.mark.parametrize('case,message', [
    ('base_index_2', r'holds 2 CLIP text encoder\(s\) \(0: conditioner.embedders.0.transformer., 1: conditioner.'
                     r'embedders.1.model.\): index=2 is not one of them; use 0 or 1'),
    ('refiner_index_1', r'holds 1 CLIP text encoder\(s\) \(0: conditioner.embedders.0.model.\): index=1 is not one '
                        'of them; use 0'),
    ('negative', r'index=-1 is not one of them'),
    ('folder_index_1', r'is a transformers folder holding one text encoder: index=1 picks one of a single-file '
                       "checkpoint's; use index=0"),
    ('projection_one_block_short', r'has 3 blocks, the config 2 with projection_dim=32: the projected pooled output '
                                   'needs every block; set text_encoder.num_layers=3'),
])
def test_bad_index(sgm_files, tmp_path, case, message):
  folder, models = sgm_files
  base, refiner = str(folder / 'base.safetensors'), str(folder / 'refiner.safetensors')
  with pytest.raises(CheckpointError, match=message) as err:
    if case == 'base_index_2':
      convert_clip.load_text_encoder(base, index=2)
    elif case == 'refiner_index_1':
      convert_clip.section_from_state_dict(convert_clip.common.read_state_dict(refiner), what=refiner, index=1)
    elif case == 'negative':
      convert_clip.load_text_encoder(base, None, -1)
    elif case == 'folder_index_1':
      models['big_g'].save_pretrained(str(tmp_path))
      convert_clip.load_text_encoder(str(tmp_path), index=1)
    else:
      section = dict(convert_clip.section_from_state_dict(convert_clip.common.read_state_dict(base), index=1),
                     num_layers=2)
      convert_clip.convert_state_dict(convert_clip.common.read_state_dict(base), clip.create_text_encoder(section),
                                      index=1)
  assert '\n' not in str(err.value)
