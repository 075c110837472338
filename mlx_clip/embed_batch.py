"""Embed a whole collection into sharded Parquet: the work behind `mlxclip embed --data SRC --out OUT_DIR`.

OUT_DIR holds
- `shard-00000.parquet`, ...: shard i covers the source's items [i * shard_size, (i + 1) * shard_size) in source order;
  columns `id` (the item's ordinal in the source), `key`, `path` (the image file's absolute path; the key for images
  inside tar shards), `caption`, `label` (null when none), and `image_embedding` and/or `text_embedding`:
  L2-normalized vectors as fixed-size lists of float16 or float32;
- `manifest.json`: model, dims, dtype, the arguments and their hash, the finished shards with their counts, every
  skipped (unreadable) image with its reason, and `"complete": true` once the source is exhausted.

Resuming: shards are cut by source ordinal (not by rows written, so a skipped image never moves a boundary), each is
written to a temp name and renamed, and the manifest is rewritten after each one; a run restarted with the same
arguments starts at the first unfinished shard. Model batches start at a shard's first item and never cross its end,
so a resumed shard is computed from exactly the batches of an uninterrupted run and the files come out byte-identical.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import mlx.core as mx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mlx_clip import cpu_streams
from mlx_clip.data import Loader, LoaderConfig, SkipCounter, open_source
from mlx_clip.io import resolve
from mlx_clip.tokenizer import trim_padding

FORMAT = 1
MODALITIES = ("images", "texts", "both")
VECTOR_DTYPES = {"float16": (np.float16, pa.float16()), "float32": (np.float32, pa.float32())}
MANIFEST = "manifest.json"


@dataclass
class EmbedArgs:
    model: str  # model dir, hub id or "builtin"
    data: str  # class folder root, CSV/TSV, JSONL or WebDataset shards
    out: str  # output dir
    modality: str = "images"  # images | texts (captions) | both
    dtype: str = "float16"  # stored vector dtype (computed in float32)
    shard_size: int = 1000  # source items per Parquet file
    batch_size: int = 64
    num_threads: int = 2  # image decoding threads
    max_bad_fraction: float = 1.0  # abort past this fraction of unreadable images; 1.0: never (they are all listed)

    def __post_init__(self):
        if self.modality not in MODALITIES:
            raise ValueError(f"modality must be one of {', '.join(MODALITIES)}, got {self.modality!r}")
        if self.dtype not in VECTOR_DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(VECTOR_DTYPES)}, got {self.dtype!r}")
        if self.shard_size < 1 or self.batch_size < 1:
            raise ValueError("shard_size and batch_size must be positive")


# ---- items: what flows from the source to the shards ----------------------------------------------------------------

@dataclass(frozen=True)
class ItemRef:
    """Rides through the Loader in each record's `key` slot, so every batch row says which source item it is.
    `str()` is the user's key: that is what the Loader's skip messages show."""

    ordinal: int
    key: str
    path: str

    def __str__(self) -> str:
        return self.key


@dataclass
class Item:
    ref: ItemRef
    caption: str = ""
    label: int | None = None
    pixels: np.ndarray | None = None
    skipped: str = ""  # why the image was unreadable; "" for a good item


def _tag(record: dict, ordinal: int) -> dict:
    image, key = record["image"], str(record["key"])
    path = os.path.abspath(image) if isinstance(image, str) else key  # absolute: search results open from anywhere
    return {**record, "key": ItemRef(ordinal, key, path)}


# (The wrapped list is `_inner`, not `records`: the Loader unwraps anything with a `records` attribute.)
class _Numbered(Sequence):
    """A map-style source whose records carry their ordinal (built on access: no copy of the record list)."""

    def __init__(self, records: Sequence[dict]):
        self._inner = records

    def __len__(self) -> int:
        return len(self._inner)

    def __getitem__(self, i):
        return _tag(self._inner[i], i)


class _NumberedStream:
    """The same for a streamed (re-iterable) source such as WebDataset shards."""

    def __init__(self, records):
        self._inner = records

    def __iter__(self):
        return (_tag(r, i) for i, r in enumerate(self._inner))


@dataclass
class SkipLog(SkipCounter):
    """A SkipCounter that keeps every skipped image and its reason, in order (the manifest lists them all)."""

    pending: list = field(default_factory=list)  # (name, reason) not yet matched to an ordinal

    def skip(self, name: str, reason: str) -> None:
        self.pending.append((name, reason))
        super().skip(name, reason)


def _image_items(records, start: int, preprocess, args: EmbedArgs) -> Iterator[Item]:
    """Every item from `start` on, in source order: decoded pixels, or the reason it was skipped."""
    skips = SkipLog(args.max_bad_fraction, min_count=100)
    config = LoaderConfig(batch_size=args.batch_size, train=False, num_threads=args.num_threads,
                          max_bad_fraction=args.max_bad_fraction)
    loader = Loader(records, preprocess, config, skips=skips)
    loader.position = start  # eval order is source order: the loader skips (without decoding) up to `start`
    expected = start
    for batch in loader:
        for ref, caption, label, pixels in zip(batch["keys"], batch["texts"], batch["labels"], batch["images"]):
            # A gap in the ordinals is images the loader skipped; their reasons were logged in the same order.
            for ordinal in range(expected, ref.ordinal):
                yield _skipped(records, ordinal, *skips.pending.pop(0))
            yield Item(ref, caption, None if label < 0 else int(label), pixels)
            expected = ref.ordinal + 1
    for name, reason in skips.pending:  # skipped images after the last good one
        yield _skipped(records, expected, name, reason)
        expected += 1


def _skipped(records, ordinal: int, name: str, reason: str) -> Item:
    # A streamed item is gone by now; its images are tar members, whose path is the key (see ItemRef).
    ref = records[ordinal]["key"] if isinstance(records, Sequence) else ItemRef(ordinal, name, name)
    return Item(ref, skipped=reason)


def _text_items(records, start: int) -> Iterator[Item]:
    """Captions only: no image is opened."""
    tagged = (records[i] for i in range(start, len(records))) if isinstance(records, Sequence) \
        else itertools.islice(iter(records), start, None)
    for r in tagged:
        yield Item(r["key"], r["caption"], r["label"])


def _model_batches(items: Iterator[Item], batch_size: int, skipped: list[Item]) -> Iterator[list[Item]]:
    """Good items in batches of `batch_size` counted from the first item of the shard; skipped ones go to `skipped`."""
    batch = []
    for item in items:
        if item.skipped:
            skipped.append(item)
            continue
        batch.append(item)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


# ---- the model ------------------------------------------------------------------------------------------------------

def _encode(model, tokenizer, batch: list[Item], modality: str) -> dict[str, mx.array]:
    """Queue the batch's embeddings (evaluated asynchronously, so the next batch is assembled meanwhile)."""
    out = {}
    if modality in ("images", "both"):
        out["image_embedding"] = model.encode_image(mx.array(np.stack([i.pixels for i in batch])), normalize=True)
    if modality in ("texts", "both"):
        out["text_embedding"] = model.encode_text(trim_padding(tokenizer([i.caption for i in batch])), normalize=True)
    mx.async_eval(out)
    return out


def _embed_shard(model, tokenizer, items: Iterator[Item], args: EmbedArgs) -> tuple[list[Item], dict, list[Item]]:
    """(good items, {column: float32 (rows, dims)}, skipped items) of one shard."""
    rows, skipped, parts, pending = [], [], [], None
    for batch in _model_batches(items, args.batch_size, skipped):
        queued = _encode(model, tokenizer, batch, args.modality)
        for item in batch:
            item.pixels = None  # copied into the model's input; a shard keeps only its rows' metadata
        if pending is not None:  # at most two batches in flight: memory stays bounded
            parts.append({k: np.array(v.astype(mx.float32)) for k, v in pending.items()})
        rows += batch
        pending = queued
    if pending is not None:
        parts.append({k: np.array(v.astype(mx.float32)) for k, v in pending.items()})
    dims = model.config.projection_dim
    columns = {k: np.concatenate([p[k] for p in parts]) if parts else np.zeros((0, dims), np.float32)
               for k in _columns(args.modality)}
    return rows, columns, skipped


def _columns(modality: str) -> list[str]:
    return {"images": ["image_embedding"], "texts": ["text_embedding"],
            "both": ["image_embedding", "text_embedding"]}[modality]


# ---- files ----------------------------------------------------------------------------------------------------------

def shard_name(index: int) -> str:
    return f"shard-{index:05d}.parquet"


def _table(rows: list[Item], vectors: dict[str, np.ndarray], dtype: str) -> pa.Table:
    np_dtype, pa_dtype = VECTOR_DTYPES[dtype]
    columns = {
        "id": pa.array([r.ref.ordinal for r in rows], pa.int64()),
        "key": pa.array([r.ref.key for r in rows], pa.string()),
        "path": pa.array([r.ref.path for r in rows], pa.string()),
        "caption": pa.array([r.caption for r in rows], pa.string()),
        "label": pa.array([r.label for r in rows], pa.int64()),
    }
    for name, v in vectors.items():
        flat = pa.array(v.astype(np_dtype).reshape(-1), pa_dtype)
        columns[name] = pa.FixedSizeListArray.from_arrays(flat, v.shape[1])
    return pa.table(columns)


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def write_shard(path: Path, table: pa.Table) -> None:
    _write_atomic(path, lambda tmp: pq.write_table(table, tmp))


def write_manifest(out: Path, manifest: dict) -> None:
    _write_atomic(out / MANIFEST, lambda tmp: tmp.write_text(json.dumps(manifest, indent=2) + "\n"))


def read_manifest(out) -> dict:
    path = Path(out) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{out}: no {MANIFEST}; not an output dir of `mlxclip embed --data`")
    return json.loads(path.read_text())


def read_vectors(out, column: str = "image_embedding") -> tuple[np.ndarray, pa.Table]:
    """All vectors of an output dir as float32 (rows, dims) and the other columns, in shard order (small dirs; the
    index builder streams shard by shard instead)."""
    tables = [pq.read_table(Path(out) / s["file"]) for s in read_manifest(out)["shards"]]
    table = pa.concat_tables(tables)
    vectors = [c for c in table.column_names if c.endswith("_embedding")]
    return column_vectors(table, column), table.drop_columns(vectors)


def column_vectors(table: pa.Table, column: str) -> np.ndarray:
    if column not in table.column_names:
        raise ValueError(f"no column {column!r}; columns: {', '.join(table.column_names)}")
    values = table.column(column).combine_chunks()
    dims = values.type.list_size
    return values.flatten().to_numpy(zero_copy_only=False).reshape(-1, dims).astype(np.float32)


# ---- the run ---------------------------------------------------------------------------------------------------------

def _file_stamp(path: Path) -> list:
    stat = path.stat()
    return [path.name, stat.st_size, stat.st_mtime_ns]


def run_identity(args: EmbedArgs, model_dir: Path, n_items: int | None) -> dict:
    """What the output depends on; a restart must match it. The model is named by its files' sizes and times (hashing
    gigabytes of weights on every start would cost more than a shard)."""
    stamps = [_file_stamp(p) for p in sorted(model_dir.glob("*")) if p.name == "config.json" or p.suffix
              in (".safetensors", ".bin")]
    data = "::".join(os.path.abspath(part) for part in args.data.split("::"))
    return {"format": FORMAT, "model": str(model_dir.resolve()), "model_files": stamps, "data": data,
            "n_items": n_items, "modality": args.modality, "dtype": args.dtype, "shard_size": args.shard_size,
            "batch_size": args.batch_size}


def _hash(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def _start_manifest(out: Path, args: EmbedArgs, identity: dict, dims: int) -> dict:
    """The manifest to continue: the one in `out` when its arguments match, else a fresh one."""
    digest = _hash(identity)
    if (out / MANIFEST).exists():
        manifest = read_manifest(out)
        if manifest.get("args_hash") != digest:
            old = manifest.get("args", {})
            diff = [f"{k}: {old.get(k)!r} then, {v!r} now" for k, v in identity.items() if old.get(k) != v]
            raise ValueError(f"{out} holds a run with other arguments ({'; '.join(diff) or 'unknown'}); "
                             "give another --out, or delete it to start over")
        for shard in manifest["shards"]:
            if not (out / shard["file"]).is_file():
                raise FileNotFoundError(f"{out / shard['file']}: listed in {MANIFEST} but missing; delete {out} "
                                        "to start over")
        return manifest
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} is not empty and has no {MANIFEST}; give an empty or new --out")
    out.mkdir(parents=True, exist_ok=True)
    return {"format": FORMAT, "model": args.model, "dims": dims, "dtype": args.dtype, "modality": args.modality,
            "columns": _columns(args.modality), "shard_size": args.shard_size, "args": identity, "args_hash": digest,
            "shards": [], "skipped": [], "rows": 0, "complete": False}


def _record_shard(manifest: dict, index: int, first: int, rows: list[Item], skipped: list[Item]) -> None:
    items = len(rows) + len(skipped)
    manifest["shards"].append({"file": shard_name(index), "first_id": first, "items": items, "rows": len(rows),
                               "skipped": len(skipped)})
    manifest["skipped"] += [{"id": s.ref.ordinal, "key": s.ref.key, "path": s.ref.path, "reason": s.skipped}
                            for s in skipped]
    manifest["rows"] += len(rows)


def embed_collection(args: EmbedArgs, progress: bool = True) -> dict:
    """Embed `args.data` into `args.out` (resuming a matching earlier run there). Returns a summary."""
    with cpu_streams.batch_parallel_mode():  # a throughput job: each batch cut over the CPU's cores
        return _embed_collection(args, progress)


def _embed_collection(args: EmbedArgs, progress: bool) -> dict:
    from tqdm import tqdm

    from mlx_clip.io import load

    out = Path(args.out)
    model_dir, _ = resolve(args.model)
    source = open_source(args.data)
    records = _NumberedStream(source.records) if source.streamed else _Numbered(source.records)
    n_items = None if source.streamed else len(records)
    model, tokenizer, preprocess = load(args.model)
    manifest = _start_manifest(out, args, run_identity(args, model_dir, n_items), model.config.projection_dim)
    for stale in out.glob(".*.tmp"):  # a temp file a killed run left behind
        stale.unlink()
    done = len(manifest["shards"])
    start = done * args.shard_size
    summary = {"out": str(out), "resumed_at_shard": done, "rows_before": manifest["rows"]}
    if manifest["complete"]:
        return summary | {"rows": manifest["rows"], "shards": done, "skipped": len(manifest["skipped"]),
                          "seconds": 0.0, "already_complete": True}

    items = _text_items(records, start) if args.modality == "texts" else _image_items(records, start, preprocess, args)
    bar = tqdm(total=n_items, initial=start, unit="item", disable=not progress, smoothing=0.1)
    began = time.perf_counter()
    for index, group in itertools.groupby(items, key=lambda item: item.ref.ordinal // args.shard_size):
        group = _counted(group, bar)
        rows, vectors, skipped = _embed_shard(model, tokenizer, group, args)
        write_shard(out / shard_name(index), _table(rows, vectors, args.dtype))
        _record_shard(manifest, index, index * args.shard_size, rows, skipped)
        write_manifest(out, manifest)
    bar.close()
    manifest["complete"] = True
    write_manifest(out, manifest)
    seconds = time.perf_counter() - began
    embedded = manifest["rows"] - summary["rows_before"]
    return summary | {"rows": manifest["rows"], "shards": len(manifest["shards"]), "skipped": len(manifest["skipped"]),
                      "seconds": seconds, "items_per_s": embedded / seconds if seconds else 0.0}


def _counted(items: Iterator[Item], bar) -> Iterator[Item]:
    for item in items:
        bar.update(1)
        yield item


def format_summary(s: dict) -> str:
    """The line `mlxclip embed --data` prints."""
    if s.get("already_complete"):
        return f"{s['out']} was already complete: {s['rows']} rows in {s['shards']} shards"
    resumed = f", resumed at shard {s['resumed_at_shard']}" if s["resumed_at_shard"] else ""
    return (f"wrote {s['out']}: {s['rows']} rows in {s['shards']} shards, {s['skipped']} images skipped (listed in "
            f"{MANIFEST}), {s['items_per_s']:.1f} items/s{resumed}")
