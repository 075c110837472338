"""Evaluation: zero-shot and retrieval metrics against a separate loop-based numpy ranking, the model-level path on
the tiny random-init model against features computed by hand, and the `mlxclip eval` command."""

import csv
import json
import sys

import numpy as np
import pytest

from mlx_clip import eval as E  # first: preloads BLAS before mlx.core
from mlx_clip.cli import run
from mlx_clip.data import read_csv
from mlx_clip.io import load

import mlx.core as mx  # noqa: E402
from PIL import Image  # noqa: E402

from converters.convert import init_model  # noqa: E402


# ---- the independent reference: explicit counting, no sort -------------------------------------------------------

def unit(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def rank_of(scores, j):
    """0-based rank of candidate j: those scoring higher, plus equal scorers listed before it (ties -> lower index)."""
    return int(np.sum(scores > scores[j]) + np.sum(scores[:j] == scores[j]))


def ref_zeroshot(img, cls, labels, ks=(1, 5)):
    sims = unit(img) @ unit(cls).T
    ranks = np.array([rank_of(s, y) for s, y in zip(sims, labels)])
    out = {f"top{k}": float(np.mean(ranks < k)) for k in ks}
    out["per_class"] = [float(np.mean(ranks[labels == c] == 0)) if np.any(labels == c) else None
                        for c in range(len(cls))]
    return out, [int(np.argmax(s)) for s in sims]


def ref_retrieval(img, txt, ids):
    sims = unit(img) @ unit(txt).T
    i2t = [min(rank_of(sims[i], j) for j in np.flatnonzero(ids == i)) for i in range(len(img))]
    t2i = [rank_of(sims[:, j], ids[j]) for j in range(len(txt))]
    out = {f"i2t_r{k}": float(np.mean(np.array(i2t) < k)) for k in (1, 5, 10)}
    return out | {f"t2i_r{k}": float(np.mean(np.array(t2i) < k)) for k in (1, 5, 10)}


def clustered(rng, n, centers, labels, noise):
    return centers[labels] + noise * rng.standard_normal((n, centers.shape[1]))


# ---- metrics on features -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("num_classes,ks", [(7, (1, 5)), (3, (1, 5)), (12, (1, 2, 20))])
def test_zeroshot_metrics_match_reference(num_classes, ks):
    rng = np.random.default_rng(num_classes)
    cls = rng.standard_normal((num_classes, 16))
    labels = rng.integers(0, num_classes, 80)
    img = clustered(rng, 80, cls, labels, noise=1.2)  # hard enough that top-1 is neither 0 nor 1
    got = E.zeroshot_metrics(img.astype(np.float32), cls.astype(np.float32), labels, ks=ks, confusion=True)
    want, predicted = ref_zeroshot(img, cls, labels, ks)
    for key, value in want.items():
        assert got[key] == pytest.approx(value) if key != "per_class" else got[key] == value
    assert 0 < got["top1"] < 1
    expected_confusion = np.zeros((num_classes, num_classes), int)
    for y, p in zip(labels, predicted):
        expected_confusion[y, p] += 1
    np.testing.assert_array_equal(got["confusion"], expected_confusion)
    for k in ks:
        if k >= num_classes:  # k past the class count: every image is a hit
            assert got[f"top{k}"] == 1.0


def test_zeroshot_ties_go_to_the_lower_class_index():
    eye = np.eye(3, dtype=np.float32)
    cls = eye[[0, 1, 0]]  # classes 0 and 2 share one embedding (e.g. duplicate names)
    got = E.zeroshot_metrics(eye[[0, 0]], cls, [0, 2], ks=(1, 2), confusion=True)
    assert got["per_class"] == [1.0, None, 0.0] and got["top1"] == 0.5 and got["top2"] == 1.0
    assert got["confusion"][2, 0] == 1
    assert got == {**got, **ref_zeroshot(eye[[0, 0]], cls, np.array([0, 2]), (1, 2))[0]}


def test_zeroshot_rejects_labels_outside_the_classes():
    with pytest.raises(ValueError, match="labels must index the 2 classnames"):
        E.zeroshot_metrics(np.ones((2, 4)), np.ones((2, 4)), [0, 2])


def test_retrieval_metrics_match_reference_with_several_captions():
    rng = np.random.default_rng(0)
    img = rng.standard_normal((25, 16))
    ids = np.sort(np.concatenate([np.arange(25), rng.integers(0, 25, 30)]))  # 1 to several captions per image
    txt = clustered(rng, len(ids), img, ids, noise=1.5)
    got = E.retrieval_metrics(img.astype(np.float32), txt.astype(np.float32), ids)
    want = ref_retrieval(img, txt, ids)
    assert {k: got[k] for k in want} == pytest.approx(want)
    assert 0 < got["i2t_r1"] < 1 and 0 < got["t2i_r1"] < 1 and (got["n_images"], got["n_texts"]) == (25, len(ids))
    # One caption per image, text j of image j: the default pairing.
    pair = E.retrieval_metrics(img, txt[np.unique(ids, return_index=True)[1]])
    assert pair == E.retrieval_metrics(img, txt[np.unique(ids, return_index=True)[1]], np.arange(25))


def test_retrieval_any_caption_hits_and_ties_follow_text_order():
    eye = np.eye(3, dtype=np.float32)
    # Image 0 = e0 has a far caption (e2) and an exact one (e0): any caption in the top 1 is a hit.
    got = E.retrieval_metrics(eye[[0, 1]], eye[[2, 0, 1]], [0, 0, 1])
    assert got["i2t_r1"] == 1.0
    # Texts 0 and 1 are both e0 (a tie for image 0); text 0 belongs to image 1, so image 0's caption ranks second.
    got = E.retrieval_metrics(eye[[0, 1]], eye[[0, 0, 1]], [1, 0, 1])
    assert got["i2t_r1"] == 0.5 and got["i2t_r5"] == 1.0
    swapped = E.retrieval_metrics(eye[[0, 1]], eye[[0, 0, 1]], [0, 1, 1])  # now image 0's caption is listed first
    assert swapped["i2t_r1"] == 1.0
    for ids in ([1, 0, 1], [0, 1, 1]):
        want = ref_retrieval(eye[[0, 1]], eye[[0, 0, 1]], np.array(ids))
        assert {k: v for k, v in E.retrieval_metrics(eye[[0, 1]], eye[[0, 0, 1]], ids).items() if k in want} == want


# ---- the model-level path on the tiny model ----------------------------------------------------------------------

CLASSES = ["red square", "blue circle", "green line"]
TEMPLATES = ["a photo of a {}.", "a drawing of a {}."]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    model_dir = init_model("tiny", 0, root / "model")
    rng = np.random.default_rng(0)
    (root / "data" / "img").mkdir(parents=True)
    rows = []
    for i in range(8):  # varied sizes and one grayscale image, so resize, crop and mode handling all run
        w, h = int(rng.integers(28, 60)), int(rng.integers(28, 60))
        mode_shape = ("L", (h, w)) if i == 3 else ("RGB", (h, w, 3))
        Image.fromarray(rng.integers(0, 256, mode_shape[1], dtype=np.uint8), mode_shape[0]).save(root / f"data/img/{i}.png")
        rows.append({"filepath": f"img/{i}.png", "caption": f"picture {i} of a {CLASSES[i % 3]}", "label": i % 3})
    extra = [{**rows[i], "caption": f"another caption {i}"} for i in (1, 5, 5)]  # several captions per image

    def write(name, rows, fields=("filepath", "caption", "label")):
        with open(root / "data" / name, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(fields), extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        return str(root / "data" / name)

    (root / "data" / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    (root / "data" / "templates.txt").write_text("\n".join(TEMPLATES) + "\n")
    return {"root": root, "model": str(model_dir), "cls": write("cls.csv", rows),
            "pairs": write("pairs.csv", rows[:3] + extra[:1] + rows[3:] + extra[1:]),
            "nolabel": write("nolabel.csv", rows, ("filepath", "caption")),
            "nocaption": write("nocaption.csv", rows, ("filepath", "label")), "loaded": load(model_dir)}


def hand_image_features(model, preprocess, paths):
    pixels = [preprocess.to_numpy(Image.open(p)) for p in paths]
    return unit(np.concatenate([np.array(model.encode_image(mx.array(x[None]))) for x in pixels]))


def hand_classifier(model, tokenizer):
    emb = [unit(np.array(model.encode_text(tokenizer([t.format(c) for t in TEMPLATES])))).mean(0) for c in CLASSES]
    return unit(np.stack(emb))


def test_class_embeddings_are_mean_of_normalized_templates(setup):
    model, tokenizer, _ = setup["loaded"]
    got = E.class_embeddings(model, tokenizer, CLASSES, TEMPLATES, batch_size=4)
    np.testing.assert_allclose(got, hand_classifier(model, tokenizer), atol=1e-5)
    with pytest.raises(ValueError, match="needs a '{}'"):
        E.class_embeddings(model, tokenizer, CLASSES, ["no placeholder"])


def test_evaluate_zeroshot_equals_hand_computation(setup):
    model, tokenizer, pre = setup["loaded"]
    records = read_csv(setup["cls"])
    img = hand_image_features(model, pre, [r["image"] for r in records])
    np.testing.assert_allclose(E.encode_images(model, pre, [r["image"] for r in records], 3), img, atol=1e-5)
    labels = np.array([r["label"] for r in records])
    want, _ = ref_zeroshot(img, hand_classifier(model, tokenizer), labels)
    got = E.evaluate_zeroshot(model, tokenizer, pre, records, CLASSES, TEMPLATES, batch_size=3)
    assert {k: got[k] for k in want} == want and got["n"] == 8
    batches = list(E.iter_eval_batches(records, pre, batch_size=5))  # data given as batches instead of records
    assert E.evaluate_zeroshot(model, tokenizer, pre, batches, CLASSES, TEMPLATES) == got
    arrays = np.concatenate([b["images"] for b in batches])
    assert E.zeroshot_from_arrays(model, tokenizer, arrays, labels, CLASSES, TEMPLATES, batch_size=4) == got


def test_evaluate_retrieval_groups_captions_by_image(setup):
    model, tokenizer, pre = setup["loaded"]
    records = read_csv(setup["pairs"])
    paths = list(dict.fromkeys(r["image"] for r in records))  # first appearance order
    captions = [(paths.index(r["image"]), r["caption"]) for r in records]
    ids = np.array([i for i, _ in sorted(captions, key=lambda c: c[0])])
    texts = [t for _, t in sorted(captions, key=lambda c: c[0])]
    txt = unit(np.array(model.encode_text(tokenizer(texts))))
    want = ref_retrieval(hand_image_features(model, pre, paths), txt, ids)
    got = E.evaluate_retrieval(model, tokenizer, pre, records, batch_size=3)
    assert {k: got[k] for k in want} == want and (got["n_images"], got["n_texts"]) == (8, 11)
    assert E.evaluate_retrieval(model, tokenizer, pre, list(E.iter_eval_batches(records, pre, 4))) == got


def test_unreadable_image_takes_its_captions_with_it(setup, tmp_path):
    model, tokenizer, pre = setup["loaded"]
    records = read_csv(setup["pairs"])
    (tmp_path / "broken.png").write_bytes(b"not a png")
    bad = [{**r, "image": str(tmp_path / "broken.png")} for r in records if r["key"] == "img/5.png"]
    kept = [r for r in records if r["key"] != "img/5.png"]
    batches = E.iter_eval_batches([*kept[:4], *bad, *kept[4:]], pre, batch_size=3, max_bad_fraction=0.5)
    got = E.evaluate_retrieval(model, tokenizer, pre, batches)
    assert (got["n_images"], got["n_texts"]) == (7, 8)
    assert got == E.evaluate_retrieval(model, tokenizer, pre, kept)


# ---- the command ---------------------------------------------------------------------------------------------------

def cli(monkeypatch, capsys, *args):
    monkeypatch.setattr(sys, "argv", ["mlxclip", "eval", *args])
    try:
        run()
        code = 0
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_json_equals_function(setup, monkeypatch, capsys):
    for task, data in (("zeroshot", setup["cls"]), ("retrieval", setup["pairs"])):
        args = ["--model", setup["model"], "--data", data, "--task", task, "--batch-size", "3"]
        if task == "zeroshot":
            args += ["--templates", str(setup["root"] / "data/templates.txt")]
        code, out, _ = cli(monkeypatch, capsys, *args, "--json")
        assert code == 0 and len(out.strip().splitlines()) == 1
        expected = E.evaluate(setup["model"], data, task, None, args[-1] if task == "zeroshot" else None)
        assert json.loads(out) == expected
        keys = ("top1", "top5") if task == "zeroshot" else [f"{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)]
        assert all(0 <= json.loads(out)[k] <= 1 for k in keys)
    code, out, _ = cli(monkeypatch, capsys, "--model", setup["model"], "--data", setup["cls"])
    assert code == 0 and "top-1" in out and "top-5" in out and "green line" in out


def test_cli_class_folders_and_classnames_csv(setup, monkeypatch, capsys):
    root = setup["root"] / "folders"
    for r in read_csv(setup["cls"]):
        (root / CLASSES[r["label"]].replace(" ", "_")).mkdir(parents=True, exist_ok=True)
        Image.open(r["image"]).save(root / CLASSES[r["label"]].replace(" ", "_") / r["key"].split("/")[-1])
    code, out, _ = cli(monkeypatch, capsys, "--model", setup["model"], "--data", str(root), "--json")
    folders = json.loads(out)
    assert code == 0 and folders["n"] == 8 and folders["classnames"] == sorted(CLASSES)
    names = setup["root"] / "names.csv"
    names.write_text("label,classname\n2,green line\n0,red square\n1,blue circle\n")
    assert E.load_classnames(names) == CLASSES
    code, out, _ = cli(monkeypatch, capsys, "--model", setup["model"], "--data", setup["cls"], "--classnames",
                       str(names), "--json")
    assert code == 0 and json.loads(out) == E.evaluate(setup["model"], setup["cls"])  # same as classes.txt


@pytest.mark.parametrize("case,task,message", [
    ("nolabel", "zeroshot", "no label"),
    ("nocaption", "retrieval", "no caption column 'caption'"),
    ("missing_names", "zeroshot", "classnames file not found"),
    ("bad_templates", "zeroshot", "template needs a '{}'"),
    ("few_names", "zeroshot", "label 2 has no class name"),
    ("no_names", "zeroshot", "pass --classnames FILE"),
])
def test_cli_errors_are_clear(setup, monkeypatch, capsys, case, task, message):
    args = ["--model", setup["model"], "--task", task]
    if case in ("nolabel", "nocaption"):
        args += ["--data", setup[case]]
    elif case == "missing_names":
        args += ["--data", setup["cls"], "--classnames", str(setup["root"] / "nope.txt")]
    elif case == "no_names":  # a CSV with no classes.txt beside it
        (setup["root"] / "other").mkdir(exist_ok=True)
        rows = [f"{r['image']},x,{r['label']}" for r in read_csv(setup["cls"])]
        (setup["root"] / "other/val.csv").write_text("\n".join(["filepath,caption,label", *rows]) + "\n")
        args += ["--data", str(setup["root"] / "other/val.csv")]
    elif case == "few_names":
        (setup["root"] / "two.txt").write_text("red square\nblue circle\n")
        args += ["--data", setup["cls"], "--classnames", str(setup["root"] / "two.txt")]
    else:
        (setup["root"] / "bad.txt").write_text("a photo of a thing\n")
        args += ["--data", setup["cls"], "--templates", str(setup["root"] / "bad.txt")]
    code, out, err = cli(monkeypatch, capsys, *args)
    assert code == 1 and out == "" and err.startswith("error:") and message in err


def test_classnames_files(tmp_path):
    (tmp_path / "a.txt").write_text("cat\n\ndog\n")
    (tmp_path / "b.csv").write_text("class\ncat\ndog\n")
    (tmp_path / "c.csv").write_text("label,classname\n0,cat\n2,dog\n")
    (tmp_path / "d.csv").write_text("id,title\n0,cat\n")
    assert E.load_classnames(tmp_path / "a.txt") == E.load_classnames(tmp_path / "b.csv") == ["cat", "dog"]
    with pytest.raises(ValueError, match="labels must be 0..1"):
        E.load_classnames(tmp_path / "c.csv")
    with pytest.raises(ValueError, match="no 'classname'"):
        E.load_classnames(tmp_path / "d.csv")
