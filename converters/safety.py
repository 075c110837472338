"""What we refuse when reading checkpoints, and how we write them.

Refused: pickles that would execute code (only `torch.load(weights_only=True)`, never a fallback), malformed
safetensors headers (checked before the `safetensors` library maps the file), and paths that resolve outside the
model dir. Every refusal is a `CheckpointError` naming the file, the tensor/field, and what was expected.
torch is imported only inside `load_torch_checkpoint`, so safetensors checkpoints need no torch.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import secrets
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

MAX_HEADER_BYTES = 100 * 1024 * 1024
ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "U16": 2, "I16": 2,
            "F16": 2, "BF16": 2, "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8, "C64": 8}
# Dtypes numpy holds natively; BF16 we upcast ourselves; the F8 formats we validate but do not convert.
NUMPY_DTYPES = {"BOOL": np.bool_, "U8": np.uint8, "I8": np.int8, "U16": np.uint16, "I16": np.int16,
                "F16": np.float16, "U32": np.uint32, "I32": np.int32, "F32": np.float32, "U64": np.uint64,
                "I64": np.int64, "F64": np.float64, "C64": np.complex64}
SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
WRAPPER_KEYS = ("state_dict", "model", "module")  # open_clip, trainer and DDP checkpoint wrappers


class CheckpointError(ValueError):
    """A checkpoint we refuse to read or write; the message names the file and what was expected."""


def check_inside(path, root) -> Path:
    """Resolve symlinks and refuse `path` unless its real location is inside the real `root`."""
    real_root = Path(os.path.realpath(root))
    if not real_root.is_dir():
        raise CheckpointError(f"{root}: model dir does not exist (expected a directory containing {path})")
    real = Path(os.path.realpath(path))
    if not real.is_relative_to(real_root):
        raise CheckpointError(f"{path}: resolves to {real}, outside the model dir {real_root}; refusing to read it")
    return real


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)  # JSON true/false must not pass as 1/0


def _no_duplicate_keys(pairs):  # parsers disagree on which duplicate wins, so accept none
    if len(pairs) != len({k for k, _ in pairs}):
        raise ValueError(f"duplicate keys in {[k for k, _ in pairs]!r:.200}")
    return dict(pairs)


def _check_entry(path, name, entry, data_size) -> tuple[int, int]:
    where = f"{path}: tensor {name!r}"
    if not isinstance(entry, dict):
        raise CheckpointError(f"{where}: expected an object with dtype, shape, data_offsets, got {entry!r:.80}")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in ITEMSIZE:
        raise CheckpointError(f"{where}: unknown dtype {dtype!r} (expected one of {sorted(ITEMSIZE)})")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise CheckpointError(f"{where}: shape {shape!r:.80} is not a list of non-negative ints")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
        raise CheckpointError(f"{where}: data_offsets {offsets!r:.80} is not [begin, end] ints")
    begin, end = offsets
    if not 0 <= begin <= end <= data_size:
        raise CheckpointError(f"{where}: data_offsets [{begin}, {end}] out of range "
                              f"(expected 0 <= begin <= end <= {data_size}, the data section size)")
    expected = math.prod(shape) * ITEMSIZE[dtype]
    if end - begin != expected:
        raise CheckpointError(f"{where}: {end - begin} bytes but shape {shape} x {dtype} needs {expected}")
    return begin, end


def _validate(path) -> tuple[dict, int]:
    """Return (header, offset of the data section); reads only the header, never the tensor data."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
    if size < 8:
        raise CheckpointError(f"{path}: {size} bytes, too short for safetensors (expected an 8-byte header length)")
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n > MAX_HEADER_BYTES:
            raise CheckpointError(f"{path}: header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit")
        if 8 + n > size:
            raise CheckpointError(f"{path}: header length {n} runs past the end of the {size}-byte file")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except ValueError as e:  # UnicodeDecodeError and JSONDecodeError are both ValueErrors
        raise CheckpointError(f"{path}: header is not valid UTF-8 JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header is JSON {type(header).__name__}, expected an object")
    meta = header.get("__metadata__")
    if meta is None:  # absent, or null as `mx.save_safetensors` writes without metadata (the safetensors crate accepts both)
        meta = header["__metadata__"] = {}
    if not (isinstance(meta, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())):
        raise CheckpointError(f"{path}: __metadata__ must map str to str, got {meta!r:.80}")
    spans = sorted((*_check_entry(path, k, v, size - 8 - n), k) for k, v in header.items() if k != "__metadata__")
    for (_, end0, name0), (begin1, _, name1) in zip(spans, spans[1:]):
        if begin1 < end0:
            raise CheckpointError(f"{path}: tensors {name0!r} and {name1!r} overlap (bytes {begin1}..{end0})")
    return header, 8 + n


def validate_safetensors_header(path) -> dict:
    """Parse and check a safetensors header (sizes, dtypes, shapes, offsets, metadata); return it."""
    return _validate(path)[0]


def safetensors_dtypes(path) -> dict[str, str]:
    """The stored dtype of each tensor (e.g. "BF16"), since `read_safetensors` upcasts bf16 to float32."""
    return {k: v["dtype"] for k, v in validate_safetensors_header(path).items() if k != "__metadata__"}


def _read_bf16(path, offset: int, shape: list[int]) -> np.ndarray:
    bits = np.fromfile(path, dtype="<u2", count=math.prod(shape), offset=offset)
    # bf16 is the top 16 bits of an fp32, so shifting them back up is exact.
    return (bits.astype(np.uint32) << 16).view(np.float32).reshape(shape)


def read_safetensors(path, root=None) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(tensors, metadata) of a validated safetensors file; bf16 tensors come back as float32."""
    path = check_inside(path, root) if root is not None else Path(path)
    header, data_start = _validate(path)
    tensors = {}
    try:
        with safe_open(path, framework="np") as f:
            for name, entry in header.items():
                dtype = entry["dtype"] if name != "__metadata__" else None
                if dtype == "BF16":
                    tensors[name] = _read_bf16(path, data_start + entry["data_offsets"][0], entry["shape"])
                elif dtype in NUMPY_DTYPES:
                    tensors[name] = f.get_tensor(name)
                elif dtype is not None:
                    raise CheckpointError(f"{path}: tensor {name!r} is {dtype}, which we do not convert "
                                          f"(expected BF16 or one of {sorted(NUMPY_DTYPES)})")
    except SafetensorError as e:  # what our checks leave to the library, e.g. gaps between tensors
        raise CheckpointError(f"{path}: safetensors refused the file ({e})") from None
    return tensors, dict(header.get("__metadata__", {}))


def _unwrap(path, obj) -> Mapping:
    while isinstance(obj, Mapping):
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            return obj
        obj = inner
    raise CheckpointError(f"{path}: holds a {type(obj).__name__}, expected a state dict (a dict of tensors)")


def load_torch_checkpoint(path) -> dict[str, np.ndarray]:
    """A pickled torch state dict as numpy, loaded only with the weights-only unpickler."""
    import torch  # lazy: mlx_clip and the safetensors path must work without torch

    path = Path(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        why = next((s.strip() for s in str(e).splitlines() if "GLOBAL" in s or "Unsupported" in s), "")
        raise CheckpointError(f"{path}: refused: this pickle would execute code or contains non-tensor objects "
                              f"({why or 'rejected by the weights-only unpickler'}); "
                              "we never fall back to unsafe loading (weights_only=False)") from None
    except Exception as e:  # not a pickle/zip at all, truncated, ...: still never retried unsafely
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({type(e).__name__}: {e})") from None
    tensors = {}
    for key, value in _unwrap(path, obj).items():
        if not isinstance(value, torch.Tensor):
            continue  # wrapper leaves such as an int `epoch`
        name = key.removeprefix("module.") if isinstance(key, str) else key  # DDP prefix
        if not isinstance(name, str) or name in tensors:
            raise CheckpointError(f"{path}: tensor key {key!r} is not a str or collides after stripping 'module.'")
        value = value.detach().cpu()
        try:  # numpy has no bf16; fp32 holds every bf16 value exactly
            tensors[name] = (value.float() if value.dtype == torch.bfloat16 else value).numpy()
        except (TypeError, RuntimeError) as e:
            raise CheckpointError(f"{path}: tensor {name!r} ({value.dtype}) has no numpy equivalent: {e}") from None
    if not tensors:
        raise CheckpointError(f"{path}: no tensors found (expected a state dict of name -> tensor)")
    return tensors


def load_checkpoint(path, root=None) -> dict[str, np.ndarray]:
    """Tensors of a .safetensors or pickled torch checkpoint, refusing anything unsafe."""
    path = Path(path)
    suffix = path.suffix.lower()  # of the given name: hub caches link names to suffix-less blobs
    if suffix not in SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES:
        raise CheckpointError(f"{path}: unknown checkpoint suffix {suffix!r} "
                              f"(expected one of {SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES})")
    real = check_inside(path, root) if root is not None else path
    if not real.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if suffix in SAFETENSORS_SUFFIXES:
        return read_safetensors(real)[0]
    return load_torch_checkpoint(real)


def write_safetensors_atomic(tensors: dict[str, np.ndarray], path, metadata=None) -> None:
    """Write via a temp file in the same dir, fsync, rename: readers see the old or the new file, never half of one."""
    path = Path(path)
    for name, value in tensors.items():
        if not isinstance(value, np.ndarray) or value.dtype.type not in NUMPY_DTYPES.values():
            raise CheckpointError(f"{path}: tensor {name!r} is {type(value).__name__} "
                                  f"{getattr(value, 'dtype', '')}, expected a numpy array of a safetensors dtype")
    # safetensors writes raw buffers, so non-contiguous views must be copied first.
    arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        save_file(arrays, tmp, metadata=metadata)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
