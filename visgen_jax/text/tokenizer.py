"""CLIP's byte-level BPE tokenizer, giving the same ids as OpenAI CLIP / open_clip.

The merges list is third-party data and is not bundled: pass the path of
`bpe_simple_vocab_16e6.txt.gz` (it ships inside the open_clip package and beside
OpenAI's CLIP code) or of a Hugging Face CLIP `merges.txt` (the same merges
under a '#version: 0.2' header), or let
`find_merges_file` find one beside a checkpoint.

Text goes through ftfy, two rounds of HTML unescaping, whitespace collapsing and
lowercasing; it is split into words, each word's UTF-8 bytes are mapped to
printable characters, the last one marked with `</w>`, and merged greedily by
merge rank.
"""

import functools
import gzip
import html
import importlib.util
import os
import zlib
from collections.abc import Sequence

import ftfy
import numpy as np
import regex

from visgen_jax.errors import UserError

SOT_ID = 49406  # <start_of_text>
EOT_ID = 49407  # <end_of_text>; the largest id, so argmax finds it (CLIP's text pooling)
VOCAB_SIZE = 49408
CONTEXT_LENGTH = 77

MERGES_FILE_NAMES = ('bpe_simple_vocab_16e6.txt.gz', 'bpe_simple_vocab_16e6.txt', 'merges.txt')

_SPECIAL_TOKENS = ('<start_of_text>', '<end_of_text>')
# 48894: the vocab minus 256 byte tokens, their 256 end-of-word forms and the 2 special tokens.
_NUM_MERGES = VOCAB_SIZE - 2 * 256 - len(_SPECIAL_TOKENS)
_EOW = '</w>'

# Special tokens first so that their literal text maps to their ids; then English
# contractions, letter runs, single digits, runs of anything else but whitespace.
# IGNORECASE matters beyond lowercasing: e.g. "'ſ" (long s) case-folds to "'s".
_WORD_PATTERN = regex.compile(
    '|'.join(regex.escape(t) for t in _SPECIAL_TOKENS)
    + r"""|'(?:s|t|re|ve|m|ll|d)|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE)


def _byte_alphabet() -> tuple[list[str], dict[int, str]]:
  """The printable character standing for each byte 0..255: in vocab order, and by byte.

  Bytes that are printable Latin-1 stand for themselves; the 68 others (controls,
  space, NBSP, soft hyphen) take the code points 256, 257, ... in byte order, so
  that no BPE symbol contains whitespace or a control character. The vocab lists
  the printable bytes first, then the remapped ones.
  """
  printable = [*range(ord('!'), ord('~') + 1), *range(ord('¡'), ord('¬') + 1),
               *range(ord('®'), ord('ÿ') + 1)]
  kept = set(printable)
  remapped = [b for b in range(256) if b not in kept]
  chars = {b: chr(b) for b in printable}
  chars.update({b: chr(256 + n) for n, b in enumerate(remapped)})
  return [chars[b] for b in printable + remapped], chars


def _read_merges(path: str) -> list[tuple[str, str]]:
  """The first `_NUM_MERGES` merge pairs of a CLIP merges file (.txt or .txt.gz)."""
  expected = (f"expected a header line with '#version' then at least {_NUM_MERGES} lines "
              'of two space-separated symbols (bpe_simple_vocab_16e6.txt.gz or merges.txt)')
  if not os.path.isfile(path):
    raise UserError(f'CLIP BPE merges file not found at {path!r}: pass the path of '
                    'bpe_simple_vocab_16e6.txt.gz (it ships inside the open_clip package) '
                    'or of a CLIP merges.txt.')
  try:
    with open(path, 'rb') as f:
      data = f.read()
    if data[:2] == b'\x1f\x8b':  # gzip magic, whatever the file is called
      data = gzip.decompress(data)
    # No BPE symbol holds a line break (bytes are remapped to printable characters),
    # so splitlines is safe and also takes CRLF files.
    lines = data.decode('utf-8').splitlines()
  except (OSError, EOFError, zlib.error, UnicodeDecodeError) as e:
    raise UserError(f'CLIP BPE merges file {path!r} cannot be read ({e}); {expected}.') from e
  # The header is '#version: 0.2' in merges.txt, '"bpe_simple_vocab_16e6.txt#version: 0.2' in open_clip's.
  header = lines[0] if lines else ''
  if '#version' not in header:
    raise UserError(f'CLIP BPE merges file {path!r} starts with {header[:40]!r}; {expected}.')
  merges = [tuple(line.split(' ')) for line in lines[1:1 + _NUM_MERGES]]
  bad = next((i for i, m in enumerate(merges) if len(m) != 2 or not all(m)), None)
  if len(merges) < _NUM_MERGES or bad is not None:
    where = f'line {bad + 2} is {lines[bad + 1]!r}' if bad is not None else f'it has {len(merges)} merges'
    raise UserError(f'CLIP BPE merges file {path!r} is not a CLIP merges list ({where}); {expected}.')
  return merges


def _clean(text: str) -> str:
  # Unescaped twice as in CLIP: web captions are often escaped twice.
  text = html.unescape(html.unescape(ftfy.fix_text(text)))
  return ' '.join(text.split()).lower()


class Tokenizer:
  """CLIP text → int32 ids [N, context_length]: SOT, BPE ids, EOT, zero padding.

  Text longer than the context is cut, keeping EOT as the last id (as CLIP).

    tokenizer = Tokenizer(find_merges_file('/ckpts/clip_vit_b16.pt'))
    ids = tokenizer(['a photo of a cat.', 'a dog'])  # [2, 77]
  """

  def __init__(self, merges_path: str | os.PathLike, cache_size: int = 1 << 16):
    merges_path = os.fspath(merges_path)
    merges = _read_merges(merges_path)
    alphabet, self._byte_chars = _byte_alphabet()
    vocab = alphabet + [c + _EOW for c in alphabet] + [a + b for a, b in merges] + list(_SPECIAL_TOKENS)
    self._ids = {token: i for i, token in enumerate(vocab)}
    self._ranks = {pair: i for i, pair in enumerate(merges)}
    if len(self._ids) != VOCAB_SIZE:
      raise UserError(f'CLIP BPE merges file {merges_path!r} repeats merges: its first {_NUM_MERGES} '
                      f'merges must give {VOCAB_SIZE} distinct tokens, as bpe_simple_vocab_16e6.txt.gz.')
    # Words repeat a lot in captions and class prompts; BPE is the slow part.
    self._word_ids = functools.lru_cache(maxsize=cache_size)(self._word_ids_uncached)

  def _bpe(self, symbols: list[str]) -> list[str]:
    """Merge adjacent symbols, lowest merge rank first, until no pair has a rank."""
    while len(symbols) > 1:
      ranked = [(self._ranks[p], p) for p in zip(symbols, symbols[1:]) if p in self._ranks]
      if not ranked:
        break
      first, second = min(ranked)[1]
      merged, i = [], 0
      while i < len(symbols):  # every non-overlapping occurrence, left to right
        if i + 1 < len(symbols) and symbols[i] == first and symbols[i + 1] == second:
          merged.append(first + second)
          i += 2
        else:
          merged.append(symbols[i])
          i += 1
      symbols = merged
    return symbols

  def _word_ids_uncached(self, word: str) -> tuple[int, ...]:
    if word in _SPECIAL_TOKENS:
      return (self._ids[word],)
    symbols = [self._byte_chars[b] for b in word.encode('utf-8')]
    symbols[-1] += _EOW
    return tuple(self._ids[s] for s in self._bpe(symbols))

  def encode(self, text: str) -> list[int]:
    """BPE ids of one text, without SOT/EOT and without truncation."""
    return [i for word in _WORD_PATTERN.findall(_clean(text)) for i in self._word_ids(word)]

  def __call__(self, texts: Sequence[str] | str, context_length: int = CONTEXT_LENGTH) -> np.ndarray:
    """int32 [len(texts), context_length]; a single string counts as one text."""
    if context_length < 2:
      raise UserError(f'context_length={context_length} is too short: it must be at least 2 '
                      '(start and end tokens).')
    if isinstance(texts, str):
      texts = [texts]
    out = np.zeros((len(texts), context_length), np.int32)
    for row, text in enumerate(texts):
      ids = [SOT_ID, *self.encode(text)[:context_length - 2], EOT_ID]
      out[row, :len(ids)] = ids
    return out


def find_merges_file(checkpoint_path_or_dir: str | os.PathLike) -> str:
  """The CLIP merges file in a checkpoint's directory (or in the directory given)."""
  path = os.fspath(checkpoint_path_or_dir)
  directory = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
  for name in MERGES_FILE_NAMES:
    candidate = os.path.join(directory, name)
    if os.path.isfile(candidate):
      return candidate
  raise UserError(f'No CLIP BPE merges file beside checkpoint {path!r}: looked in {directory!r} '
                  f'for {", ".join(MERGES_FILE_NAMES)}; put one there (bpe_simple_vocab_16e6.txt.gz '
                  'ships inside the open_clip package) or pass its path.')


def installed_merges_file() -> str | None:
  """The merges file inside an installed open_clip_torch package, if any.

  Found without importing open_clip (which would import torch): launch/setup.sh
  installs the package without dependencies just for this file.
  """
  spec = importlib.util.find_spec('open_clip')
  for directory in (spec.submodule_search_locations or []) if spec else []:
    candidate = os.path.join(directory, MERGES_FILE_NAMES[0])
    if os.path.isfile(candidate):
      return candidate
  return None
