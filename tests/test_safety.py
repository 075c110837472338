"""converters/safety.py: what we refuse (code-executing pickles, malformed safetensors, escaping symlinks)."""

import json
import os
import pickle
import struct
import subprocess
import sys

import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch

from converters import safety
from converters.safety import (
    CheckpointError,
    check_inside,
    load_checkpoint,
    load_torch_checkpoint,
    read_safetensors,
    safetensors_dtypes,
    validate_safetensors_header,
    write_safetensors_atomic,
)


def _torch_state(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "visual.proj": torch.randn(4, 3, generator=g),
        "text.ln.weight": torch.randn(5, generator=g).half(),
        "text.pos": torch.randn(2, 3, generator=g).bfloat16(),
        "text.ids": torch.randint(0, 100, (6,), generator=g),
        "logit_scale": torch.tensor(2.5),
    }


def _to_numpy(t):
    return (t.float() if t.dtype == torch.bfloat16 else t).numpy()


# --- pickles -------------------------------------------------------------------------------------------------------


class _SystemCall:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _OpenCall:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("payload", [_SystemCall, _OpenCall])
@pytest.mark.parametrize("fmt", ["zip", "raw-pickle"])
def test_malicious_pickle_is_refused_without_executing(tmp_path, monkeypatch, payload, fmt):
    marker = tmp_path / "pwned"
    path = tmp_path / ("evil.pt" if fmt == "zip" else "evil.bin")
    obj = {"weight": torch.zeros(2), "evil": payload(marker)}
    if fmt == "zip":
        torch.save(obj, path)
    else:  # a plain pickle (protocol 2, which torch's weights-only unpickler otherwise accepts)
        path.write_bytes(pickle.dumps(obj, protocol=2))
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert str(path) in str(err.value)
    assert "never fall back" in str(err.value)
    assert calls == [True]  # one weights-only attempt, no unsafe retry
    assert not marker.exists()
    # Control: the same bytes really do run the payload when unpickled unsafely.
    unsafe = real_load(path, weights_only=False) if fmt == "zip" else pickle.loads(path.read_bytes())
    getattr(unsafe["evil"], "close", lambda: None)()
    assert marker.exists()


@pytest.mark.parametrize("suffix", [".pt", ".bin"])
@pytest.mark.parametrize("wrapper", [None, "state_dict", "model", "module"])
@pytest.mark.parametrize("ddp", [False, True])
def test_torch_state_dict_round_trips(tmp_path, suffix, wrapper, ddp):
    state = _torch_state()
    saved = {("module." + k if ddp else k): v for k, v in state.items()}
    if wrapper is not None:
        saved = {wrapper: saved, "epoch": 3, "name": "run"}  # non-tensor leaves are ignored
    path = tmp_path / f"ckpt{suffix}"
    torch.save(saved, path)
    out = load_checkpoint(path)
    assert sorted(out) == sorted(state)
    for k, t in state.items():
        assert out[k].dtype == _to_numpy(t).dtype
        np.testing.assert_array_equal(out[k], _to_numpy(t))
    assert out["text.pos"].dtype == np.float32  # bf16 upcast


def test_torch_legacy_format_and_nested_wrapper(tmp_path):
    state = _torch_state(1)
    path = tmp_path / "old.pth"
    torch.save({"model": {"state_dict": state}}, path, _use_new_zipfile_serialization=False)
    out = load_torch_checkpoint(path)
    for k, t in state.items():
        np.testing.assert_array_equal(out[k], _to_numpy(t))


@pytest.mark.parametrize("obj", [{"epoch": 3, "name": "x"}, [torch.zeros(2)], {}])
def test_torch_without_tensors_is_refused(tmp_path, obj):
    path = tmp_path / "empty.ckpt"
    torch.save(obj, path)
    with pytest.raises(CheckpointError, match="empty.ckpt"):
        load_checkpoint(path)


def test_torch_prefix_collision_and_garbage_are_refused(tmp_path):
    path = tmp_path / "dup.pt"
    torch.save({"a": torch.zeros(1), "module.a": torch.ones(1)}, path)
    with pytest.raises(CheckpointError, match="collides"):
        load_checkpoint(path)
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"\x00\x01 not a checkpoint")
    with pytest.raises(CheckpointError, match="garbage.bin"):
        load_checkpoint(garbage)


# --- safetensors: happy paths --------------------------------------------------------------------------------------


def test_read_safetensors_equals_library(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {
        "a": rng.standard_normal((3, 4)).astype(np.float32),
        "b": rng.standard_normal(5).astype(np.float16),
        "c": rng.integers(-9, 9, (2, 2, 2)).astype(np.int64),
        "d": rng.integers(0, 255, 7).astype(np.uint8),
        "e": np.array(True),
        "empty": np.zeros((0, 3), np.float32),
    }
    path = tmp_path / "m.safetensors"
    safetensors.numpy.save_file(arrays, path, metadata={"format": "np", "arch": "ViT-B-32"})
    tensors, meta = read_safetensors(path)
    ref = safetensors.numpy.load_file(path)
    assert sorted(tensors) == sorted(ref)
    for k in ref:
        assert tensors[k].dtype == ref[k].dtype and tensors[k].shape == ref[k].shape
        np.testing.assert_array_equal(tensors[k], ref[k])
    assert meta == {"format": "np", "arch": "ViT-B-32"}
    np.testing.assert_array_equal(load_checkpoint(path)["a"], arrays["a"])


def test_bf16_safetensors_matches_torch_upcast(tmp_path):
    g = torch.Generator().manual_seed(0)
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-40, -3.0e38, 1.0 / 3])
    t = {"w": torch.randn(3, 5, generator=g).bfloat16(), "s": special.bfloat16(), "x": torch.randn(4, generator=g)}
    path = tmp_path / "bf16.safetensors"
    safetensors.torch.save_file(t, path)
    tensors, _ = read_safetensors(path)
    for k, v in t.items():
        assert tensors[k].dtype == np.float32
        np.testing.assert_array_equal(tensors[k], v.float().numpy())  # nan == nan here
    assert safetensors_dtypes(path) == {"w": "BF16", "s": "BF16", "x": "F32"}


def test_f8_is_validated_but_not_converted(tmp_path):
    path = tmp_path / "f8.safetensors"
    safetensors.torch.save_file({"q": torch.zeros(4).to(torch.float8_e4m3fn)}, path)
    assert safetensors_dtypes(path) == {"q": "F8_E4M3"}
    with pytest.raises(CheckpointError, match="'q'.*F8_E4M3"):
        read_safetensors(path)


# --- safetensors: crafted bad files --------------------------------------------------------------------------------


def _raw(header, data=b"", n=None):
    """A safetensors file from a header (dict/list, or raw bytes) and data; `n` overrides the stored header length."""
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(body) if n is None else n) + body + data


def _good_header():
    return {"__metadata__": {"k": "v"},
            "a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
            "b": {"dtype": "I16", "shape": [3], "data_offsets": [16, 22]}}


def _with(name, **fields):
    h = _good_header()
    h[name] = {**h[name], **fields}
    return _raw(h, bytes(22))


BAD_FILES = {
    "too-short": b"\x01\x00\x00",
    "header-longer-than-file": _raw(_good_header(), bytes(22), n=10_000),
    "invalid-json": _raw(b'{"a": {"dtype": "F32",', bytes(22)),
    "invalid-utf8": _raw(b'{"\xff\xfe": 1}'),
    "non-object-json": _raw([1, 2, 3]),
    "entry-not-object": _raw({"a": [0, 16]}, bytes(16)),
    "unknown-dtype": _with("a", dtype="F128"),
    "negative-shape": _with("a", shape=[-2, -2]),
    "float-shape": _with("a", shape=[2.0, 2]),
    "bool-shape": _with("b", shape=[True, 3]),
    "offsets-past-data": _with("b", data_offsets=[16, 40]),
    "negative-begin": _with("a", data_offsets=[-4, 12]),
    "begin-after-end": _with("a", data_offsets=[16, 0]),
    "offsets-not-pair": _with("a", data_offsets=[0]),
    "overlapping": _with("b", shape=[4], data_offsets=[8, 16]),
    "size-not-shape-times-itemsize": _with("a", shape=[2, 3]),
    "truncated-data": _raw(_good_header(), bytes(20)),
    "duplicate-keys": _raw(b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
                           b'"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', bytes(4)),
    "metadata-not-str": _raw({**_good_header(), "__metadata__": {"k": 1}}, bytes(22)),
}


def test_good_baseline_is_accepted_by_both(tmp_path):
    # The bad files above are single mutations of this one, which both we and the library accept.
    path = tmp_path / "good.safetensors"
    path.write_bytes(_raw(_good_header(), bytes(22)))
    assert validate_safetensors_header(path) == _good_header()
    ref = safetensors.numpy.load_file(path)
    tensors, meta = read_safetensors(path)
    assert meta == {"k": "v"} and sorted(tensors) == sorted(ref) == ["a", "b"]


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_safetensors_is_a_clean_error(tmp_path, case):
    path = tmp_path / f"{case}.safetensors"
    path.write_bytes(BAD_FILES[case])
    for read in (validate_safetensors_header, read_safetensors, load_checkpoint):
        with pytest.raises(CheckpointError) as err:
            read(path)
        assert str(path) in str(err.value)


@pytest.mark.parametrize("case, tensor", [("unknown-dtype", "a"), ("negative-shape", "a"), ("offsets-past-data", "b"),
                                          ("size-not-shape-times-itemsize", "a"), ("overlapping", "b")])
def test_bad_entry_error_names_the_tensor(tmp_path, case, tensor):
    path = tmp_path / "x.safetensors"
    path.write_bytes(BAD_FILES[case])
    with pytest.raises(CheckpointError, match=f"'{tensor}'"):
        validate_safetensors_header(path)


def test_header_over_limit_is_refused_even_when_file_is_big_enough(tmp_path):
    path = tmp_path / "huge.safetensors"
    n = safety.MAX_HEADER_BYTES + 1
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", n))
        f.truncate(8 + n + 8)  # sparse: the length fits in the file, only the limit can refuse it
    with pytest.raises(CheckpointError, match="exceeds the .*-byte limit"):
        validate_safetensors_header(path)


def test_gap_between_tensors_is_left_to_the_library_but_still_clean(tmp_path):
    h = _good_header()
    h["b"]["data_offsets"] = [18, 24]  # no overlap, but bytes 16..18 belong to nobody
    path = tmp_path / "gap.safetensors"
    path.write_bytes(_raw(h, bytes(24)))
    with pytest.raises(CheckpointError, match="gap.safetensors"):
        read_safetensors(path)


# --- paths ---------------------------------------------------------------------------------------------------------


def test_symlinks_outside_root_are_refused(tmp_path):
    root, outside = tmp_path / "model", tmp_path / "elsewhere"
    root.mkdir(), outside.mkdir()
    arrays = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
    safetensors.numpy.save_file(arrays, outside / "secret.safetensors")
    safetensors.numpy.save_file(arrays, root / "real.safetensors")
    (root / "escape.safetensors").symlink_to(outside / "secret.safetensors")
    (root / "inside.safetensors").symlink_to(root / "real.safetensors")
    for read in (check_inside, read_safetensors, load_checkpoint):
        for bad in (root / "escape.safetensors", root / ".." / "elsewhere" / "secret.safetensors"):
            with pytest.raises(CheckpointError, match="outside the model dir"):
                read(bad, root=root) if read is not check_inside else read(bad, root)
    assert check_inside(root / "inside.safetensors", root) == (root / "real.safetensors").resolve()
    np.testing.assert_array_equal(read_safetensors(root / "inside.safetensors", root=root)[0]["w"], arrays["w"])
    np.testing.assert_array_equal(load_checkpoint(root / "inside.safetensors", root=root)["w"], arrays["w"])
    # A root that is itself a link resolves too; a missing root is refused.
    (tmp_path / "alias").symlink_to(root)
    assert check_inside(tmp_path / "alias" / "real.safetensors", tmp_path / "alias") == check_inside(
        root / "real.safetensors", root)
    with pytest.raises(CheckpointError, match="does not exist"):
        check_inside(root / "real.safetensors", tmp_path / "nope")


def test_load_checkpoint_suffix_and_missing(tmp_path):
    odd = tmp_path / "weights.npz"
    odd.write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"weights\.npz.*\.safetensors.*\.bin.*\.pt"):
        load_checkpoint(odd)
    with pytest.raises(CheckpointError, match="missing.safetensors"):
        load_checkpoint(tmp_path / "missing.safetensors")
    with pytest.raises(CheckpointError, match="missing.bin"):
        load_checkpoint(tmp_path / "missing.bin", root=tmp_path)


# --- atomic write --------------------------------------------------------------------------------------------------


def _old_file(tmp_path):
    path = tmp_path / "model.safetensors"
    safetensors.numpy.save_file({"old": np.ones(3, np.float32)}, path)
    return path, path.read_bytes()


def test_atomic_write_round_trips(tmp_path):
    path, _ = _old_file(tmp_path)
    rng = np.random.default_rng(1)
    w = rng.standard_normal((3, 4)).astype(np.float32)
    tensors = {"w_t": w.T, "b": rng.integers(0, 9, 5).astype(np.int32)}  # w.T is not contiguous
    write_safetensors_atomic(tensors, path, metadata={"step": "7"})
    ref = safetensors.numpy.load_file(path)
    assert sorted(ref) == ["b", "w_t"]
    np.testing.assert_array_equal(ref["w_t"], w.T)
    np.testing.assert_array_equal(ref["b"], tensors["b"])
    assert read_safetensors(path)[1] == {"step": "7"}
    assert os.listdir(tmp_path) == ["model.safetensors"]


def test_atomic_write_refuses_invalid_tensor_and_keeps_old_file(tmp_path):
    path, old = _old_file(tmp_path)
    with pytest.raises(CheckpointError, match="'bad'"):
        write_safetensors_atomic({"ok": np.zeros(2, np.float32), "bad": np.array([object()])}, path)
    assert path.read_bytes() == old and os.listdir(tmp_path) == ["model.safetensors"]


@pytest.mark.parametrize("stage", ["save_file", "fsync", "metadata"])
def test_atomic_write_failing_midway_keeps_old_file(tmp_path, monkeypatch, stage):
    path, old = _old_file(tmp_path)
    metadata = {"k": 1} if stage == "metadata" else None  # the library itself refuses non-str metadata
    if stage == "save_file":
        def half_write(tensors, filename, metadata=None):
            with open(filename, "wb") as f:
                f.write(b"\x10\x00\x00\x00\x00\x00\x00\x00{")  # a partial file, then the disk "fails"
            raise OSError("disk full")
        monkeypatch.setattr(safety, "save_file", half_write)
    elif stage == "fsync":
        def failing_fsync(fd):
            raise OSError("io error")
        monkeypatch.setattr(safety.os, "fsync", failing_fsync)
    with pytest.raises((OSError, TypeError, CheckpointError)):
        write_safetensors_atomic({"new": np.zeros(4, np.float32)}, path, metadata=metadata)
    assert path.read_bytes() == old
    assert os.listdir(tmp_path) == ["model.safetensors"]  # no temp file left behind


def test_safety_imports_without_torch():
    code = "import sys, converters.safety; assert 'torch' not in sys.modules, 'torch imported eagerly'"
    subprocess.run([sys.executable, "-c", code], check=True)
