"""Evaluation: zero-shot classification (top-k, per-class accuracy) and image–text retrieval (R@k).

The metrics are pure numpy functions of features; the model-level functions only turn pixels and captions into
normalized features first. Ranking rule everywhere: scores sort descending and equal scores keep index order, so a
tie goes to the lower class / text / image index (a stable sort): deterministic, and duplicate captions or
classnames rank in the order they are listed.
"""

from __future__ import annotations

import csv
import itertools
from pathlib import Path
from typing import Iterable, Sequence

import mlx.core as mx
import numpy as np
from PIL import Image

from mlx_clip import cpu_streams
from mlx_clip.data import Loader, LoaderConfig, decode_image, open_source
from mlx_clip.tokenizer import trim_padding

DEFAULT_TEMPLATES = ("a photo of a {}.",)
RECALL_KS = (1, 5, 10)
_CHUNK = 1024  # query rows ranked at once: bounds the (rows, candidates) sort to a few hundred MB


# ---- metrics on features (numpy only) ----------------------------------------------------------------------------

def _unit(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def best_ranks(queries, candidates, targets) -> np.ndarray:
    """For each query row: the 0-based rank of its best-ranked target among the candidates, by cosine similarity.

    `targets(rows)` gives a (len(rows), n_candidates) bool mask of the correct candidates of those query rows.
    """
    q, c = _unit(queries), _unit(candidates)
    out = np.empty(len(q), dtype=np.int64)
    for start in range(0, len(q), _CHUNK):
        rows = np.arange(start, min(start + _CHUNK, len(q)))
        order = np.argsort(-(q[rows] @ c.T), axis=1, kind="stable")  # stable: ties keep index order
        hits = np.take_along_axis(targets(rows), order, axis=1)
        if not hits.any(axis=1).all():
            raise ValueError(f"query row {rows[~hits.any(axis=1)][0]} has no correct candidate (an image without "
                             "captions?)")
        out[rows] = np.argmax(hits, axis=1)  # position of the first correct candidate in the ranking
    return out


def zeroshot_metrics(image_features, class_text_features, labels, ks=(1, 5), confusion: bool = False) -> dict:
    """`top{k}` for k in ks (fractions; a k above the number of classes counts every image as a hit), `per_class`
    top-1 accuracy (None for a class without images), `n`; `confusion` (true x predicted counts) when asked."""
    labels = np.asarray(labels, dtype=np.int64)
    num_classes = len(class_text_features)
    if len(labels) != len(image_features) or len(labels) == 0:
        raise ValueError(f"need one label per image and at least one image, got {len(labels)} labels "
                         f"for {len(image_features)} images")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must index the {num_classes} classnames (0..{num_classes - 1}), "
                         f"got labels from {labels.min()} to {labels.max()}")
    ranks = best_ranks(image_features, class_text_features, lambda r: labels[r, None] == np.arange(num_classes))
    out = {f"top{k}": float(np.mean(ranks < k)) for k in ks}
    out["per_class"] = [float(np.mean(ranks[labels == c] == 0)) if np.any(labels == c) else None
                        for c in range(num_classes)]
    out["n"] = int(len(labels))
    if confusion:
        predicted = np.argmax(_unit(image_features) @ _unit(class_text_features).T, axis=1)  # first max: ties low
        out["confusion"] = np.zeros((num_classes, num_classes), np.int64)
        np.add.at(out["confusion"], (labels, predicted), 1)
    return out


def retrieval_metrics(image_features, text_features, image_ids_of_texts=None, ks=RECALL_KS) -> dict:
    """`i2t_r{k}`: fraction of images with ANY of their captions in the top k texts; `t2i_r{k}`: fraction of
    texts whose image is in the top k images. `image_ids_of_texts[j]` is the image of text j (default: text j
    belongs to image j). Also `n_images`, `n_texts`."""
    n_images, n_texts = len(image_features), len(text_features)
    ids = np.arange(n_texts) if image_ids_of_texts is None else np.asarray(image_ids_of_texts, dtype=np.int64)
    if len(ids) != n_texts or (image_ids_of_texts is None and n_texts != n_images) or n_texts == 0:
        raise ValueError(f"{n_texts} texts, {n_images} images and {len(ids)} image ids do not pair up")
    if ids.min() < 0 or ids.max() >= n_images:
        raise ValueError(f"image ids must lie in 0..{n_images - 1}")
    i2t = best_ranks(image_features, text_features, lambda r: ids[None, :] == r[:, None])
    t2i = best_ranks(text_features, image_features, lambda r: ids[r, None] == np.arange(n_images))
    out = {f"i2t_r{k}": float(np.mean(i2t < k)) for k in ks}
    out |= {f"t2i_r{k}": float(np.mean(t2i < k)) for k in ks}
    return out | {"n_images": n_images, "n_texts": n_texts}


# ---- features from a model ---------------------------------------------------------------------------------------

def encode_texts(model, tokenizer, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
    out = [np.array(model.encode_text(trim_padding(tokenizer(list(texts[i: i + batch_size]))), normalize=True)
                    .astype(mx.float32))
           for i in range(0, len(texts), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, model.config.projection_dim), np.float32)


def encode_images(model, preprocess, images, batch_size: int = 64) -> np.ndarray:
    """Normalized features of an (N, H, W, 3) array of preprocessed pixels, or of a sequence of PIL images, paths
    or encoded bytes (decoded and preprocessed here; `preprocess` is unused for arrays)."""
    out = []
    for i in range(0, len(images), batch_size):
        chunk = images[i: i + batch_size]
        if not isinstance(chunk, (np.ndarray, mx.array)):
            chunk = np.stack([preprocess.to_numpy(img if isinstance(img, Image.Image) else decode_image(img, mode=None))
                              for img in chunk])
        out.append(np.array(model.encode_image(mx.array(chunk), normalize=True).astype(mx.float32)))
    return np.concatenate(out) if out else np.zeros((0, model.config.projection_dim), np.float32)


def class_embeddings(model, tokenizer, classnames: Sequence[str], templates=DEFAULT_TEMPLATES,
                     batch_size: int = 256) -> np.ndarray:
    """CLIP's zero-shot classifier: per class, the mean of its normalized template embeddings, renormalized."""
    _check_templates(templates, "templates")
    texts = [t.format(c) for c in classnames for t in templates]
    features = encode_texts(model, tokenizer, texts, batch_size).reshape(len(classnames), len(templates), -1)
    return _unit(features.mean(axis=1))


def zeroshot_from_arrays(model, tokenizer, images_nhwc, labels, classnames, templates=DEFAULT_TEMPLATES,
                         batch_size: int = 64) -> dict:
    """Zero-shot metrics of pre-decoded pixels (what `finetune` calls on its val arrays)."""
    classifier = class_embeddings(model, tokenizer, classnames, templates)
    return zeroshot_metrics(encode_images(model, None, images_nhwc, batch_size), classifier, labels)


def retrieval_from_arrays(model, tokenizer, images_nhwc, texts, image_ids_of_texts=None, batch_size: int = 64) -> dict:
    images = encode_images(model, None, images_nhwc, batch_size)
    return retrieval_metrics(images, encode_texts(model, tokenizer, texts), image_ids_of_texts)


# ---- records and batches -----------------------------------------------------------------------------------------

def iter_eval_batches(records, preprocess, batch_size: int = 64, max_bad_fraction: float = 0.01):
    """Batches `{"images", "texts", "labels", "keys"}` in record order with the model's eval preprocessing
    (Pillow decode + `preprocess.to_numpy`, in threads); unreadable images are skipped and counted."""
    config = LoaderConfig(batch_size=batch_size, train=False, max_bad_fraction=max_bad_fraction)
    return iter(Loader(records, preprocess, config))


def _peek(data) -> tuple[bool, Iterable[dict]]:
    """(is it batches?, the items): `data` is records (a list, a `Source`, a stream) or an iterable of batches
    as `iter_eval_batches` yields them."""
    data = getattr(data, "records", data)
    items = iter(data)
    first = next(items, None)
    if first is None:
        raise ValueError("no data to evaluate")
    return "images" in first, data if isinstance(data, Sequence) else itertools.chain([first], items)


def evaluate_zeroshot(model, tokenizer, preprocess, data, classnames, templates=DEFAULT_TEMPLATES,
                      batch_size: int = 64) -> dict:
    is_batches, items = _peek(data)
    if not is_batches and isinstance(items, Sequence):  # fail before decoding anything when labels are missing
        _labels([r["label"] for r in items], len(classnames))
    features, labels = [], []
    for batch in items if is_batches else iter_eval_batches(items, preprocess, batch_size):
        features.append(encode_images(model, None, batch["images"], batch_size))
        labels.append(_labels(batch["labels"], len(classnames)))
    classifier = class_embeddings(model, tokenizer, classnames, templates)
    return zeroshot_metrics(np.concatenate(features), classifier, np.concatenate(labels))


def _labels(labels, num_classes: int) -> np.ndarray:
    labels = np.array([-1 if x is None else x for x in labels], np.int64)  # the Loader already writes None as -1
    if np.any(labels < 0):
        raise ValueError(f"{np.sum(labels < 0)} of {len(labels)} images have no label; zero-shot evaluation needs "
                         "a 'label' column of class indices")
    if np.any(labels >= num_classes):
        raise ValueError(f"label {labels.max()} has no class name: only {num_classes} classnames given")
    return labels


def _first_per_image(records, captions: dict) -> Iterable[dict]:
    """Each image (`key`) once, so it is decoded once; every caption of it is collected into `captions`."""
    for r in records:
        if r["key"] not in captions:
            captions[r["key"]] = []
            yield r
        captions[r["key"]].append(r["caption"])


def evaluate_retrieval(model, tokenizer, preprocess, data, batch_size: int = 64) -> dict:
    """Records (or batch rows) sharing a `key` are one image with several captions; an image→text hit counts when
    any of its captions ranks in the top k. Images skipped as unreadable take their captions with them."""
    is_batches, items = _peek(data)
    captions: dict[str, list[str]] = {}  # key -> captions, in first-seen order
    batches = items if is_batches else iter_eval_batches(_first_per_image(items, captions), preprocess, batch_size)
    keys, features = {}, []  # key -> image index (dicts keep insertion order)
    for batch in batches:
        new = []
        for i, key in enumerate(batch["keys"]):
            if is_batches:
                captions.setdefault(key, []).append(batch["texts"][i])
            if key not in keys:
                keys[key] = len(keys)
                new.append(i)
        if new:
            features.append(encode_images(model, None, np.asarray(batch["images"])[new], batch_size))
    texts = [t for k in keys for t in captions[k]]
    ids = [i for k, i in keys.items() for _ in captions[k]]
    return retrieval_metrics(np.concatenate(features), encode_texts(model, tokenizer, texts), ids)


# ---- files and the `mlxclip eval` command ------------------------------------------------------------------------

def load_classnames(path) -> list[str]:
    """Class names in label order from a text file (one per line), or a .csv/.tsv with a `classname` (or `class`,
    `name`) column, ordered by its `label` column when present (labels must then be 0..C-1), else by row."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: classnames file not found")
    if path.suffix.lower() not in (".csv", ".tsv"):
        return _lines(path, "class names")
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ","))
    columns = list(rows[0]) if rows else []
    column = next((c for c in ("classname", "class", "name") if c in columns), None)
    if column is None:
        raise ValueError(f"{path}: no 'classname' (or 'class', 'name') column; columns present: {columns}")
    if "label" not in columns:
        return [row[column] for row in rows]
    by_label = {int(row["label"]): row[column] for row in rows}
    if sorted(by_label) != list(range(len(by_label))):
        raise ValueError(f"{path}: labels must be 0..{len(by_label) - 1} each once, got {sorted(by_label)}")
    return [by_label[i] for i in range(len(by_label))]


def load_templates(path=None) -> list[str]:
    """`{}` templates, one per line (default: "a photo of a {}.")."""
    if path is None:
        return list(DEFAULT_TEMPLATES)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: templates file not found")
    return _check_templates(_lines(path, "templates"), str(path))


def _lines(path: Path, what: str) -> list[str]:
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"{path}: no {what} (expected one per line)")
    return lines


def _check_templates(templates, where: str) -> list[str]:
    bad = [t for t in templates if "{}" not in t]
    if bad or not templates:
        raise ValueError(f"{where}: each template needs a '{{}}' for the class name; got {list(bad or templates)!r}")
    return list(templates)


def evaluate(model, data, task="zeroshot", classnames=None, templates=None, batch_size: int = 64) -> dict:
    """`mlxclip eval`: load a model dir (or hub id / "builtin"), open `data` (CSV/TSV, JSONL, class folders, tar
    shards) and run `task`. Zero-shot classnames default to the source's own (class folders, `classes.txt`)."""
    from mlx_clip.io import load

    if task not in ("zeroshot", "retrieval"):
        raise ValueError(f"task must be 'zeroshot' or 'retrieval', got {task!r}")
    source = open_source(data, **({} if task == "retrieval" else {"caption_key": None}))  # no captions needed
    if task == "retrieval":
        with cpu_streams.batch_parallel_mode():
            return evaluate_retrieval(*load(model), source, batch_size)
    names = load_classnames(classnames) if classnames else source.classnames
    if not names:
        raise ValueError(f"{data}: no class names known (no class folders or classes.txt beside it); "
                         "pass --classnames FILE")
    templates = load_templates(templates)
    with cpu_streams.batch_parallel_mode():  # a throughput job: each batch cut over the CPU's cores
        result = evaluate_zeroshot(*load(model), source, names, templates, batch_size)
    return result | {"classnames": names}  # names the per_class entries


def format_table(result: dict) -> str:
    if "top1" in result:
        lines = [f"zero-shot, {result['n']} images, {len(result['per_class'])} classes"]
        lines += [f"  {k.replace('top', 'top-'):>8}  {v:7.2%}" for k, v in result.items() if k.startswith("top")]
        names = result.get("classnames") or [str(i) for i in range(len(result["per_class"]))]
        width = max(map(len, names))
        lines += ["per-class top-1:"] + [f"  {name:<{width}}  {'-' if acc is None else f'{acc:7.2%}'}"
                                         for name, acc in zip(names, result["per_class"])]
        return "\n".join(lines)
    ks = sorted(int(k[5:]) for k in result if k.startswith("i2t_r"))
    lines = [f"retrieval, {result['n_images']} images, {result['n_texts']} texts",
             "       " + "".join(f"{f'R@{k}':>9}" for k in ks)]
    lines += [f"  {d:<5}" + "".join(f"{result[f'{d}_r{k}']:9.2%}" for k in ks) for d in ("i2t", "t2i")]
    return "\n".join(lines)
