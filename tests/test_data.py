"""Data sources, safe decoding, skip accounting and the batch pipeline, checked against independent references
(csv/json/tarfile written by hand, Pillow/numpy pixel math, torchvision's resized_crop)."""

import csv
import io
import json
import struct
import tarfile
import zlib

from mlx_clip.data import (  # before mlx.core: loads the BLAS
    BadImageError, DataError, Loader, LoaderConfig, SkipCounter, TooManyBadImagesError, crop_box, decode_image,
    expand_braces, open_source, random_resized_crop, read_csv, read_folder, read_jsonl, read_webdataset,
)
from mlx_clip.data.images import IMAGE_FORMATS
from mlx_clip.preprocess import Preprocess
from mlx_clip.tokenizer import Tokenizer

import numpy as np
import pytest
from PIL import Image, ImageFile

CAPTIONS = ['a "quoted", comma caption', "plain words", "tab-free text", "ünïcode café", "last one"]


def _png(path, rng, size=24, mode="RGB"):
    x = rng.integers(0, 256, (size, size + 3, 3), dtype=np.uint8)
    Image.fromarray(x).convert(mode).save(path)
    return path


@pytest.fixture
def pairs(tmp_path):
    """Five images under tmp/img/ with captions and labels."""
    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir()
    names = [f"img/{i}.png" for i in range(5)]
    for name in names:
        _png(tmp_path / name, rng)
    return tmp_path, names, CAPTIONS, [0, 1, 2, 1, 0]


def _write_table(path, header, rows, delimiter):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter=delimiter)
        w.writerow(header)
        w.writerows(rows)


# ---- sources --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ext,delim", [(".csv", ","), (".tsv", "\t")])
def test_csv_tsv_roundtrip(pairs, ext, delim):
    root, names, caps, labels = pairs
    _write_table(root / f"data{ext}", ["title", "filepath", "y"], zip(caps, names, labels), delim)
    recs = read_csv(root / f"data{ext}", image_key="filepath", caption_key="title", label_key="y")
    assert [r["caption"] for r in recs] == caps
    assert [r["label"] for r in recs] == labels
    assert [r["image"] for r in recs] == [str(root / n) for n in names]  # resolved against the CSV's folder
    assert [r["key"] for r in recs] == names


def test_csv_without_label_column(pairs):
    root, names, caps, _ = pairs
    _write_table(root / "d.csv", ["filepath", "caption"], zip(names, caps), ",")
    assert [r["label"] for r in read_csv(root / "d.csv")] == [None] * 5


def test_csv_missing_column_error(pairs):
    root, names, caps, _ = pairs
    _write_table(root / "d.csv", ["path", "text"], zip(names, caps), ",")
    with pytest.raises(DataError) as err:
        read_csv(root / "d.csv")
    msg = str(err.value)
    assert str(root / "d.csv") in msg and "'filepath'" in msg and "'path'" in msg and "'text'" in msg


def test_jsonl_roundtrip(pairs):
    root, names, caps, labels = pairs
    with open(root / "d.jsonl", "w") as f:
        for n, c, y in zip(names, caps, labels):
            f.write(json.dumps({"img": n, "text": c, "label": y}) + "\n")
    recs = read_jsonl(root / "d.jsonl", image_key="img", caption_key="text")
    assert [(r["image"], r["caption"], r["label"]) for r in recs] == [
        (str(root / n), c, y) for n, c, y in zip(names, caps, labels)]
    with pytest.raises(DataError, match="'image'"):
        read_jsonl(root / "d.jsonl")


def test_class_folders(tmp_path):
    rng = np.random.default_rng(1)
    layout = {"zebra": 2, "apple_tree": 3, "cat": 1}
    for cls, k in layout.items():
        (tmp_path / cls).mkdir()
        for i in range(k):
            _png(tmp_path / cls / f"{i}.png", rng)
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    recs, classnames = read_folder(tmp_path, templates=["a photo of a {}.", "itap of a {}."])
    assert classnames == ["apple tree", "cat", "zebra"]  # sorted folder names
    assert [r["label"] for r in recs] == [0, 0, 0, 1, 2, 2]
    assert recs[1]["caption"] == "itap of a apple tree." and recs[3]["caption"] == "a photo of a cat."
    src = open_source(tmp_path)
    assert src.classnames == classnames and len(src) == 6 and not src.streamed


def test_expand_braces():
    assert expand_braces("s/{000008..000011}.tar") == [f"s/{i:06d}.tar" for i in range(8, 12)]
    assert expand_braces("{a,b}/{1..2}.tar") == ["a/1.tar", "a/2.tar", "b/1.tar", "b/2.tar"]
    assert expand_braces("plain.tar") == ["plain.tar"]


def _add(tar, name, data: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _shards(tmp_path, n_shards=2, per_shard=3):
    """WebDataset shards written by hand: png+txt, jpg+json, png+txt+cls; returns the expected records."""
    rng = np.random.default_rng(2)
    expected = []
    (tmp_path / "shards").mkdir()
    for s in range(n_shards):
        with tarfile.open(tmp_path / "shards" / f"{s:06d}.tar", "w") as tar:
            for i in range(per_shard):
                key, buf = f"sub/s{s}_{i:03d}", io.BytesIO()
                fmt = "JPEG" if i % 3 == 1 else "PNG"
                Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(buf, fmt)
                _add(tar, f"{key}.{'jpg' if fmt == 'JPEG' else 'png'}", buf.getvalue())
                caption, label = f"shard {s} sample {i}", (s * per_shard + i) % 4
                if i % 3 == 1:
                    _add(tar, f"{key}.json", json.dumps({"caption": caption, "label": label}).encode())
                else:
                    _add(tar, f"{key}.txt", caption.encode())
                    if i % 3 == 2:
                        _add(tar, f"{key}.cls", str(label).encode())
                expected.append({"image": buf.getvalue(), "caption": caption,
                                 "label": label if i % 3 else None, "key": key})
    return str(tmp_path / "shards" / f"{{000000..{n_shards - 1:06d}}}.tar"), expected


def test_webdataset_stream(tmp_path):
    pattern, expected = _shards(tmp_path)
    wds = read_webdataset(pattern)
    assert list(wds) == expected
    assert list(wds) == expected  # re-iterable: a second epoch reads the shards again
    src = open_source(pattern)
    assert src.streamed and list(src) == expected


def test_open_source_dispatch(pairs):
    root, names, caps, labels = pairs
    _write_table(root / "d.csv", ["filepath", "caption", "label"], zip(names, caps, labels), ",")
    (root / "classes.txt").write_text("x\ny\nz\n")
    src = open_source(root / "d.csv")
    assert src.classnames == ["x", "y", "z"] and [r["caption"] for r in src] == caps
    with pytest.raises(DataError, match="no such file"):
        open_source(root / "missing.csv")


# ---- decoding -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P", "LA"])
def test_decode_8bit_modes_match_pillow(tmp_path, mode):
    path = _png(tmp_path / "x.png", np.random.default_rng(3), mode=mode)
    expected = np.asarray(Image.open(path).convert("RGB"))
    np.testing.assert_array_equal(np.asarray(decode_image(path)), expected)
    np.testing.assert_array_equal(np.asarray(decode_image(path.read_bytes())), expected)


@pytest.mark.parametrize("ext", ["png", "tif"])
def test_decode_16bit_scales_not_clips(tmp_path, ext):
    x = np.random.default_rng(4).integers(0, 65536, (17, 13), dtype=np.uint16)
    Image.fromarray(x).save(tmp_path / f"g.{ext}")
    got = np.asarray(decode_image(tmp_path / f"g.{ext}"))
    want = np.rint(x.astype(np.float64) * 255 / 65535).astype(np.uint8)
    assert got.shape == (17, 13, 3) and all((got[..., c] == want).all() for c in range(3))


def _crafted_png(width, height) -> bytes:
    """A PNG that is only a header: IHDR claiming width x height, no pixel data."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def test_decompression_bomb_refused_before_decoding(tmp_path, monkeypatch):
    path = tmp_path / "bomb.png"
    path.write_bytes(_crafted_png(10_000, 8_000))  # 80 MP: over our 64 MP default, under Pillow's own limit
    calls = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: calls.append(1))
    with pytest.raises(BadImageError, match="decompression bomb") as err:
        decode_image(path)
    assert str(path) in str(err.value) and calls == []
    with pytest.raises(BadImageError, match="decompression bomb"):
        decode_image(_crafted_png(300, 300), max_pixels=50_000)  # the limit is configurable


def test_bad_images_raise_naming_the_path(tmp_path):
    good = _png(tmp_path / "good.png", np.random.default_rng(5), size=40)
    (tmp_path / "trunc.png").write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    (tmp_path / "junk.jpg").write_bytes(np.random.default_rng(6).bytes(500))
    (tmp_path / "header_only.png").write_bytes(_crafted_png(8, 8))  # small but no pixel data
    for name in ["trunc.png", "junk.jpg", "header_only.png", "missing.png"]:
        with pytest.raises(BadImageError) as err:
            decode_image(tmp_path / name)
        assert str(tmp_path / name) in str(err.value)


ACCEPTED = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp", "BMP": "bmp", "GIF": "gif", "TIFF": "tif"}


@pytest.mark.parametrize("fmt", sorted(ACCEPTED))
def test_accepted_formats_decode_like_pillow(tmp_path, fmt):
    assert set(IMAGE_FORMATS) == set(ACCEPTED)  # the constant users read is the list this test covers
    path = _png(tmp_path / f"x.{ACCEPTED[fmt]}", np.random.default_rng(7))
    with Image.open(path) as img:
        assert img.format == fmt
        expected = np.asarray(img.convert("RGB"))
    np.testing.assert_array_equal(np.asarray(decode_image(path)), expected)
    np.testing.assert_array_equal(np.asarray(decode_image(path.read_bytes())), expected)


@pytest.mark.parametrize("fmt, ext", [("ICO", "ico"), ("PCX", "pcx"), ("TGA", "tga"), ("PPM", "ppm"), ("EPS", "eps"),
                                      ("SGI", "sgi")])
def test_formats_off_the_allow_list_are_refused(tmp_path, fmt, ext):
    path = _png(tmp_path / f"x.{ext}", np.random.default_rng(8))
    with Image.open(path) as img:
        assert img.format == fmt  # Pillow itself would open it: the refusal is ours
    with pytest.raises(BadImageError, match="not an image in an accepted format") as err:
        decode_image(path)
    assert str(path) in str(err.value) and all(f in str(err.value) for f in IMAGE_FORMATS)
    with pytest.raises(BadImageError, match=r"<\d+ bytes in memory>: not an image in an accepted format"):
        decode_image(path.read_bytes())  # untrusted bytes (server, webdataset) go through the same list
    disguised = tmp_path / "disguised.png"  # the content decides, not the file name
    disguised.write_bytes(path.read_bytes())
    with pytest.raises(BadImageError, match="accepted format"):
        decode_image(disguised)


def test_skip_counter_aborts_past_fraction():
    c = SkipCounter(max_bad_fraction=0.1, min_count=20)
    for i in range(5):  # 5 of 5 bad, but below min_count: no abort yet
        c.skip(f"bad{i}", "corrupt")
    for _ in range(45):
        c.ok()
    c.check()  # 5/50 = 10%: not past the limit
    with pytest.raises(TooManyBadImagesError, match="bad0"):
        c.skip("bad5", "corrupt")  # 6/51 > 10%
    small = SkipCounter(max_bad_fraction=0.1, min_count=100)
    small.ok(), small.skip("x", "missing")
    with pytest.raises(TooManyBadImagesError):
        small.check(final=True)  # the end of an epoch applies the limit whatever the count


# ---- pipeline -------------------------------------------------------------------------------------------------

PRE = Preprocess(image_size=16)


@pytest.fixture
def records(tmp_path):
    rng = np.random.default_rng(7)
    (tmp_path / "i").mkdir()
    recs = []
    for i in range(23):
        size = int(rng.integers(18, 40))
        path = tmp_path / "i" / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (size, size + 5, 3), dtype=np.uint8)).save(path)
        recs.append({"image": str(path), "caption": f"caption {i}", "label": i % 3 if i % 5 else None, "key": str(i)})
    return recs


def _run(loader, n=None):
    out = []
    for batch in loader:
        out.append(batch)
        if n is not None and len(out) == n:
            break
    return out


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x["keys"] == y["keys"] and x["texts"] == y["texts"]
        np.testing.assert_array_equal(x["images"], y["images"])
        np.testing.assert_array_equal(x["labels"], y["labels"])


def test_eval_batches_shapes_and_pixels(records):
    batches = _run(Loader(records, PRE, LoaderConfig(batch_size=5, train=False)))
    assert [len(b["keys"]) for b in batches] == [5, 5, 5, 5, 3]  # eval keeps the partial batch, in order
    b = batches[0]
    assert b["images"].shape == (5, 16, 16, 3) and b["images"].dtype == np.float32
    assert b["labels"].dtype == np.int64 and b["labels"].tolist() == [-1, 1, 2, 0, 1]
    assert b["texts"] == [f"caption {i}" for i in range(5)]
    for i in range(5):  # the model's own preprocessing of the raw file
        np.testing.assert_array_equal(b["images"][i], PRE.to_numpy(Image.open(records[i]["image"])))


def test_random_resized_crop_matches_torchvision():
    F = pytest.importorskip("torchvision.transforms.functional")
    img = Image.fromarray(np.random.default_rng(8).integers(0, 256, (37, 50, 3), dtype=np.uint8))
    rng = np.random.default_rng(9)
    for _ in range(20):
        state = rng.bit_generator.state
        left, top, w, h = crop_box(50, 37, (0.3, 1.0), (3 / 4, 4 / 3), rng)
        assert 0 <= left and left + w <= 50 and 0 <= top and top + h <= 37
        assert 3 / 4 - 0.1 < w / h < 4 / 3 + 0.1 or (w, h) == (50, 37)
        rng.bit_generator.state = state
        ours = random_resized_crop(img, 16, (0.3, 1.0), (3 / 4, 4 / 3), rng)
        ref = F.resized_crop(img, top, left, h, w, [16, 16], F.InterpolationMode.BICUBIC)
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(ref))


def test_train_deterministic_and_drops_partial(records):
    cfg = LoaderConfig(batch_size=4, seed=3, hflip=True, num_threads=2, prefetch=8)
    tok = Tokenizer.default(context_length=12)
    a = _run(Loader(records, PRE, cfg, tokenize=tok.tokenize_numpy))
    b = _run(Loader(records, PRE, LoaderConfig(batch_size=4, seed=3, hflip=True, num_threads=1, prefetch=2)))
    assert len(a) == 23 // 4 and all(x["images"].shape == (4, 16, 16, 3) for x in a)
    assert a[0]["input_ids"].shape == (4, 12) and a[0]["input_ids"].dtype == np.int32
    _same(a, b)  # same seed, different thread count: same batches
    other = _run(Loader(records, PRE, LoaderConfig(batch_size=4, seed=4)))
    assert [x["keys"] for x in other] != [x["keys"] for x in a]


def test_epochs_differ_and_resume_equals_uninterrupted(records):
    cfg = LoaderConfig(batch_size=3, seed=11)
    full = Loader(records, PRE, cfg)
    epochs = [_run(full), _run(full)]
    assert [b["keys"] for b in epochs[0]] != [b["keys"] for b in epochs[1]]
    first = Loader(records, PRE, cfg)
    _run(first, 4)  # interrupted after 4 batches of epoch 0
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON checkpoint
    resumed = Loader(records, PRE, cfg)
    resumed.load_state_dict(state)
    _same(_run(resumed) + _run(resumed), epochs[0][4:] + epochs[1])


@pytest.mark.parametrize("train", [True, False])
def test_rank_sharding_disjoint_and_covering(records, train):
    world = 3
    keys = []
    for rank in range(world):
        cfg = LoaderConfig(batch_size=2, train=train, rank=rank, world_size=world, seed=5)
        keys.append([k for b in _run(Loader(records, PRE, cfg)) for k in b["keys"]])
    flat = [k for ks in keys for k in ks]
    assert len(flat) == len(set(flat))  # no overlap
    if train:  # equal steps per rank; only the last partial batches and the < world remainder are dropped
        assert len({len(k) for k in keys}) == 1 and len(flat) == world * (23 // world // 2 * 2)
    else:
        assert sorted(flat, key=int) == [r["key"] for r in records]


def test_bad_images_skipped_counted_and_aborting(records, tmp_path):
    recs = [dict(r) for r in records]
    Image.open(recs[2]["image"]).save(tmp_path / "t.png")
    data = (tmp_path / "t.png").read_bytes()
    (tmp_path / "t.png").write_bytes(data[: len(data) // 2])
    recs[2]["image"] = str(tmp_path / "t.png")  # truncated
    recs[5]["image"] = str(tmp_path / "missing.png")
    recs[9]["image"] = np.random.default_rng(0).bytes(300)  # corrupt bytes
    loader = Loader(recs, PRE, LoaderConfig(batch_size=4, train=False, max_bad_fraction=0.5))
    seen = [k for b in _run(loader) for k in b["keys"]]
    assert seen == [r["key"] for i, r in enumerate(recs) if i not in (2, 5, 9)]
    assert (loader.skips.seen, loader.skips.skipped) == (23, 3)
    strict = Loader(recs, PRE, LoaderConfig(batch_size=4, max_bad_fraction=0.01, min_bad_count=4))
    with pytest.raises(TooManyBadImagesError, match="max-bad-fraction"):
        _run(strict)


def _decode_threads():
    import threading
    return [t for t in threading.enumerate() if t.name.startswith("mlxclip-decode")]


def test_decode_threads_end_with_the_epoch_or_an_early_stop(records):
    """The decode pool lives exactly as long as the epoch's iteration: drained, stopped after two batches (training
    by steps) or ended by an error, no thread is left decoding for nobody."""
    loader = Loader(records, PRE, LoaderConfig(batch_size=4, num_threads=2, prefetch=8))
    assert len(_run(loader)) == 5 and not _decode_threads()
    batches = iter(loader)
    next(batches), next(batches)
    assert 0 < len(_decode_threads()) <= 2
    batches.close()  # what a `for` loop's `break` does when the generator is dropped
    assert not _decode_threads()
    recs = [dict(r) for r in records]
    recs[6]["image"] = 12345  # not bytes nor a path: a programming error, not a bad image to skip
    with pytest.raises(TypeError):  # raised in a decode thread, re-raised in the consumer
        _run(Loader(recs, PRE, LoaderConfig(batch_size=4, train=False)))
    assert not _decode_threads()


def test_streamed_source_resume_and_shards(tmp_path):
    pattern, expected = _shards(tmp_path, n_shards=3, per_shard=4)
    wds = read_webdataset(pattern)
    cfg = LoaderConfig(batch_size=2, seed=1, shuffle_buffer=5)
    full = Loader(wds, PRE, cfg)
    uninterrupted = _run(full) + _run(full)
    part = Loader(wds, PRE, cfg)
    _run(part, 2)
    resumed = Loader(wds, PRE, cfg)
    resumed.load_state_dict(part.state_dict())
    _same(_run(resumed) + _run(resumed), uninterrupted[2:])
    per_rank = [[k for b in _run(Loader(wds, PRE, LoaderConfig(batch_size=2, train=False, rank=r, world_size=2)))
                 for k in b["keys"]] for r in range(2)]
    assert sorted(per_rank[0] + per_rank[1]) == sorted(e["key"] for e in expected)
    assert not set(per_rank[0]) & set(per_rank[1])
