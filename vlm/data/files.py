"""Readers of image–caption pairs for contrastive pretraining: from a JSONL file, a folder or any Hugging Face
dataset (fine-tuning and evaluation name their data through `vlm.data.named`).

A caption pair loader returns a `datasets.Dataset` with the columns image (RGB, optionally pre-resized to
`size` x `size`), text (one caption: a row with several becomes several pairs, or one) and source (the
rows' name, e.g. "my-captions"). A row that cannot be used (missing or unreadable image, empty caption,
malformed JSON line, missing key) is counted and skipped, never fatal (see `vlm.data.common`). Configuration
mistakes (a column that does not exist, a folder without captions) still raise, since no row could ever be
used.
"""

from __future__ import annotations

import csv
import json
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import datasets
from datasets import Image as ImageFeature

from vlm.data.common import (
    EMPTY_CAPTION,
    MALFORMED_LINE,
    MISSING_KEY,
    PAIR_FEATURES,
    Skip,
    SkipReport,
    build_rows,
    read_image,
)
from vlm.processing import IMAGE_EXTENSIONS

CaptionPolicy = Literal["all", "first", "random"]
_ROW = "vlm_row"  # the input row's number, for skip details ("row 7: ...")


def read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any] | str]]:
    """(line number, the line's JSON object or why it is not one) for every non-blank line."""
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as err:
                yield number, f"not JSON ({err.msg} at column {err.colno})"
                continue
            yield (
                number,
                value if isinstance(value, dict) else f"expected a JSON object, got {type(value).__name__}",
            )


# ---------------------------------------------------------------------------------------------------------
# Caption pairs


def from_jsonl(
    path: str | Path, image_key: str = "image", text_key: str = "text", **options: Any
) -> datasets.Dataset:
    """Pairs from a JSON Lines file: one object per line with an image path and a caption.

    `{"image": "cats/01.jpg", "text": "a cat on a mat"}`: the path is relative to the JSONL file's folder,
    or absolute. Blank lines are ignored; a malformed line, a missing key, a missing or unreadable image or
    an empty caption is counted and skipped. `options` (those of `from_folder` too):

    captions  "all" (default), "first" or "random": a caption may be a list of strings, "all" makes one pair
              per caption, "first" keeps the first, "random" one chosen per row with `seed` (default 0)
    size      pre-resize to `size` x `size` (default None: keep the size)
    source    names the rows (default: the file's stem)
    cache     keep the result under `cache_root()`, reused while the file and images are unchanged
              (default False)
    num_proc  worker processes (see `vlm.data.common.build_rows`)"""
    path = Path(path)
    rows = [(row, f"line {number}") for number, row in read_jsonl(path)]
    return _from_rows(rows, path.parent, image_key, text_key, path.stem, **options)


def from_folder(path: str | Path, text_key: str = "text", **options: Any) -> datasets.Dataset:
    """Pairs from a folder of images with captions, in the first of these layouts that is present:

    1. `metadata.jsonl` or `metadata.csv` (Hugging Face imagefolder): a `file_name` column, relative to the
       folder, and a caption column `text_key`;
    2. `captions.jsonl`: as `metadata.jsonl`, with the image under `file_name` or `image`;
    3. a caption file beside each image: `cat.jpg` + `cat.txt` (an image without one is skipped as an empty
       caption).

    `options` and the skipping of bad rows are as in `from_jsonl`. Raises `FileNotFoundError` for a folder
    with none of these layouts."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a folder")
    rows: list[tuple[dict[str, Any] | str, str]] = []  # (row or why the line is not one, its name)
    if (root / "metadata.jsonl").is_file() or (root / "captions.jsonl").is_file():
        name = "metadata.jsonl" if (root / "metadata.jsonl").is_file() else "captions.jsonl"
        rows = [(row, f"{name} line {number}") for number, row in read_jsonl(root / name)]
    elif (root / "metadata.csv").is_file():
        with (root / "metadata.csv").open(encoding="utf-8", newline="") as f:
            # line 1 is the header
            rows = [(row, f"metadata.csv line {n}") for n, row in enumerate(csv.DictReader(f), start=2)]
    else:
        images = [
            p
            for p in sorted(root.rglob("*"))
            if p.suffix.lower() in IMAGE_EXTENSIONS
            and not any(part.startswith(".") for part in p.relative_to(root).parts)
        ]
        if not images:
            raise FileNotFoundError(
                f"{root}: no metadata.jsonl, metadata.csv, captions.jsonl or images with .txt captions"
            )
        for image in images:
            caption_file = image.with_suffix(".txt")
            text = (
                caption_file.read_text(encoding="utf-8", errors="replace") if caption_file.is_file() else None
            )
            rows.append(({"image": str(image), text_key: text}, str(image.relative_to(root))))
    return _from_rows(rows, root, None, text_key, root.name, **options)


def _from_rows(
    rows: list[tuple[dict[str, Any] | str, str]],
    root: Path,
    image_key: str | None,
    text_key: str,
    name: str,
    *,
    captions: CaptionPolicy = "all",
    size: int | None = None,
    source: str | None = None,
    seed: int = 0,
    cache: bool = False,
    num_proc: int | None = None,
) -> datasets.Dataset:
    """`from_jsonl` and `from_folder` once their rows are read: (row or why it is not one, its name) ->
    pairs. Without `image_key`, a row's image is under "file_name" if it has one, else under "image"."""
    report = SkipReport(source or name)
    items = []
    for row, ref in rows:
        key = image_key or ("file_name" if isinstance(row, dict) and "file_name" in row else "image")
        if item := _parse_row(row, key, text_key, root, captions, seed, ref, report):
            items.append(item)
    return build_rows(
        report.source, items, _pairs, PAIR_FEATURES,
        report=report, cache=cache, num_proc=num_proc, size=size, source=report.source,
    )  # fmt: skip


def _parse_row(
    row: dict[str, Any] | str,
    image_key: str,
    text_key: str,
    root: Path,
    captions: CaptionPolicy,
    seed: int,
    ref: str,
    report: SkipReport,
) -> dict[str, Any] | None:
    """One JSON/CSV row (or why the line is not one) -> a record, or None after counting why it is skipped."""
    if isinstance(row, str):
        report.add(MALFORMED_LINE, f"{ref}: {row}")
        return None
    missing = [key for key in (image_key, text_key) if key not in row]
    if missing:
        report.add(MISSING_KEY, f"{ref}: no {' or '.join(map(repr, missing))}")
        return None
    image = row[image_key]
    if not isinstance(image, str) or not image.strip():
        report.add(MISSING_KEY, f"{ref}: {image_key!r} is not a file path: {image!r}")
        return None
    texts = _pick_captions(row[text_key], captions, seed, ref)
    if texts is None:
        report.add(EMPTY_CAPTION, f"{ref}: {text_key!r} is {row[text_key]!r}")
        return None
    path = str(root / Path(image.strip()).expanduser())  # `/` keeps absolute paths
    return {"image": path, "texts": texts, "ref": ref, "stamp": _stamp(path)}


def _stamp(path: str) -> str:
    """A file's size and modification time: part of the cache fingerprint, so editing an image (not only
    the caption file) makes a new dataset."""
    try:
        stat = os.stat(path)
    except OSError:
        return "missing"
    return f"{stat.st_size}:{stat.st_mtime_ns}"


def _pairs(record: dict[str, Any], size: int | None, source: str) -> list[dict[str, Any]]:
    """One record's image, validated and encoded, with each of its captions."""
    image = read_image(record["image"], record["ref"], size)
    return [{"image": image, "text": text, "source": source} for text in record["texts"]]


def _pick_captions(value: object, policy: CaptionPolicy, seed: int, ref: str) -> list[str] | None:
    """The captions to pair with one image; None when there is none usable (skipped as an empty caption)."""
    values = value if isinstance(value, (list, tuple)) else [value]
    texts = [" ".join(v.split()) for v in values if isinstance(v, str) and v.strip()]  # whitespace collapsed
    if not texts:
        return None
    if policy == "all":
        return texts
    if policy == "first":
        return texts[:1]
    if policy == "random":
        # Seeded by the row, not by a shared generator, so the choice is the same in any worker process.
        return [random.Random(f"{seed}:{ref}").choice(texts)]
    raise ValueError(f"captions must be 'all', 'first' or 'random', got {policy!r}")


def from_hf_dataset(
    data: str | Path | datasets.Dataset | datasets.DatasetDict | datasets.IterableDataset,
    image_column: str = "image",
    text_column: str = "text",
    split: str = "train",
    *,
    captions: CaptionPolicy = "all",
    size: int | None = None,
    source: str | None = None,
    image_root: str | Path | None = None,
    limit: int | None = None,
    seed: int = 0,
    cache: bool = False,
    num_proc: int | None = None,
    **load_kwargs: Any,
) -> datasets.Dataset:
    """Pairs from any Hugging Face dataset with an image column and a caption column.

    `data` is a `Dataset`, `IterableDataset` or `DatasetDict` (its `split` is used), a folder written by
    `save_to_disk`, or anything `datasets.load_dataset(data, split=split, **load_kwargs)` accepts (a hub id
    or a local data folder; this is the only path that may touch the network). The image column may be a
    `datasets.Image` feature or a string path (relative paths are resolved against `image_root`, else the
    working directory); the caption column a string or a list of strings (see `captions` in `from_jsonl`).
    `limit` keeps the first that many input rows (useful with streaming). Bad rows are counted and skipped;
    a column that does not exist raises `KeyError`. A streamed dataset is read once, into memory."""
    dataset, name = _open_hf(data, split, load_kwargs)
    columns = dataset.column_names
    if columns is not None:  # None for some streamed datasets, whose columns are only known by reading
        absent = [c for c in (image_column, text_column) if c not in columns]
        if absent:
            raise KeyError(f"{name}: no column {' or '.join(map(repr, absent))}; columns are {columns}")
        dataset = dataset.select_columns([image_column, text_column])
    features = dataset.features
    if features is not None and isinstance(features.get(image_column), ImageFeature):
        # Encoded bytes (or a path), not decoded PIL images: load_image decodes and validates them itself.
        dataset = dataset.cast_column(image_column, ImageFeature(decode=False))
    if isinstance(dataset, datasets.IterableDataset):
        stream = dataset.take(limit) if limit is not None else dataset
        rows = [{image_column: r.get(image_column), text_column: r.get(text_column)} for r in stream]
        dataset = datasets.Dataset.from_list([{**row, _ROW: i} for i, row in enumerate(rows)])
    else:
        if limit is not None:
            dataset = dataset.select(range(min(limit, len(dataset))))
        dataset = dataset.add_column(_ROW, list(range(len(dataset))))
    source = source or name
    root = str(Path(image_root) if image_root is not None else Path.cwd())
    return build_rows(
        source, dataset, _hf_pairs, PAIR_FEATURES, cache=cache, num_proc=num_proc,
        columns=(image_column, text_column), captions=captions, seed=seed, size=size, source=source, root=root,
    )  # fmt: skip


def _hf_pairs(
    row: dict[str, Any],
    columns: tuple[str, str],
    captions: CaptionPolicy,
    seed: int,
    size: int | None,
    source: str,
    root: str,
) -> list[dict[str, Any]]:
    """One row of a Hugging Face dataset -> its pairs."""
    image_column, text_column = columns
    ref = f"row {row[_ROW]}"
    image = _hf_image(row[image_column], Path(root))
    if image is None:
        raise Skip(MISSING_KEY, f"{ref}: no image in {image_column!r}")
    texts = _pick_captions(row[text_column], captions, seed, ref)
    if texts is None:
        raise Skip(EMPTY_CAPTION, f"{ref}: {text_column!r} is {row[text_column]!r}")
    return _pairs({"image": image, "texts": texts, "ref": ref}, size, source)


def _open_hf(
    data: str | Path | datasets.Dataset | datasets.DatasetDict | datasets.IterableDataset,
    split: str,
    load_kwargs: dict[str, Any],
) -> tuple[datasets.Dataset | datasets.IterableDataset, str]:
    if isinstance(data, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        if split not in data:
            raise KeyError(f"no split {split!r}; splits are {list(data)}")
        return data[split], split
    if isinstance(data, (datasets.Dataset, datasets.IterableDataset)):
        return data, (data.info.dataset_name if data.info else None) or "hf"
    path = Path(data)
    name = path.name if path.exists() else str(data).replace("/", "--")
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():  # written by save_to_disk
        loaded = datasets.load_from_disk(str(path))
        return _open_hf(loaded, split, load_kwargs)[0], name
    return datasets.load_dataset(str(data), split=split, **load_kwargs), name


def _hf_image(value: object, root: Path) -> str | bytes | None:
    """An image cell (Image feature with decode=False, or a path string) -> encoded bytes or a path."""
    if isinstance(value, dict):
        if value.get("bytes"):
            return value["bytes"]
        value = value.get("path")
    if isinstance(value, (bytes, bytearray)) and value:
        return bytes(value)
    if isinstance(value, str) and value.strip():
        return str(root / Path(value.strip()).expanduser())
    return None
