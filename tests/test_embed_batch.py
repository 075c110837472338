"""`mlxclip embed --data`: sharded Parquet + manifest, checked against the model called directly on Pillow-decoded
pixels; resuming after an injected failure and after a SIGKILL gives byte-identical files; mismatched restarts and
unreadable images are handled as documented."""

import csv
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time

import mlx_clip  # noqa: F401  (before mlx.core: preloads the fast BLAS)
import mlx.core as mx
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mlx_clip import embed_batch as eb
from mlx_clip.io import load
from cli_util import invoke, tiny_model  # noqa: E402

WORDS = ["red", "blue", "circle", "square", "small", "large", "striped", "dotted"]
BAD = {5: b"not an image at all", 23: b"\x89PNG\r\n\x1a\n truncated"}  # ordinal -> corrupt file contents


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tiny_model(tmp_path_factory, seed=1)


def _write_dataset(root, n, seed=0, bad=BAD):
    """n random 24..40 px PNGs (some corrupt) and a CSV filepath,caption,label."""
    rng = np.random.default_rng(seed)
    (root / "img").mkdir(parents=True)
    rows = []
    for i in range(n):
        path = root / "img" / f"{i:04d}.png"
        if i in bad:
            path.write_bytes(bad[i])
        else:
            h, w = rng.integers(24, 41, size=2)
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        caption = " ".join(rng.choice(WORDS, size=3))
        rows.append({"filepath": f"img/{i:04d}.png", "caption": caption, "label": "" if i % 7 == 0 else i % 3})
    with open(root / "data.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["filepath", "caption", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return root / "data.csv", rows


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return _write_dataset(tmp_path_factory.mktemp("d"), 45)


def _args(tiny_dir, data, out, **kw):
    return eb.EmbedArgs(model=str(tiny_dir), data=str(data), out=str(out), **kw)


def _files(out):
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def test_vectors_and_columns_match_the_model(tiny_dir, dataset, tmp_path):
    csv_path, rows = dataset
    out = tmp_path / "emb"
    invoke("embed", "--model", tiny_dir, "--data", csv_path, "--out", out, "--modality", "both", "--dtype", "float32",
            "--shard-size", 20, "--batch-size", 8)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["dims"] == 32 and manifest["dtype"] == "float32"
    assert [(s["file"], s["items"], s["rows"]) for s in manifest["shards"]] == [
        ("shard-00000.parquet", 20, 19), ("shard-00001.parquet", 20, 19), ("shard-00002.parquet", 5, 5)]
    assert [(s["id"], s["path"]) for s in manifest["skipped"]] == [
        (i, str(csv_path.parent / rows[i]["filepath"])) for i in sorted(BAD)]
    reasons = [s["reason"] for s in manifest["skipped"]]  # garbage bytes: no accepted format; a cut PNG: decode fails
    assert "not an image in an accepted format" in reasons[0] and "cannot decode" in reasons[1]

    images, table = eb.read_vectors(out, "image_embedding")
    texts, _ = eb.read_vectors(out, "text_embedding")
    good = [i for i in range(len(rows)) if i not in BAD]
    assert table.column("id").to_pylist() == good
    assert table.column("caption").to_pylist() == [rows[i]["caption"] for i in good]
    assert table.column("label").to_pylist() == [None if rows[i]["label"] == "" else rows[i]["label"] for i in good]
    assert table.column("path").to_pylist() == [str(csv_path.parent / rows[i]["filepath"]) for i in good]

    # Reference: the model called directly on pixels decoded by Pillow and preprocessed in numpy.
    model, tok, pre = load(tiny_dir)
    pixels = np.stack([pre.to_numpy(Image.open(csv_path.parent / rows[i]["filepath"])) for i in good])
    ref_images = np.array(model.encode_image(mx.array(pixels), normalize=True))
    ref_texts = np.array(model.encode_text(tok([rows[i]["caption"] for i in good]), normalize=True))
    np.testing.assert_allclose(images, ref_images, atol=2e-6)
    np.testing.assert_allclose(texts, ref_texts, atol=2e-6)
    assert np.abs(ref_images[0] - ref_images[1]).max() > 1e-3  # distinct inputs, distinct vectors


def test_float16_vectors_are_the_rounded_float32_ones(tiny_dir, dataset, tmp_path):
    csv_path, _ = dataset
    eb.embed_collection(_args(tiny_dir, csv_path, tmp_path / "f32", dtype="float32", shard_size=50), progress=False)
    eb.embed_collection(_args(tiny_dir, csv_path, tmp_path / "f16", dtype="float16", shard_size=50), progress=False)
    f32, _ = eb.read_vectors(tmp_path / "f32")
    f16, _ = eb.read_vectors(tmp_path / "f16")
    schema = pq.read_schema(tmp_path / "f16" / "shard-00000.parquet")
    assert str(schema.field("image_embedding").type) == "fixed_size_list<element: halffloat>[32]"
    np.testing.assert_array_equal(f16, f32.astype(np.float16).astype(np.float32))


def test_resume_after_a_failure_is_byte_identical(tiny_dir, dataset, tmp_path, monkeypatch):
    csv_path, _ = dataset
    kw = dict(modality="both", shard_size=10, batch_size=4)
    eb.embed_collection(_args(tiny_dir, csv_path, tmp_path / "whole", **kw), progress=False)

    real_write, written = eb.write_shard, []

    def fail_on_third(path, table):
        if len(written) == 2:
            raise RuntimeError("injected crash")
        real_write(path, table)
        written.append(path)

    monkeypatch.setattr(eb, "write_shard", fail_on_third)
    out = tmp_path / "resumed"
    with pytest.raises(RuntimeError, match="injected crash"):
        eb.embed_collection(_args(tiny_dir, csv_path, out, **kw), progress=False)
    monkeypatch.undo()
    assert not json.loads((out / "manifest.json").read_text())["complete"]
    before = {p: os.stat(p).st_mtime_ns for p in written}
    summary = eb.embed_collection(_args(tiny_dir, csv_path, out, **kw), progress=False)
    assert summary["resumed_at_shard"] == 2
    assert {p: os.stat(p).st_mtime_ns for p in written} == before  # finished shards were not rewritten
    assert _files(out) == _files(tmp_path / "whole")

    again = eb.embed_collection(_args(tiny_dir, csv_path, out, **kw), progress=False)
    assert again.get("already_complete") and _files(out) == _files(tmp_path / "whole")


def test_killed_process_resumes_to_identical_output(tiny_dir, tmp_path):
    csv_path, _ = _write_dataset(tmp_path / "big", 600, seed=1)
    flags = ["--model", str(tiny_dir), "--data", str(csv_path), "--shard-size", "20", "--batch-size", "8"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "mlx_clip", "embed", *flags, "--out", str(killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not (killed / "shard-00001.parquet").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    manifest = json.loads((killed / "manifest.json").read_text())
    assert not manifest["complete"], "the run finished before it could be killed"
    invoke("embed", *flags, "--out", killed)
    invoke("embed", *flags, "--out", whole)
    assert not list(killed.glob(".*"))  # no temp file left behind
    assert _files(killed) == _files(whole)


def test_mismatched_restart_and_foreign_dir_are_refused(tiny_dir, dataset, tmp_path):
    csv_path, _ = dataset
    out = tmp_path / "emb"
    eb.embed_collection(_args(tiny_dir, csv_path, out, shard_size=50), progress=False)
    with pytest.raises(ValueError, match="dtype: 'float16' then, 'float32' now"):
        eb.embed_collection(_args(tiny_dir, csv_path, out, shard_size=50, dtype="float32"), progress=False)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty and has no manifest.json"):
        eb.embed_collection(_args(tiny_dir, csv_path, other), progress=False)


def _tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_webdataset_shards_and_texts_only(tiny_dir, tmp_path):
    rng = np.random.default_rng(2)
    members = []
    for i in range(7):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, format="PNG")
        image = b"garbage" if i == 3 else buf.getvalue()
        members += [(f"s{i:03d}.png", image), (f"s{i:03d}.txt", f"item {i}".encode())]
    _tar(tmp_path / "a.tar", members[:8])
    _tar(tmp_path / "b.tar", members[8:])
    spec = str(tmp_path / "{a,b}.tar")
    eb.embed_collection(_args(tiny_dir, spec, tmp_path / "img", shard_size=4), progress=False)
    manifest = eb.read_manifest(tmp_path / "img")
    _, table = eb.read_vectors(tmp_path / "img")
    assert table.column("key").to_pylist() == ["s000", "s001", "s002", "s004", "s005", "s006"]
    assert table.column("path").to_pylist() == table.column("key").to_pylist()  # tar members have no file path
    assert [(s["id"], s["key"]) for s in manifest["skipped"]] == [(3, "s003")]

    eb.embed_collection(_args(tiny_dir, spec, tmp_path / "txt", modality="texts", shard_size=4), progress=False)
    vectors, table = eb.read_vectors(tmp_path / "txt", "text_embedding")
    model, tok, _ = load(tiny_dir)
    captions = [f"item {i}" for i in range(7)]  # texts only: no image is opened, so none is skipped
    assert table.column("caption").to_pylist() == captions
    np.testing.assert_allclose(vectors, np.array(model.encode_text(tok(captions), normalize=True)), atol=1e-3)
