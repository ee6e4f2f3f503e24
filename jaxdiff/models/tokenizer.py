"""The CLIP text tokenizer (byte-level BPE with an end-of-word suffix) through HF `tokenizers`, and a trainer of small
ones in the same format.

  tokenizer = load_tokenizer('stable-diffusion-v1-5/tokenizer')   # vocab.json + merges.txt, or tokenizer.json
  ids = tokenizer(['a photo of a cat'])                           # int32 [1, 77]: bos, tokens, eos, padding
  build_tokenizer(captions, 'workdir/tokenizer')                  # train one on a dataset's captions

The text is normalised (NFC, runs of whitespace to one space, lower case) and split as CLIP splits it; each piece is
mapped byte by byte to printable symbols and merged by BPE, the last symbol of a word carrying `</w>`.
"""

import json
import logging
import os

import numpy as np
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from jaxdiff.errors import ConfigError, DataError

BOS, EOS = '<|startoftext|>', '<|endoftext|>'
SUFFIX = '</w>'
# CLIP's pieces: its two special tokens, English contractions, runs of letters, single digits, runs of anything else
# that is not whitespace (whitespace only separates pieces).
PIECES = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
MERGES_HEADER = '#version: 0.2'
CLIP_VOCAB_SIZE = 49408
# Where a folder names its special tokens (transformers writes both; either may be absent).
SPECIAL_FILES = ('special_tokens_map.json', 'tokenizer_config.json')


def byte_symbols() -> list[str]:
  """The 256 byte-level symbols in CLIP's vocabulary order: bytes that print as a Latin-1 character (not space) stand
  for themselves, the rest (controls, space, no-break space, soft hyphen) for code points 256, 257, ... in byte
  order; the printable ones come first."""
  printable = [b for b in range(256) if chr(b).isprintable() and b != 0x20]
  others = [b for b in range(256) if b not in set(printable)]
  return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]


def _configure(backend: tokenizers.Tokenizer) -> tokenizers.Tokenizer:
  """CLIP's normaliser, pre-tokenizer and decoder on a BPE backend."""
  backend.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(tokenizers.Regex(r'\s+'), ' '),
                                             normalizers.Lowercase()])
  # The pieces are kept (invert=True) and the gaps between them dropped; then each piece becomes byte symbols (no
  # second split: use_regex=False).
  backend.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(tokenizers.Regex(PIECES), behavior='removed', invert=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  backend.decoder = decoders.ByteLevel()
  return backend


def _clip_backend(vocab: dict, merges: list) -> tokenizers.Tokenizer:
  # Every byte symbol is in a CLIP vocabulary, so nothing is unknown; EOS stands in as CLIP's files declare.
  backend = _configure(tokenizers.Tokenizer(models.BPE(vocab, merges, end_of_word_suffix=SUFFIX, unk_token=EOS,
                                                       fuse_unk=False)))
  backend.add_special_tokens([BOS, EOS])  # matched whole in the text, as transformers does
  return backend


def _read_json(path: str) -> dict:
  try:
    with open(path, encoding='utf-8') as f:
      return json.load(f)
  except ValueError as e:
    raise DataError(f'{path} is not valid JSON ({e}): re-create the tokenizer folder.') from None


def _special_tokens(folder: str) -> dict[str, str]:
  """bos/eos/pad token strings the folder declares (the first of SPECIAL_FILES that names each wins)."""
  found = {}
  for name in reversed(SPECIAL_FILES):
    path = os.path.join(folder, name)
    if os.path.isfile(path):
      for key, value in _read_json(path).items():
        if key in ('bos_token', 'eos_token', 'pad_token') and value is not None:
          found[key] = value['content'] if isinstance(value, dict) else str(value)
  return found


class Tokenizer:
  """Texts -> CLIP token ids [N, max_length] int32: bos, the text's tokens, eos, then pad up to max_length. A text
  with more than max_length - 2 tokens is cut so the last position is eos; one warning per call names what was cut."""

  def __init__(self, backend: tokenizers.Tokenizer, *, max_length: int, bos: str, eos: str, pad: str, source: str):
    if max_length < 2:
      raise ConfigError(f'max_length={max_length}: a CLIP token sequence needs room for bos and eos (use >= 2)')
    ids = {}
    for role, token in (('bos', bos), ('eos', eos), ('pad', pad)):
      ids[role] = backend.token_to_id(token)
      if ids[role] is None:
        raise DataError(f'The {role} token {token!r} is not in the vocabulary of {source}: give a pad token it has '
                        f'(SD 1.x pads with {EOS!r}, SD 2.x with "!").')
    backend.no_truncation()
    backend.no_padding()
    self._backend = backend
    self.max_length = max_length
    self.bos_id, self.eos_id, self.pad_id = ids['bos'], ids['eos'], ids['pad']
    self.vocab_size = backend.get_vocab_size(with_added_tokens=True)

  def decode(self, ids) -> str:
    """The text of token ids (special tokens dropped), words separated by single spaces."""
    return self._backend.decode([int(i) for i in ids]).replace(SUFFIX, ' ').strip()

  def __call__(self, texts: list[str]) -> np.ndarray:
    if isinstance(texts, str):
      raise TypeError('Tokenizer takes a list of texts, not one string: wrap it in a list')
    room = self.max_length - 2
    out = np.full((len(texts), self.max_length), self.pad_id, np.int32)
    dropped = []
    for row, encoding in zip(out, self._backend.encode_batch(list(texts), add_special_tokens=False)):
      ids = encoding.ids
      if len(ids) > room:
        dropped.append(self.decode(ids[room:]))
        ids = ids[:room]
      row[:len(ids) + 2] = [self.bos_id, *ids, self.eos_id]
    if dropped:
      shown = '; '.join(repr(d) for d in dropped[:3]) + ('; ...' if len(dropped) > 3 else '')
      logging.warning('%d of %d prompts are longer than the text encoder\'s %d tokens and were truncated; dropped: %s',
                      len(dropped), len(texts), self.max_length, shown)
    return out


def load_tokenizer(folder: str, max_length: int = 77, pad_token: str = '') -> Tokenizer:
  """The CLIP tokenizer of a folder with vocab.json + merges.txt (read with CLIP's normalisation and splitting) or a
  tokenizer.json. pad_token '' takes the folder's (special_tokens_map.json / tokenizer_config.json; else eos)."""
  vocab, merges, full = (os.path.join(folder, n) for n in ('vocab.json', 'merges.txt', 'tokenizer.json'))
  if os.path.isfile(vocab) and os.path.isfile(merges):
    try:
      backend = _clip_backend(*models.BPE.read_file(vocab, merges))
    except Exception as e:  # tokenizers raises a bare Exception on a malformed vocab.json or merges.txt
      raise DataError(f'{folder}: vocab.json / merges.txt are not a BPE vocabulary ({e}).') from None
  elif os.path.isfile(full):
    try:
      backend = tokenizers.Tokenizer.from_file(full)
    except Exception as e:
      raise DataError(f'{full} is not a tokenizers file ({e}).') from None
  else:
    absent = [n for n in ('vocab.json', 'merges.txt') if not os.path.isfile(os.path.join(folder, n))]
    raise DataError(f'{folder} is not a CLIP tokenizer folder: it needs vocab.json and merges.txt (or tokenizer.json); '
                    f'{" and ".join(absent)} {"is" if len(absent) == 1 else "are"} missing.')
  special = _special_tokens(folder) if os.path.isdir(folder) else {}
  return Tokenizer(backend, max_length=max_length, bos=special.get('bos_token', BOS),
                   eos=special.get('eos_token', EOS), pad=pad_token or special.get('pad_token', EOS), source=folder)


def build_tokenizer(texts, folder: str, *, vocab_size: int | None = None, pad_token: str = EOS,
                    max_length: int = 77) -> Tokenizer:
  """Trains a CLIP-format BPE tokenizer on `texts` (offline) and writes vocab.json, merges.txt,
  special_tokens_map.json and tokenizer_config.json to `folder`, readable by load_tokenizer and transformers'
  CLIPTokenizer; returns it loaded.

  The vocabulary is laid out as CLIP's: the 256 byte symbols, the same with `</w>`, the merges' tokens in the order
  they were learnt, then bos and eos (eos has the last id). vocab_size caps its size (None: as many merges as the
  texts support, up to CLIP's 49408 tokens).
  """
  texts = [str(t) for t in texts]
  if not texts:
    raise DataError(f'build_tokenizer: no texts to learn a vocabulary from (for {folder}): give the captions.')
  symbols = byte_symbols()
  base = symbols + [s + SUFFIX for s in symbols]
  if vocab_size is not None and vocab_size < len(base) + 2:
    raise ConfigError(f'vocab_size={vocab_size}: a CLIP vocabulary holds at least the {len(base)} byte symbols, bos '
                      f'and eos; use >= {len(base) + 2}')
  # The trainer allocates for the whole limit: bound it by what the texts can support (one merge per byte at most).
  limit = vocab_size or min(CLIP_VOCAB_SIZE, len(base) + 2 + sum(len(t.encode()) for t in texts))
  learner = _configure(tokenizers.Tokenizer(models.BPE(end_of_word_suffix=SUFFIX)))
  # The learner's own vocabulary counts at most the same 512 symbols, so it learns at least the merges kept below.
  learner.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=limit, initial_alphabet=symbols,
                                                         end_of_word_suffix=SUFFIX, show_progress=False))
  learnt = json.loads(learner.to_str())['model']['merges']
  vocab, merges = {token: i for i, token in enumerate(base)}, []
  for merge in learnt:
    left, right = merge.split(' ') if isinstance(merge, str) else merge
    if left + right not in vocab:
      if len(vocab) + 2 >= limit:
        break
      vocab[left + right] = len(vocab)
    merges.append(f'{left} {right}')
  vocab.update({BOS: len(vocab), EOS: len(vocab) + 1})

  os.makedirs(folder, exist_ok=True)
  special = dict(bos_token=BOS, eos_token=EOS, unk_token=EOS, pad_token=pad_token)
  files = {'vocab.json': vocab, 'special_tokens_map.json': special,
           'tokenizer_config.json': dict(special, tokenizer_class='CLIPTokenizer', model_max_length=max_length)}
  for name, content in files.items():
    with open(os.path.join(folder, name), 'w', encoding='utf-8') as f:
      json.dump(content, f, ensure_ascii=False, indent=None if name == 'vocab.json' else 2)
  with open(os.path.join(folder, 'merges.txt'), 'w', encoding='utf-8') as f:
    f.write('\n'.join([MERGES_HEADER, *merges]) + '\n')
  return load_tokenizer(folder, max_length=max_length)
