"""Text side of CLIP: the BPE tokenizer (the text tower lives in visgen_jax.models)."""

from visgen_jax.text.tokenizer import (CONTEXT_LENGTH, EOT_ID, MERGES_FILE_NAMES, SOT_ID, VOCAB_SIZE,
                                       Tokenizer, find_merges_file)

__all__ = ['CONTEXT_LENGTH', 'EOT_ID', 'MERGES_FILE_NAMES', 'SOT_ID', 'VOCAB_SIZE', 'Tokenizer',
           'find_merges_file']
