"""Token rows for the packing tests (tests/test_tokenizer.py, tests/test_packed_attention.py)."""

import numpy as np


def ragged_rows(lengths, width, seed=0):
    """Rows shaped as the tokenizer's: SOT, words, EOT at `lengths - 1`, zero padding; and those EOT positions."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((len(lengths), width), np.int32)
    for row, n in enumerate(lengths):
        ids[row, 0], ids[row, 1:n - 1], ids[row, n - 1] = 49406, rng.integers(1, 49405, n - 2), 49407
    return ids, np.asarray(lengths) - 1
