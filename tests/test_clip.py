"""Tests for the CLIP text encoder and tokenizer: parity with transformers' CLIPTextModel[WithProjection] through the
importer (folders, SD 1.x single files, SD 2.x OpenCLIP keys against diffusers' single-file conversion), tokenizer ids
against transformers' CLIPTokenizer, and bad inputs."""

import functools
import json
import logging
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from helpers import randomize_torch as randomize
from jaxdiff.convert import clip as convert_clip
from jaxdiff.errors import CheckpointError, ConfigError, DataError
from jaxdiff.models import clip
from jaxdiff.models.tokenizer import BOS, EOS, build_tokenizer, load_tokenizer


CORPUS = [
    'a handwritten seven', 'A handwritten ZERO, written quickly.', 'the quick brown fox jumps over the lazy dog',
    "it's what we've done; they'll see, I'm sure you'd agree", 'numbers 123 and 4567 and 3.14159 or 1,000,000',
    'Café crème brûlée à la carte, naïve façade', 'emoji 😀 🙂🙃 and 🐱‍👤 too',
    '日本語のテキスト 中文 한국어',
    'punctuation!!! (brackets) [square] {curly} <angle> "quotes"', '#hash @at $5 %50 ^ & * ~ `tick`',
    'tabs\tand\nnew lines   and   repeated spaces', 'a photo of an astronaut riding a horse on mars',
] * 4
PROMPTS = [
    'A handwritten SEVEN', 'a photo of a cat!!! 😀', '  leading and trailing   spaces  ',
    'Ünïcödé ÀCCENTS and ß',
    '東京タワー at night, 8k', "don't stop; won't stop", 'mixed CaSe WoRdS 42x', '', 'unseen words zyxwvq qqq',
    ' '.join(['a handwritten seven and a photo of a brown fox'] * 12),  # > 77 tokens: truncated
]
VOCAB = 700  # build_tokenizer's size for CORPUS: eos 699, bos 698


# PyTorch on one thread for this module (tests/conftest.py says why).
pytestmark = pytest.mark.usefixtures('torch_one_thread')


@pytest.fixture(scope='module')
def tokenizer_folder(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp('tokenizer'))
  build_tokenizer(CORPUS, folder, vocab_size=VOCAB)
  return folder


def rel_err(a, b):
  b = np.asarray(b, np.float64)
  return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


@functools.cache
def jitted(module):
  return jax.jit(lambda params, tokens: module.apply({'params': params}, tokens))


# ---------------------------------------------------------------------------------------------------------------------
# The tokenizer


def test_built_vocabulary_has_clip_layout(tokenizer_folder):
  tok = load_tokenizer(tokenizer_folder)
  with open(os.path.join(tokenizer_folder, 'vocab.json'), encoding='utf-8') as f:
    vocab = json.load(f)
  assert len(vocab) == tok.vocab_size == VOCAB
  assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.max_length) == (VOCAB - 2, VOCAB - 1, VOCAB - 1, 77)
  assert vocab['!'] == 0 and vocab['!</w>'] == 256 and vocab[BOS] == VOCAB - 2 and vocab[EOS] == VOCAB - 1
  ids = tok(['A  Handwritten'])
  assert ids.dtype == np.int32 and ids.shape == (1, 77)
  assert list(ids[0, :5]) == [tok.bos_id, vocab['a</w>'], vocab['handwritten</w>'], tok.eos_id, tok.pad_id]
  assert tok.decode(ids[0]) == 'a handwritten'


@pytest.mark.parametrize('pad', ['folder', 'override', 'folder_bang'])
def test_tokenizer_parity_with_transformers(tokenizer_folder, tmp_path, pad):
  """Ids equal transformers' CLIPTokenizer (and CLIPTokenizerFast) from the same folder, both pad conventions: SD 1.x's
  eos, SD 2.x's "!" (given to load_tokenizer, or written by build_tokenizer to the folder)."""
  transformers = pytest.importorskip('transformers', reason='transformers is not installed')
  folder, kwargs = tokenizer_folder, {}
  if pad == 'override':
    kwargs = dict(pad_token='!')
  elif pad == 'folder_bang':
    folder = str(tmp_path)
    build_tokenizer(CORPUS, folder, vocab_size=VOCAB, pad_token='!')
  ours = load_tokenizer(folder, **kwargs)
  assert ours.pad_id == (ours.eos_id if pad == 'folder' else 0)
  # transformers registers a "!" pad as a special token, so a "!" typed in a prompt becomes the pad id 0 there; jaxdiff
  # tokenizes prompt text as open_clip did when SD 2.x was trained (padding with id 0, a typed "!" as "!</w>").
  prompts = PROMPTS if pad == 'folder' else [p for p in PROMPTS if '!' not in p]
  classes = {transformers.CLIPTokenizer, getattr(transformers, 'CLIPTokenizerFast', transformers.CLIPTokenizer)}
  for cls in classes:
    ref = cls.from_pretrained(folder, **kwargs)
    assert ref.pad_token_id == ours.pad_id and len(ref) == ours.vocab_size
    theirs = ref(prompts, padding='max_length', max_length=77, truncation=True, return_tensors='np')['input_ids']
    np.testing.assert_array_equal(ours(prompts), theirs)
  assert ours(['cat!'])[0, 2] == load_tokenizer(tokenizer_folder)(['cat!'])[0, 2] != ours.pad_id
  ids = ours(PROMPTS)
  assert ids[-1, -1] == ours.eos_id and np.all(ids[:, 0] == ours.bos_id)  # truncated: eos last


def test_tokenizer_json_folder(tokenizer_folder, tmp_path):
  """A folder with only tokenizer.json (and its special tokens) gives the same ids as vocab.json + merges.txt."""
  transformers = pytest.importorskip('transformers', reason='transformers is not installed')
  transformers.CLIPTokenizer.from_pretrained(tokenizer_folder).backend_tokenizer.save(str(tmp_path / 'tokenizer.json'))
  np.testing.assert_array_equal(load_tokenizer(str(tmp_path))(PROMPTS), load_tokenizer(tokenizer_folder)(PROMPTS))


def test_truncation_warns_once_naming_the_dropped_text(tokenizer_folder, caplog):
  texts = ['a handwritten seven', 'a handwritten seven and a photo of a brown fox',
           'the quick brown fox jumps over the lazy dog']
  whole = load_tokenizer(tokenizer_folder)(texts)
  tok = load_tokenizer(tokenizer_folder, max_length=8)
  with caplog.at_level(logging.WARNING):
    ids = tok(texts)
  records = [r for r in caplog.records if r.levelno == logging.WARNING]
  assert len(records) == 1, caplog.text
  message = records[0].getMessage()
  assert message.startswith('2 of 3 prompts are longer than')
  for row in (1, 2):
    content = [i for i in whole[row, 1:] if i != tok.eos_id]
    assert repr(tok.decode(content[6:])) in message
    assert tok.decode(ids[row]) == tok.decode(content[:6])
  assert ids.shape == (3, 8) and list(ids[:, -1]) == [tok.pad_id] + [tok.eos_id] * 2
  caplog.clear()
  tok(['short'])
  assert not caplog.records


def test_tokenizer_bad_inputs(tokenizer_folder, tmp_path):
  (tmp_path / 'vocab.json').write_text('{}')
  with pytest.raises(DataError, match=f'{tmp_path} is not a CLIP tokenizer folder: it needs vocab.json and '
                                      r'merges.txt \(or tokenizer.json\); merges.txt is missing') as err:
    load_tokenizer(str(tmp_path))
  assert '\n' not in str(err.value)
  with pytest.raises(DataError, match='vocab.json and merges.txt are missing'):
    load_tokenizer(str(tmp_path / 'absent'))
  with pytest.raises(DataError, match="The pad token 'NOTATOKEN' is not in the vocabulary"):
    load_tokenizer(tokenizer_folder, pad_token='NOTATOKEN')
  with pytest.raises(ConfigError, match='vocab_size=100: a CLIP vocabulary holds at least the 512 byte symbols'):
    build_tokenizer(CORPUS, str(tmp_path / 'small'), vocab_size=100)
  with pytest.raises(TypeError, match='list of texts'):
    load_tokenizer(tokenizer_folder)('one string')


# ---------------------------------------------------------------------------------------------------------------------
# The text encoder against transformers




# Tiny transformers configs: both activations, 1-3 layers, 1-4 heads, projection on and off, the legacy eos_token_id
# 2, positions for fewer tokens than 77, pad by eos or by "!".
CONFIGS = {
    'quick_gelu_1_layer': ('CLIPTextModel', dict(hidden_size=32, num_attention_heads=2, num_hidden_layers=1), 77, EOS),
    'gelu_3_layers_projection': ('CLIPTextModelWithProjection', dict(
        hidden_size=48, num_attention_heads=3, num_hidden_layers=3, hidden_act='gelu', projection_dim=16), 24, '!'),
    'legacy_eos_projection': ('CLIPTextModelWithProjection', dict(
        hidden_size=64, num_attention_heads=4, num_hidden_layers=2, projection_dim=64, eos_token_id=2), 32, EOS),
    'gelu_one_head': ('CLIPTextModel', dict(hidden_size=16, num_attention_heads=1, num_hidden_layers=2,
                                            hidden_act='gelu'), 20, '!'),
}


def transformers_model(name, seed=0):
  torch = pytest.importorskip('torch', reason='the torch extra is not installed')
  transformers = pytest.importorskip('transformers', reason='transformers is not installed')
  cls, options, length, _ = CONFIGS[name]
  options = dict(dict(vocab_size=VOCAB, bos_token_id=VOCAB - 2, eos_token_id=VOCAB - 1, pad_token_id=VOCAB - 1,
                      max_position_embeddings=length, intermediate_size=4 * options['hidden_size']), **options)
  torch.manual_seed(seed)
  return randomize(getattr(transformers, cls)(transformers.CLIPTextConfig(**options)).eval(), seed)


def reference_outputs(model, tokens):
  import torch  # pylint: disable=import-outside-toplevel
  with torch.no_grad():
    out = model(torch.as_tensor(tokens, dtype=torch.long), output_hidden_states=True)
  ref = dict(last=out.last_hidden_state, penultimate=out.hidden_states[-2])
  if hasattr(out, 'text_embeds'):
    ref['projected'] = out.text_embeds
    with torch.no_grad():  # CLIPTextModelWithProjection returns no pooler_output: ask its text model
      ref['pooled'] = model.text_model(torch.as_tensor(tokens, dtype=torch.long)).pooler_output
  else:
    ref['pooled'] = out.pooler_output
  return {k: v.numpy() for k, v in ref.items()}


def errors_against(model, section, params, tokens):
  ours = jitted(clip.create_text_encoder(section))(params, jnp.asarray(tokens, jnp.int32))
  ref = reference_outputs(model, tokens)
  assert set(ours) == set(ref)
  return {k: rel_err(ours[k], ref[k]) for k in ref}


@pytest.mark.torch
@pytest.mark.parametrize('name', list(CONFIGS))
def test_transformers_parity(tmp_path, tokenizer_folder, name):
  """save_pretrained folder -> load_text_encoder -> last, penultimate, pooled and projected at fp32, on the ids of
  the tokenizer (max_length = the model's positions); a pytorch_model.bin folder loads the same params."""
  model = transformers_model(name)
  model.save_pretrained(str(tmp_path / 'st'))
  section, params = convert_clip.load_text_encoder(str(tmp_path / 'st'))
  _, options, length, pad = CONFIGS[name]
  assert (section.width, section.num_layers, section.num_heads, section.max_length) == (
      options['hidden_size'], options['num_hidden_layers'], options['num_attention_heads'], length)
  assert section.eos_token_id == VOCAB - 1 and section.projection_dim == options.get('projection_dim', 0) * (
      'WithProjection' in CONFIGS[name][0])
  tokens = load_tokenizer(tokenizer_folder, max_length=length, pad_token=pad)(PROMPTS)
  errors = errors_against(model, section, params, tokens)
  print(f'{name}: fp32 relative errors ' + ', '.join(f'{k} {v:.2e}' for k, v in errors.items()))
  assert max(errors.values()) < 1e-5

  import torch  # pylint: disable=import-outside-toplevel
  bin_folder = tmp_path / 'bin'
  bin_folder.mkdir()
  (bin_folder / 'config.json').write_text((tmp_path / 'st' / 'config.json').read_text())
  torch.save(model.state_dict(), bin_folder / 'pytorch_model.bin')
  bin_section, bin_params = convert_clip.load_text_encoder(str(bin_folder), section)
  assert bin_section == section
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(bin_params), jax.tree.leaves(params)))


@pytest.mark.torch
def test_sd1_single_file(tmp_path, tokenizer_folder):
  """SD 1.x's cond_stage_model.transformer.text_model.* keys (with the old position_ids buffer, beside UNet and VAE
  tensors) in a Lightning .ckpt and a .safetensors: the section is inferred from the shapes (heads = width // 64, quick
  GELU) and the outputs are the transformers model's."""
  torch = pytest.importorskip('torch', reason='the torch extra is not installed')
  transformers = pytest.importorskip('transformers', reason='transformers is not installed')
  config = transformers.CLIPTextConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                                       num_attention_heads=2, max_position_embeddings=77, bos_token_id=VOCAB - 2,
                                       eos_token_id=2, pad_token_id=VOCAB - 1)  # SD 1.5's legacy eos_token_id
  torch.manual_seed(3)
  model = randomize(transformers.CLIPTextModel(config).eval(), 3)
  prefix = 'cond_stage_model.transformer.text_model.'
  state = {prefix + k.removeprefix('text_model.'): v.contiguous() for k, v in model.state_dict().items()}
  state.update({prefix + 'embeddings.position_ids': torch.arange(77)[None], 'model.diffusion_model.out.2.bias':
                torch.zeros(4), 'first_stage_model.decoder.conv_out.bias': torch.zeros(3)})
  from safetensors.torch import save_file  # pylint: disable=import-outside-toplevel
  save_file(state, str(tmp_path / 'sd1.safetensors'))
  torch.save({'state_dict': state, 'global_step': 7}, tmp_path / 'sd1.ckpt')
  tokens = load_tokenizer(tokenizer_folder)(PROMPTS)
  loaded = [convert_clip.load_text_encoder(str(tmp_path / n)) for n in ('sd1.safetensors', 'sd1.ckpt')]
  section = loaded[0][0]
  assert {k: section[k] for k in clip.STRUCTURE} == dict(
      vocab_size=VOCAB, width=128, num_layers=2, num_heads=2, max_length=77, activation='quick_gelu',
      projection_dim=0, eos_token_id=VOCAB - 1)
  assert loaded[1][0] == section and all(np.array_equal(a, b) for a, b in
                                         zip(jax.tree.leaves(loaded[0][1]), jax.tree.leaves(loaded[1][1])))
  errors = errors_against(model, section, loaded[0][1], tokens)
  print('sd1 single file: fp32 relative errors ' + ', '.join(f'{k} {v:.2e}' for k, v in errors.items()))
  assert max(errors.values()) < 1e-5


def openclip_state(model, extra_block: dict, projection):
  """A transformers CLIPTextModel's weights in OpenCLIP's names (cond_stage_model.model.*), with one more block
  and a text projection [width, dim] as SD 2.x checkpoints hold them."""
  renames = [('embeddings.token_embedding.', 'token_embedding.'), ('embeddings.position_embedding.weight',
                                                                   'positional_embedding'),
             ('encoder.layers.', 'transformer.resblocks.'), ('layer_norm1', 'ln_1'), ('layer_norm2', 'ln_2'),
             ('self_attn.out_proj', 'attn.out_proj'), ('mlp.fc1', 'mlp.c_fc'), ('mlp.fc2', 'mlp.c_proj'),
             ('final_layer_norm', 'ln_final')]
  state, qkv = {}, {}
  for key, value in {**model.state_dict(), **extra_block}.items():
    key = key.removeprefix('text_model.')
    if '.self_attn.' in key and not key.split('.self_attn.')[1].startswith('out_proj'):
      layer, proj = key.split('.self_attn.')
      qkv.setdefault((layer, proj.split('.')[1]), {})[proj.split('_')[0]] = value
      continue
    for old, new in renames:
      key = key.replace(old, new)
    state[key] = value
  for (layer, leaf), parts in qkv.items():
    layer = layer.replace('encoder.layers.', 'transformer.resblocks.')
    state[f'{layer}.attn.in_proj_{leaf}'] = np.concatenate([parts[p].numpy() for p in 'qkv'])
  import torch  # pylint: disable=import-outside-toplevel
  state = {f'cond_stage_model.model.{k}': torch.as_tensor(np.asarray(v)).contiguous() for k, v in state.items()}
  state['cond_stage_model.model.text_projection'] = projection
  state['cond_stage_model.model.logit_scale'] = torch.tensor(4.6)
  return state


@pytest.mark.torch
def test_sd2_openclip_single_file(tmp_path, tokenizer_folder):
  """SD 2.x's OpenCLIP keys for a 24-block tower: the last block and text_projection are dropped, gelu and heads =
  width // 64 inferred, and the converted weights are what diffusers' own single-file conversion
  (convert_open_clip_checkpoint into a 23-layer CLIPTextModel) loads; the outputs are that model's."""
  torch = pytest.importorskip('torch', reason='the torch extra is not installed')
  transformers = pytest.importorskip('transformers', reason='transformers is not installed')
  single_file = pytest.importorskip('diffusers.loaders.single_file_utils', reason='diffusers is not installed')
  config = transformers.CLIPTextConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=256, num_hidden_layers=23,
                                       num_attention_heads=1, max_position_embeddings=77, hidden_act='gelu',
                                       eos_token_id=VOCAB - 1)
  torch.manual_seed(4)
  model = randomize(transformers.CLIPTextModel(config).eval(), 4)
  spare = randomize(transformers.CLIPTextModel(transformers.CLIPTextConfig(**dict(
      config.to_dict(), num_hidden_layers=1))).eval(), 5)
  extra = {k.replace('encoder.layers.0.', 'encoder.layers.23.'): v for k, v in spare.state_dict().items()
           if '.layers.0.' in k}
  state = openclip_state(model, extra, projection=torch.randn(64, 32))
  save_file = pytest.importorskip('safetensors.torch').save_file
  save_file(state, str(tmp_path / 'sd2.safetensors'))

  section, params = convert_clip.load_text_encoder(str(tmp_path / 'sd2.safetensors'))
  assert {k: section[k] for k in clip.STRUCTURE} == dict(
      vocab_size=VOCAB, width=64, num_layers=23, num_heads=1, max_length=77, activation='gelu', projection_dim=0,
      eos_token_id=VOCAB - 1)
  # diffusers' conversion of the same state dict, loaded strictly into a 23-layer CLIPTextModel.
  theirs = transformers.CLIPTextModel(config).eval()
  converted = single_file.convert_open_clip_checkpoint(theirs, state, prefix='cond_stage_model.model.')
  theirs.load_state_dict({k.removeprefix('text_model.'): v for k, v in converted.items()}, strict=True)
  tokens = load_tokenizer(tokenizer_folder, pad_token='!')(PROMPTS)
  errors = errors_against(theirs, section, params, tokens)
  print('sd2 OpenCLIP single file: fp32 relative errors ' + ', '.join(f'{k} {v:.2e}' for k, v in errors.items()))
  assert max(errors.values()) < 1e-5
  assert all(torch.equal(theirs.state_dict()[k], v) for k, v in model.state_dict().items())  # the renaming's inverse

  # A module keeping the last block and the projection reads everything (the whole OpenCLIP text tower).
  full = clip.create_text_encoder(dict(section, num_layers=24, projection_dim=32))
  full_params = convert_clip.convert_state_dict({k: v.numpy() for k, v in state.items()}, full)
  np.testing.assert_array_equal(full_params['text_projection']['kernel'], state['cond_stage_model.model.'
                                                                              'text_projection'].numpy())


# ---------------------------------------------------------------------------------------------------------------------
# The module and bad inputs


def tiny_section(**overrides):
  tiny = dict(vocab_size=64, width=32, num_layers=2, num_heads=4, max_length=12, eos_token_id=63)
  return ml_collections.ConfigDict({**clip.SECTION_DEFAULTS, **tiny, **overrides})


def test_module_shapes_outputs_and_bf16():
  encoder = clip.create_text_encoder(tiny_section(projection_dim=8))
  params = clip.init_text_encoder(encoder, jax.random.key(0))
  shapes = clip.text_encoder_shapes(encoder)
  assert jax.tree.map(lambda x: (x.shape, x.dtype), shapes) == jax.tree.map(lambda x: (x.shape, x.dtype), params)
  tokens = np.array([[62, 5, 6, 63, 63, 63, 63, 63, 63, 63, 63, 63],
                     [62, 7, 8, 9, 10, 63, 0, 0, 0, 0, 0, 0]], np.int32)
  out = jitted(encoder)(params, tokens)
  assert {k: v.shape for k, v in out.items()} == dict(last=(2, 12, 32), penultimate=(2, 12, 32), pooled=(2, 32),
                                                      projected=(2, 8))
  # pooled is `last` at the first eos, even where pad is eos too.
  np.testing.assert_array_equal(out['pooled'], np.asarray(out['last'])[[0, 1], [3, 5]])
  # Causal: a token sees only those before it, so changing the padding leaves earlier positions alone.
  other = jitted(encoder)(params, np.where(tokens == 0, 11, tokens))
  np.testing.assert_allclose(other['last'][1, :6], out['last'][1, :6], atol=1e-6)
  bf16 = clip.create_text_encoder(tiny_section(projection_dim=8), dtype=jnp.bfloat16)
  low = jitted(bf16)(params, tokens)
  assert all(v.dtype == jnp.float32 for v in low.values())
  assert max(rel_err(low[k], out[k]) for k in out) < 2e-2


@pytest.mark.parametrize('overrides,message', [
    (dict(num_heads=5), 'text_encoder.num_heads=5 does not divide text_encoder.width=32'),
    (dict(activation='relu'), "text_encoder.activation='relu': use one of quick_gelu, gelu"),
    (dict(output='pooled'), "text_encoder.output='pooled': use one of last, penultimate"),
    (dict(eos_token_id=64), 'text_encoder.eos_token_id=64 is not a token of the 64-token vocabulary'),
    (dict(kind=''), "text_encoder.kind='': set --config.text_encoder.kind=clip"),
    (dict(num_layers=0), 'text_encoder.num_layers=0: use a positive integer'),
])
def test_bad_sections(overrides, message):
  with pytest.raises(ConfigError, match=message) as err:
    clip.create_text_encoder(tiny_section(**overrides))
  assert '\n' not in str(err.value)


@pytest.mark.torch
@pytest.mark.parametrize('case,message', [
    ('width', r'The config does not describe the text encoder \(text_encoder.width: 32 in .*, 48 in the config\): '
              'fix those config keys'),
    ('misshaped', r'does not match the model: 1 mis-shaped \(encoder.layers.0.mlp.fc1.weight \(96, 32\) for '
                  r'layers_0/fc1/kernel \(32, 128\)\)'),
    ('missing', r'1 missing \(final_layer_norm.bias\)'),
    ('no_weights', 'has no model.safetensors or pytorch_model.bin'),
    ('not_clip', 'holds a BertModel .*not a CLIP text encoder'),
    ('act', "hidden_act='relu' .* is not expressed"),
    ('not_a_folder', 'No checkpoint file at'),
    ('unet_file', 'holds no CLIP text encoder'),
])
def test_bad_checkpoints(tmp_path, case, message):
  model = transformers_model('quick_gelu_1_layer')
  folder = tmp_path / 'model'
  model.save_pretrained(str(folder))
  config = json.loads((folder / 'config.json').read_text())
  from safetensors.numpy import load_file, save_file  # pylint: disable=import-outside-toplevel
  state = load_file(str(folder / 'model.safetensors'))
  section, path = None, str(folder)
  if case == 'width':
    section = tiny_section(width=48, num_layers=1, num_heads=2, max_length=77, vocab_size=VOCAB,
                           eos_token_id=VOCAB - 1)
  elif case == 'misshaped':
    state['encoder.layers.0.mlp.fc1.weight'] = np.zeros((96, 32), np.float32)
  elif case == 'missing':
    del state['final_layer_norm.bias']
  elif case == 'no_weights':
    os.remove(folder / 'model.safetensors')
  elif case == 'not_clip':
    config.update(architectures=['BertModel'], model_type='bert')
  elif case == 'act':
    config.update(hidden_act='relu')
  elif case == 'not_a_folder':
    path = str(tmp_path / 'absent.safetensors')
  elif case == 'unet_file':
    path = str(tmp_path / 'unet.safetensors')
    save_file({'model.diffusion_model.out.2.bias': np.zeros(4, np.float32)}, path)
  if case in ('misshaped', 'missing'):
    save_file(state, str(folder / 'model.safetensors'))
  (folder / 'config.json').write_text(json.dumps(config))
  with pytest.raises(CheckpointError, match=message) as err:
    convert_clip.load_text_encoder(path, section)
  assert '\n' not in str(err.value)
