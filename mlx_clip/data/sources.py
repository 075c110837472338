"""Readers for the image–caption formats users bring. Each yields records
`{"image": path_or_bytes, "caption": str, "label": int | None, "key": str}` and knows nothing about pixels.

CSV/TSV, JSONL and class folders are read into lists (random access: the pipeline can shuffle and resume by index);
WebDataset shards are streamed from tar files and never held in memory.
"""

from __future__ import annotations

import csv
import json
import os
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "tif", "tiff", "bmp", "gif", "dcm")  # dcm: the dicom extra


class DataError(ValueError):
    """A data source that cannot be read as asked (missing column, bad label, empty folder...)."""


def _label(value, where: str) -> int | None:
    if value is None or (isinstance(value, str) and value.strip() == ""):
        return None
    try:
        return int(value)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{where}: label {value!r} is not an integer class index") from exc


def _resolve(root: Path, image: str) -> str:
    return image if os.path.isabs(image) else str(root / image)


def _sep_for(path: Path, header: str) -> str:
    if path.suffix.lower() == ".tsv":
        return "\t"
    if path.suffix.lower() == ".csv":
        return ","
    return "\t" if "\t" in header else ","  # other extensions: guess from the header line


def _require(columns: Sequence[str], wanted: str, path: Path, what: str) -> None:
    if wanted not in columns:
        raise DataError(
            f"{path}: no {what} column {wanted!r}; columns present: {', '.join(map(repr, columns))}"
        )


def read_csv(path, image_key="filepath", caption_key="caption", label_key="label", sep=None) -> list[dict]:
    """Read a CSV/TSV of image–caption pairs. `sep=None` picks tab for .tsv and comma for .csv.

    Relative image paths resolve against the CSV's folder. The label column is optional (labels are None when it
    is absent or a cell is empty); `caption_key=None` reads images and labels only (captions are then "").
    """
    path = Path(path)
    with open(path, newline="", encoding="utf-8") as f:
        header = f.readline()
        f.seek(0)
        reader = csv.DictReader(f, delimiter=sep or _sep_for(path, header))
        columns = reader.fieldnames or []
        _require(columns, image_key, path, "image")
        if caption_key is not None:
            _require(columns, caption_key, path, "caption")
        has_label = label_key is not None and label_key in columns
        records = []
        for line, row in enumerate(reader, start=2):
            image = row[image_key]
            if not image:
                raise DataError(f"{path}:{line}: empty {image_key!r} cell")
            records.append({
                "image": _resolve(path.parent, image),
                "caption": row[caption_key] if caption_key else "",
                "label": _label(row[label_key], f"{path}:{line}") if has_label else None,
                "key": image,
            })
    return records


def read_jsonl(path, image_key="image", caption_key="caption", label_key="label") -> list[dict]:
    """Read one JSON object per line; relative image paths resolve against the file's folder."""
    path = Path(path)
    records = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            row = json.loads(line)
            where = f"{path}:{line_no}"
            if image_key not in row:
                raise DataError(f"{where}: no {image_key!r} key; keys present: {', '.join(map(repr, row))}")
            if caption_key is not None and caption_key not in row:
                raise DataError(f"{where}: no {caption_key!r} key; keys present: {', '.join(map(repr, row))}")
            records.append({
                "image": _resolve(path.parent, row[image_key]),
                "caption": row[caption_key] if caption_key else "",
                "label": _label(row.get(label_key), where) if label_key else None,
                "key": str(row.get("key", row[image_key])),
            })
    return records


def read_folder(root, templates: Sequence[str] = ("a photo of a {}.",)) -> tuple[list[dict], list[str]]:
    """Read `root/<class>/<image>`; labels index the sorted folder names, captions fill the templates in turn.

    Returns (records, classnames); class names are the folder names with `_` shown as spaces.
    """
    root = Path(root)
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise DataError(f"{root}: no class folders (expected root/<class>/<image>)")
    classnames = [name.replace("_", " ") for name in folders]
    records = []
    for label, folder in enumerate(folders):
        files = sorted(p for p in (root / folder).iterdir() if p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS)
        for i, file in enumerate(files):
            # Cycle templates per image so training sees them all; deterministic, unlike a random pick.
            caption = templates[i % len(templates)].format(classnames[label])
            records.append({"image": str(file), "caption": caption, "label": label, "key": f"{folder}/{file.name}"})
    return records, classnames


def expand_braces(pattern: str) -> list[str]:
    """Expand `{000000..000003}` ranges (zero padding kept) and `{a,b}` lists, as WebDataset does."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if not match:
        return [pattern]
    head, tail, body = pattern[: match.start()], pattern[match.end():], match.group(1)
    span = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if span:
        lo, hi = span.groups()
        items = [str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1)]
    else:
        items = body.split(",")
    return [out for item in items for out in expand_braces(head + item + tail)]


def _split_member(name: str) -> tuple[str, str]:
    """WebDataset convention: the key is the path up to the first dot of the basename; the rest is the field."""
    folder, base = os.path.split(name)
    stem, _, ext = base.partition(".")
    return os.path.join(folder, stem), ext.lower()


@dataclass
class WebDataset:
    """Stream records from WebDataset tar shards (re-iterable: each `iter()` reads the shards again).

    A sample is consecutive members sharing a key: an image (`key.jpg|png|...`) plus a caption in `key.txt`,
    or `key.json` holding `caption_key`/`label_key`, and optionally a label in `key.cls`.
    """

    urls: list[str]
    caption_key: str = "caption"
    label_key: str = "label"
    skipped: list[str] = field(default_factory=list)  # keys that had no image member

    def __iter__(self) -> Iterator[dict]:
        for url in self.urls:
            yield from self._read_shard(url)

    def _read_shard(self, url: str) -> Iterator[dict]:
        current, fields = None, {}
        with tarfile.open(url, mode="r|*") as tar:  # stream mode: members are read in order, no seeking
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = _split_member(member.name)
                if key != current and current is not None:
                    yield from self._record(url, current, fields)
                    fields = {}
                current = key
                fields[ext] = tar.extractfile(member).read()
        if current is not None:
            yield from self._record(url, current, fields)

    def _record(self, url: str, key: str, fields: dict) -> Iterator[dict]:
        image = next((fields[e] for e in IMAGE_EXTENSIONS if e in fields), None)
        if image is None:
            self.skipped.append(f"{url}:{key}")
            return
        meta = json.loads(fields["json"]) if "json" in fields else {}
        caption = fields["txt"].decode("utf-8").strip() if "txt" in fields else str(meta.get(self.caption_key, ""))
        label = fields["cls"].decode().strip() if "cls" in fields else meta.get(self.label_key)
        yield {"image": image, "caption": caption, "label": _label(label, f"{url}:{key}"), "key": key}


def read_webdataset(pattern: str, caption_key="caption", label_key="label") -> WebDataset:
    """Shards from a path, a brace pattern (`shards/{000000..000003}.tar`) or a `::`-separated list."""
    urls = [url for part in pattern.split("::") for url in expand_braces(part)]
    return WebDataset(urls, caption_key=caption_key, label_key=label_key)


@dataclass
class Source:
    """What `open_source` returns: the records (a list, or a streamed `WebDataset`) and class names if known."""

    records: Sequence[dict] | Iterable[dict]
    classnames: list[str] | None = None
    spec: str = ""

    @property
    def streamed(self) -> bool:
        return not isinstance(self.records, Sequence)

    def __iter__(self):
        return iter(self.records)

    def __len__(self):
        if self.streamed:
            raise TypeError(f"{self.spec}: a streamed source has no length")
        return len(self.records)


def _classes_beside(path: Path) -> list[str] | None:
    """Synthetic datasets (and many exports) keep `classes.txt` next to their CSVs: pick it up when present."""
    file = path.parent / "classes.txt"
    return [ln.strip() for ln in file.read_text().splitlines() if ln.strip()] if file.is_file() else None


def open_source(spec, templates: Sequence[str] = ("a photo of a {}.",), **keys) -> Source:
    """Open a data source by its path: a folder of class folders, a .csv/.tsv/.jsonl file, or tar shard(s).

    `keys` pass column/key names through to the reader (`image_key`, `caption_key`, `label_key`, `sep`).
    """
    spec = str(spec)
    path = Path(spec)
    if path.is_dir():
        records, classnames = read_folder(path, templates)
        return Source(records, classnames, spec)
    lower = spec.lower()
    if lower.endswith(".tar") or "{" in spec or "::" in spec:
        wds_keys = {k: v for k, v in keys.items() if k in ("caption_key", "label_key") and v is not None}
        return Source(read_webdataset(spec, **wds_keys), None, spec)
    if not path.exists():
        raise DataError(f"{spec}: no such file or folder")
    if lower.endswith(".jsonl"):
        return Source(read_jsonl(path, **keys), _classes_beside(path), spec)
    if lower.endswith((".csv", ".tsv", ".txt")):
        return Source(read_csv(path, **keys), _classes_beside(path), spec)
    raise DataError(f"{spec}: unknown data source (expected a class folder, .csv, .tsv, .jsonl or .tar shards)")
