"""CLIP BPE tokenizer: ids identical to open_clip's, and errors a user can act on."""

import gzip
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import import_open_clip
from visgen_jax.errors import UserError
from visgen_jax.text import EOT_ID, SOT_ID, Tokenizer, find_merges_file

TEXTS = [
    'a photo of a cat.',
    'Hello, world! How are you?? (fine) -- [ok] {yes} ...',
    'In 2024 there were 3,141,592 photos at 12:30pm; 1e-5 and 0.25%.',
    "don't, it's, we're, they've, I'm, you'll, he'd, rock'n'roll, 'quoted'",
    "IT'S A Mixed-Case TeXt With CamelCaseWords",
    "it'ſ long s: case folding makes this a contraction",
    'Tom &amp; Jerry &lt;3 &quot;cartoon&quot; &amp;amp; caf&eacute; &#39;hi&#39;',
    '<b>escaped twice &amp;amp; bold</b> and thrice &amp;amp;amp;',
    'Café naïve résumé Ångström façade Straße İstanbul',
    '日本語のテキスト 中文 한국어 العربية Ελληνικά русский',
    'emoji 😀🎉👍🏽 👨‍👩‍👧 flags 🇫🇷',
    '  many   spaces\tand\ttabs\n\nand\r\nnewlines \u00a0nbsp\u2003em  ',
    'mojibake: The Mona Lisa doesnâ€™t have eyebrows.',
    'a literal <start_of_text> and <end_of_text> in the text',
    'symbols ~!@#$%^&*()_+=`|\\/<>?',
    '',
    '   ',
    'word ' * 200,
    'supercalifragilisticexpialidocious antidisestablishmentarianism ' * 20,
]


@pytest.fixture(scope='module')
def open_clip_tokenizer():
  return import_open_clip().get_tokenizer('ViT-B-16')


@pytest.fixture(scope='module')
def merges_path():
  open_clip = import_open_clip()
  path = os.path.join(os.path.dirname(open_clip.__file__), 'bpe_simple_vocab_16e6.txt.gz')
  if not os.path.isfile(path):
    pytest.skip('the installed open_clip does not ship bpe_simple_vocab_16e6.txt.gz')
  return path


@pytest.fixture(scope='module')
def tokenizer(merges_path):
  return Tokenizer(merges_path)


def test_matches_open_clip(tokenizer, open_clip_tokenizer):
  ours = tokenizer(TEXTS)
  assert ours.dtype == np.int32 and ours.shape == (len(TEXTS), 77)
  np.testing.assert_array_equal(ours, open_clip_tokenizer(TEXTS).numpy())


@pytest.mark.parametrize('context_length', [2, 5, 16])
def test_other_context_lengths_match_open_clip(tokenizer, open_clip_tokenizer, context_length):
  np.testing.assert_array_equal(tokenizer(TEXTS, context_length=context_length),
                                open_clip_tokenizer(TEXTS, context_length=context_length).numpy())


def test_layout(tokenizer):
  ids = tokenizer(['a dog', 'word ' * 200, ''])
  assert list(ids[0, :4]) == [SOT_ID, ids[0, 1], ids[0, 2], EOT_ID] and not ids[0, 4:].any()
  assert ids[1, 0] == SOT_ID and ids[1, -1] == EOT_ID and (ids[1, 1:-1] != 0).all()
  assert list(ids[2, :2]) == [SOT_ID, EOT_ID] and not ids[2, 2:].any()
  assert tokenizer('a dog').shape == (1, 77)
  assert tokenizer([]).shape == (0, 77)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.text(max_size=40) | st.text('aAéß \'’.!1😀日-&;\n', max_size=40), min_size=1, max_size=4))
def test_random_text_matches_open_clip(tokenizer, open_clip_tokenizer, texts):
  np.testing.assert_array_equal(tokenizer(texts, context_length=24),
                                open_clip_tokenizer(texts, context_length=24).numpy())


def test_plain_text_merges_file(tmp_path, merges_path, tokenizer):
  plain = tmp_path / 'merges.txt'
  plain.write_bytes(gzip.decompress(open(merges_path, 'rb').read()))
  np.testing.assert_array_equal(Tokenizer(plain)(TEXTS), tokenizer(TEXTS))


def test_find_merges_file(tmp_path):
  checkpoint = tmp_path / 'ViT-B-16.pt'
  checkpoint.write_bytes(b'')
  with pytest.raises(UserError, match='No CLIP BPE merges file beside checkpoint'):
    find_merges_file(checkpoint)
  (tmp_path / 'merges.txt').write_text('#version: 0.2\n')
  assert find_merges_file(checkpoint) == str(tmp_path / 'merges.txt')
  (tmp_path / 'bpe_simple_vocab_16e6.txt.gz').write_bytes(b'')
  assert find_merges_file(tmp_path) == str(tmp_path / 'bpe_simple_vocab_16e6.txt.gz')


@pytest.mark.parametrize('content, message', [
    (None, 'not found'),
    (b'\x1f\x8b not really gzip', 'cannot be read'),
    (b'\xff\xfe binary', 'cannot be read'),
    (b'i n\nt h\n', "starts with 'i n'"),
    (b'#version: 0.2\ni n\nt h\n', 'it has 2 merges'),
    (b'#version: 0.2\ni n\nt h e\n' + b'a b\n' * 48894, "line 3 is 't h e'"),
    (b'#version: 0.2\n' + b'a b\n' * 48894, 'repeats merges'),
])
def test_bad_merges_file(tmp_path, content, message):
  path = tmp_path / 'bpe_simple_vocab_16e6.txt'
  if content is not None:
    path.write_bytes(content)
  with pytest.raises(UserError, match=message):
    Tokenizer(path)


def test_context_length_too_short(tokenizer):
  with pytest.raises(UserError, match='context_length=1'):
    tokenizer(['a'], context_length=1)
