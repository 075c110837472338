"""CLIP byte-level BPE tokenizer, id for id the same as open_clip's `SimpleTokenizer` (clean="lower").

text -> ftfy fix, html unescape (twice), whitespace collapse, lower-case -> regex split into words
-> utf-8 bytes mapped to printable characters -> BPE merges (`</w>` marks a word's end) -> ids.
A row is [sot, ids..., eot] cut to the context length (eot kept last) and zero-padded, as open_clip does.
"""

from __future__ import annotations

import gzip
import heapq
import html
import json
from functools import lru_cache
from importlib import resources
from pathlib import Path

import ftfy
import mlx.core as mx
import numpy as np
import regex

DEFAULT_CONTEXT_LENGTH = 77
# Special tokens are kept under open_clip's spellings inside; vocab.json files use Hugging Face's.
SOT, EOT = "<start_of_text>", "<end_of_text>"
HF_SOT, HF_EOT = "<|startoftext|>", "<|endoftext|>"
_FROM_HF, _TO_HF = {HF_SOT: SOT, HF_EOT: EOT}, {SOT: HF_SOT, EOT: HF_EOT}
GZ_VOCAB = "bpe_simple_vocab_16e6.txt.gz"
_GZ_MERGES = 49152 - 256 - 2  # OpenAI/open_clip use only the first 48,894 merges of the gz file
_WORD_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
_CACHE_MAX = 1 << 16  # words cached before the BPE cache is reset (bounds memory on huge corpora)
_CACHE_WORD_CHARS = 64  # longer words are not cached, so hostile input cannot fill memory with a few huge keys
_MAX_SANE_LENGTH = 1 << 20  # HF writes model_max_length = int(1e30) for "no limit": not a context length


def trim_padding(ids, multiple: int = 16, pad_id: int = 0):
    """`ids` (B, L) cut after the last column that holds a non-pad token in any row, rounded up to `multiple` (never
    past L); numpy in, numpy out, mx in, mx out.

    Exact for the text tower: attention is causal and the pooled token (EOT, or the first EOS) comes before the
    padding, so the padded positions cannot change any output, and not computing them saves most of the tower's work
    on real captions (12 tokens in a 77-token row: 16 positions run instead of 77). Rounding to `multiple` keeps the
    number of distinct shapes, and so of compiled-step traces, at five for a 77-token context."""
    host = np.asarray(ids)
    if host.ndim != 2:
        raise ValueError(f"token ids must be (batch, length), got shape {host.shape}")
    used = np.flatnonzero((host != pad_id).any(axis=0))
    last = int(used[-1]) + 1 if used.size else 1
    keep = min(host.shape[1], -(-last // multiple) * multiple)
    if keep == host.shape[1]:
        return ids
    return ids[:, :keep]


def pack_rows(ids, eot, parts: int = 1, multiple: int = 32, max_length: int = 512,
              windowed: bool = True) -> dict | None:
    """Token rows packed for the text tower: `ids` (B, L) and each row's pooled position `eot` (B,) -> the rows shared
    out over `parts` groups of B / parts rows (longest first, each to the group with the fewest tokens so far, so the
    groups come out about equally long), a group's rows laid one after another, each row up to and including its pooled
    token, zero-padded to a shared length T (a multiple of `multiple`); numpy in, numpy out:

      ids (parts, T), positions (parts, T) (a token's place in its own row), segments (parts, T) (the row's slot in
      its group, -1 on padding), eot (parts, B / parts) (where each slot's pooled token landed), rows (B,) (where row
      r's features come out when the groups' outputs are concatenated), and, where it applies, window (parts, T / s,
      s, 2s) float32 (mlx_clip.packed_attention: each block of s tokens' additive mask over the block before it and
      its own, 0 where a token may look, -inf elsewhere).

    Exact for the text tower when a token attends only to its own row's tokens up to itself (`segments`): the pooled
    token never sees what followed it, so dropping that changes nothing, and the dense layers then run on real tokens
    only (5-30-word captions fill ~60% of their padded rows). The window applies when `windowed`, every row is at
    most s + 1 tokens for a block s (a multiple of `multiple` dividing T) and T is at least 3s: attention then costs
    T x 2s instead of T x T. None when B does not split into `parts` equal groups, packing would not shorten the work
    (parts x T not below B x L), or, without a window, T would pass `max_length` (a group's attention is then T x T:
    past ~512 tokens it costs more than the padding it saves)."""
    ids, eot = np.asarray(ids), np.asarray(eot)
    batch, length = ids.shape
    if parts < 1 or batch == 0 or batch % parts:
        return None
    size, lengths = batch // parts, eot.astype(np.int64) + 1
    members, used = [[] for _ in range(parts)], np.zeros(parts, np.int64)
    for row in np.argsort(-lengths, kind="stable"):
        group = min((g for g in range(parts) if len(members[g]) < size), key=lambda g: used[g])
        members[group].append(int(row))
        used[group] += lengths[row]
    total = -(-int(used.max()) // multiple) * multiple
    block = _window_block(int(lengths.max()), total, multiple) if windowed else 0
    if total * parts >= batch * length or (total > max_length and not block):
        return None
    out = {k: np.zeros((parts, total), np.int32) for k in ("ids", "positions")}
    out["segments"] = np.full((parts, total), -1, np.int32)
    out["eot"], out["rows"] = np.zeros((parts, size), np.int32), np.zeros(batch, np.int32)
    for group, rows in enumerate(members):
        start = 0
        for slot, row in enumerate(sorted(rows)):  # original order inside a group
            n = int(lengths[row])
            out["ids"][group, start:start + n] = ids[row, :n]
            out["positions"][group, start:start + n] = np.arange(n)
            out["segments"][group, start:start + n] = slot
            out["eot"][group, slot] = start + n - 1
            out["rows"][row] = group * size + slot
            start += n
    if block:
        out["window"] = _window_mask(out["segments"], block)
    return out


def _window_block(longest: int, total: int, multiple: int) -> int:
    """The smallest block s (a multiple of `multiple` dividing `total`) holding any row's earlier tokens within the
    block before (rows of at most s + 1 tokens); 0 where the window would not cut the scores (T under 3s)."""
    units, k = total // multiple, max(1, -(-(longest - 1) // multiple))
    while units % k:
        k += 1
    return multiple * k if units // k >= 3 else 0


def _window_mask(segments: np.ndarray, block: int) -> np.ndarray:
    """(parts, T) row slots -> (parts, T / s, s, 2s) additive masks: a query sees a key of its own slot (padding: -1)
    at or before it; the first block's "block before" is no token (slot -2)."""
    parts, total = segments.shape
    own = segments.reshape(parts, -1, block)
    before = np.concatenate([np.full((parts, 1, block), -2, own.dtype), own[:, :-1]], axis=1)
    keys = np.concatenate([before, own], axis=2)  # (parts, nb, 2s)
    place = np.arange(total).reshape(-1, block)
    key_place = np.concatenate([place - block, place], axis=1)
    seen = (own[..., :, None] == keys[..., None, :]) & (key_place[:, None, :] <= place[:, :, None])
    return np.where(seen, 0.0, -np.inf).astype(np.float32)


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """OpenAI's byte -> printable char table (BPE never sees whitespace); its order is the vocab's first 256."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in table]
    table.update({b: chr(256 + n) for n, b in enumerate(others)})
    return table


def clean_text(text: str) -> str:
    """open_clip's "lower" cleaning: fix mojibake, unescape HTML twice (for `&amp;amp;`), collapse whitespace."""
    text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return " ".join(text.split()).lower()


def vocab_from_merges(merges: list[tuple[str, str]]) -> dict[str, int]:
    """The encoder OpenAI builds from a merge list: bytes, bytes + `</w>`, one token per merge, sot, eot."""
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [SOT, EOT]
    return {token: i for i, token in enumerate(tokens)}


class Tokenizer:
    """Text -> CLIP token ids. `tokenizer(["a dog", "a cat"])` -> int32 (B, context_length)."""

    def __init__(self, encoder: dict[str, int], merges: list[tuple[str, str]], context_length: int = 77):
        self.encoder = {_FROM_HF.get(token, token): int(i) for token, i in encoder.items()}
        self.merges = [_as_pair(m) for m in merges]
        _check_vocab(self.encoder, self.merges)
        self.decoder = {i: token for token, i in self.encoder.items()}
        self.bpe_ranks = {pair: rank for rank, pair in enumerate(self.merges)}
        self._context_length = int(context_length)
        self._byte_encoder = bytes_to_unicode()
        self._byte_decoder = {c: b for b, c in self._byte_encoder.items()}
        # Special tokens written literally in the text become their ids, as in open_clip.
        specials = f"{regex.escape(SOT)}|{regex.escape(EOT)}"
        self._pattern = regex.compile(f"{specials}|{_WORD_PATTERN}", regex.IGNORECASE)
        self._cache: dict[str, list[int]] = {}

    @classmethod
    def default(cls, context_length: int = DEFAULT_CONTEXT_LENGTH) -> "Tokenizer":
        """The OpenAI CLIP vocabulary packaged with mlx_clip (same file open_clip ships)."""
        return cls(*_packaged_vocab(), context_length=context_length)

    @classmethod
    def from_gz(cls, path: str | Path, context_length: int = DEFAULT_CONTEXT_LENGTH) -> "Tokenizer":
        """Read an OpenAI `bpe_simple_vocab_16e6.txt.gz` merge file (the vocab is derived from the merges)."""
        def load():
            with gzip.open(path, "rt", encoding="utf-8") as f:
                lines = f.read().split("\n")[1 : _GZ_MERGES + 1]  # line 0 is a version header
            merges = [_as_pair(line.split()) for line in lines]
            return cls(vocab_from_merges(merges), merges, context_length)

        return _naming(path, load)

    @classmethod
    def from_dir(cls, path: str | Path, context_length: int | None = None) -> "Tokenizer":
        """Load from a model dir: HF `vocab.json` + `merges.txt`, else HF `tokenizer.json`, else OpenAI's
        `bpe_simple_vocab_16e6.txt.gz`, else the packaged vocab. Context length: argument, tokenizer_config.json, 77."""
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"tokenizer dir {path} does not exist")
        length = context_length or _config_context_length(path / "tokenizer_config.json") or DEFAULT_CONTEXT_LENGTH
        vocab, merges, hf_json, gz = (path / n for n in ("vocab.json", "merges.txt", "tokenizer.json", GZ_VOCAB))
        if vocab.is_file() and merges.is_file():
            load = lambda: cls(_vocab_ids(_read_json(vocab)), _read_merges(merges), length)  # noqa: E731
            return _naming(f"{vocab} / {merges}", load)
        if hf_json.is_file():  # transformers >= 5 save_pretrained writes only this file
            return _naming(hf_json, lambda: cls(*_read_tokenizer_json(hf_json), length))
        if gz.is_file():
            return cls.from_gz(gz, length)
        return cls.default(length)

    def save(self, out_dir: str | Path) -> None:
        """Write the files `transformers.CLIPTokenizer.from_pretrained` (and `from_dir`) read."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        vocab = {_TO_HF.get(token, token): i for token, i in self.encoder.items()}
        specials = {"bos_token": HF_SOT, "eos_token": HF_EOT, "unk_token": HF_EOT, "pad_token": HF_EOT}
        config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": self.context_length,
                  "do_lower_case": True, "errors": "replace", "add_prefix_space": False, **specials}
        files = {"vocab.json": json.dumps(vocab, ensure_ascii=False),
                 "merges.txt": "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in self.merges),
                 "tokenizer_config.json": json.dumps(config, indent=2),
                 "special_tokens_map.json": json.dumps(specials, indent=2)}
        for name, text in files.items():
            (out / name).write_text(text, encoding="utf-8")

    @property
    def sot_token_id(self) -> int:
        return self.encoder[SOT]

    @property
    def eot_token_id(self) -> int:
        return self.encoder[EOT]

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    @property
    def context_length(self) -> int:
        return self._context_length

    def encode(self, text: str) -> list[int]:
        """BPE ids of `text`, without sot/eot and without truncation."""
        ids: list[int] = []
        for word in self._pattern.findall(clean_text(text)):
            ids += self._word_ids("".join(self._byte_encoder[b] for b in word.encode("utf-8")))
        return ids

    def decode(self, ids) -> str:
        """Ids (list, np or mx array) -> text, words separated by spaces; bad utf-8 becomes U+FFFD."""
        chars = "".join(self.decoder[int(i)] for i in np.asarray(ids).reshape(-1))
        text = bytearray(self._byte_decoder[c] for c in chars).decode("utf-8", errors="replace")
        return text.replace("</w>", " ")

    def tokenize_numpy(self, texts: str | list[str], context_length: int | None = None) -> np.ndarray:
        """int32 (B, L) rows [sot, ids..., eot, 0...]; over-long rows are cut with eot kept last."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        length = context_length or self._context_length
        if length < 1:
            raise ValueError(f"context_length must be >= 1, got {length}")
        out = np.zeros((len(texts), length), dtype=np.int32)
        for row, text in zip(out, texts):
            ids = [self.sot_token_id, *self.encode(text)][: length - 1] + [self.eot_token_id]
            row[: len(ids)] = ids
        return out

    def __call__(self, texts: str | list[str], context_length: int | None = None) -> mx.array:
        return mx.array(self.tokenize_numpy(texts, context_length))

    def _word_ids(self, word: str) -> list[int]:
        ids = self._cache.get(word)
        if ids is None:
            special = word in (SOT, EOT)  # a special token written in the text is one id, never BPE'd
            ids = [self.encoder[word]] if special else [self.encoder[token] for token in self._bpe(word)]
            if len(word) <= _CACHE_WORD_CHARS:
                if len(self._cache) >= _CACHE_MAX:
                    self._cache.clear()
                self._cache[word] = ids
        return ids

    def _bpe(self, word: str) -> list[str]:
        """Merge adjacent symbols, lowest-ranked pair first, until no known pair is left.

        Same result as open_clip's loop (find the lowest-ranked pair in the whole word, merge all its occurrences
        left to right, repeat), but O(n log n) instead of O(n^2) so one huge word cannot stall the server: a heap
        of (rank, position) over a doubly linked list of symbols; entries made stale by a merge are skipped on pop.
        """
        symbols: list[str | None] = [*word[:-1], word[-1] + "</w>"]
        n, ranks = len(symbols), self.bpe_ranks
        nxt, prv = [*range(1, n), -1], [*range(-1, n - 1)]  # linked list over positions; -1 ends it

        def rank_at(i: int) -> int | None:  # rank of the pair starting at live position i, None if unmergeable
            j = nxt[i]
            return ranks.get((symbols[i], symbols[j])) if j >= 0 else None

        heap = [(r, i) for i in range(n - 1) if (r := rank_at(i)) is not None]
        heapq.heapify(heap)
        while heap:
            rank, merged = heap[0][0], []
            # One rank at a time, as open_clip does: pop its occurrences leftmost first (an overlapped one is stale),
            # and only then queue the pairs those merges made, which may rank lower in an arbitrary merge list.
            while heap and heap[0][0] == rank:
                i = heapq.heappop(heap)[1]
                if symbols[i] is None or rank_at(i) != rank:
                    continue  # stale: i was absorbed, or a neighbour changed since this entry was queued
                j = nxt[i]
                symbols[i], symbols[j] = symbols[i] + symbols[j], None
                nxt[i] = nxt[j]
                if nxt[j] >= 0:
                    prv[nxt[j]] = i
                merged.append(i)
            for i in merged:
                for left in (prv[i], i):
                    if left >= 0 and (r := rank_at(left)) is not None:
                        heapq.heappush(heap, (r, left))
        out, i = [], 0  # position 0 is never absorbed (only right-hand symbols are)
        while i >= 0:
            out.append(symbols[i])
            i = nxt[i]
        return out


# -- file helpers ------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _packaged_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    with resources.as_file(resources.files("mlx_clip") / "assets" / GZ_VOCAB) as path:
        tok = Tokenizer.from_gz(path)
    return tok.encoder, tok.merges


def _as_pair(merge) -> tuple[str, str]:
    pair = tuple(merge)
    if len(pair) != 2 or not all(isinstance(s, str) and s for s in pair):
        raise ValueError(f"a merge must be two non-empty strings, got {merge!r}")
    return pair


def _read_merges(path: Path) -> list[tuple[str, str]]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return [_as_pair(line.split()) for line in lines if line.strip() and not line.startswith("#version")]


def _read_json(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def _read_tokenizer_json(path: Path) -> tuple[dict[str, int], list]:
    data = _read_json(path)
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict) or model.get("type") != "BPE":
        raise ValueError(f"{path} holds no BPE model")
    merges = [m.split(" ") if isinstance(m, str) else m for m in model.get("merges", [])]  # "a b" or ["a", "b"]
    return _vocab_ids(model.get("vocab")), merges


def _vocab_ids(vocab) -> dict[str, int]:
    if not isinstance(vocab, dict) or not all(isinstance(i, int) for i in vocab.values()):
        raise ValueError("the vocab must be a JSON object mapping token -> int id")
    return vocab


def _config_context_length(path: Path) -> int | None:
    if not path.is_file():
        return None
    config = _naming(path, lambda: _read_json(path))
    for key in ("context_length", "model_max_length"):
        value = config.get(key) if isinstance(config, dict) else None
        if isinstance(value, int) and 0 < value <= _MAX_SANE_LENGTH:
            return value
    return None


def _check_vocab(encoder: dict[str, int], merges: list[tuple[str, str]]) -> None:
    """Every token BPE can produce must have an id, so `encode` never fails on some rare text."""
    symbols = list(bytes_to_unicode().values())
    needed = [SOT, EOT, *symbols, *(s + "</w>" for s in symbols), *("".join(m) for m in merges)]
    missing = [token for token in needed if token not in encoder]
    if missing:
        raise ValueError(f"vocab lacks {len(missing)} tokens BPE needs, e.g. {missing[:5]}")


def _naming(source, load):
    """Run `load`, re-raising a malformed-file failure as a ValueError that names the file."""
    try:
        return load()
    except (ValueError, OSError, EOFError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"malformed tokenizer vocab {source}: {e}") from e

