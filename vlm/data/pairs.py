"""Image–text pairs as Hugging Face `datasets`: generic loaders, skipped-row accounting, caching, mixing and
splitting.

Every loader returns a `datasets.Dataset` with at least the columns

    image   datasets.Image()   RGB, optionally pre-resized to `size` x `size` at build time
    text    string             one caption (a row with several captions becomes several pairs, or one)
    source  string             where the pair came from ("emoji", "my-captions", ...)

A row that cannot be used (missing or unreadable image, empty caption, malformed JSON line, missing key) is
counted and skipped, never fatal: each build logs one line such as
"captions: skipped 3 of 1,204 rows: 2 unreadable image, 1 empty caption" and attaches a `SkipReport` that
`skip_report(ds)` returns. Configuration mistakes (a column that does not exist, a folder without captions)
still raise, since no row could ever be used.

Why build at all instead of decoding on the fly: every image is opened with `vlm.processing.load_image` once,
here, so a training run never meets a corrupt file, and pre-resizing to the tower's small resolution
(e.g. 64 x 64) keeps the Arrow files small and the data loader cheap. Pre-resizing squashes to a square with
PIL bicubic and no reducing gap, exactly as `SiglipImageProcessor` does, so the processor's own resize is
then the identity. Built datasets can be cached under `cache_root()` (`$VLM_CACHE/data`, else
`~/.cache/vlm/data`) and are rebuilt only when missing.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import random
import re
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import datasets
import numpy as np
from datasets import Features, Value
from datasets import Image as ImageFeature
from PIL import Image

from vlm.processing import IMAGE_EXTENSIONS, ImageLoadError, load_image

logger = logging.getLogger(__name__)

CaptionPolicy = Literal["all", "first", "random"]

PAIR_FEATURES = Features({"image": ImageFeature(), "text": Value("string"), "source": Value("string")})

# Generators yield skipped rows too, tagged in these columns, so that counting works the same in one process
# or in `num_proc` worker processes; `materialize` counts them and drops the columns. `_extra` marks the
# second and later pairs made from one input row (several captions), which are not new input rows.
_SKIP = "_skip"
_SKIP_DETAIL = "_skip_detail"
_EXTRA = "_extra"
_END_OF_SHARD = "\x00"  # a `_skip` value that marks a row to drop without counting it
_ORDER = "_order"  # the input item's position, to restore the input order after parallel generation
_BOOKKEEPING = {
    _SKIP: Value("string"),
    _SKIP_DETAIL: Value("string"),
    _EXTRA: Value("bool"),
    _ORDER: Value("int64"),
}
_REPORT_FILE = "skip_report.json"
_PARALLEL_FROM = 2000  # items from which `materialize` uses all CPUs by default
_EXAMPLES_PER_REASON = 3

# Skip reasons, worded for the one-line summary ("2 unreadable image, 1 empty caption").
MISSING_FILE = "missing file"
UNREADABLE_IMAGE = "unreadable image"
EMPTY_CAPTION = "empty caption"
MALFORMED_LINE = "malformed line"
MISSING_KEY = "missing key"


# ---------------------------------------------------------------------------------------------------------
# Skip accounting


@dataclass
class SkipReport:
    """What a build skipped: `total` input rows, of which `skipped` were left out, counted by reason.

    `examples` keeps the first few details per reason ("line 7: no such key 'text'") for debugging."""

    source: str
    total: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    @property
    def skipped(self) -> int:
        return sum(self.reasons.values())

    @property
    def kept(self) -> int:
        return self.total - self.skipped

    def add(self, reason: str, detail: str = "") -> None:
        """Count one skipped row (it counts towards `total` too)."""
        self.total += 1
        self.reasons[reason] += 1
        shown = self.examples.setdefault(reason, [])
        if detail and len(shown) < _EXAMPLES_PER_REASON:
            shown.append(detail)

    def merge(self, other: SkipReport) -> None:
        """Add another report's rows and skips to this one (e.g. parse-time and image-time skips)."""
        self.total += other.total
        self.reasons.update(other.reasons)
        for reason, details in other.examples.items():
            shown = self.examples.setdefault(reason, [])
            shown.extend(details[: max(0, _EXAMPLES_PER_REASON - len(shown))])

    def summary(self) -> str:
        """One line: "emoji: skipped 3 of 1,204 rows: 2 unreadable image, 1 empty caption"."""
        if not self.skipped:
            return f"{self.source}: kept all {self.total:,} rows"
        ordered = sorted(self.reasons.items(), key=lambda rc: (-rc[1], rc[0]))  # most first, then by name
        reasons = ", ".join(f"{count:,} {reason}" for reason, count in ordered)
        return f"{self.source}: skipped {self.skipped:,} of {self.total:,} rows: {reasons}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "total": self.total,
            "reasons": dict(self.reasons),
            "examples": self.examples,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SkipReport:
        return cls(d["source"], d["total"], Counter(d["reasons"]), dict(d["examples"]))


# Attached as a plain attribute: it describes how this Dataset object was built, so `select`, `map` and
# friends (which return new objects) rightly drop it. The cache keeps a copy in `skip_report.json`.
_REPORT_ATTR = "vlm_skip_report"


def skip_report(dataset: datasets.Dataset) -> SkipReport | None:
    """The `SkipReport` of a dataset returned by a loader or builder of `vlm.data`; None for any other."""
    return getattr(dataset, _REPORT_ATTR, None)


def _attach(dataset: datasets.Dataset, report: SkipReport) -> datasets.Dataset:
    setattr(dataset, _REPORT_ATTR, report)
    return dataset


# ---------------------------------------------------------------------------------------------------------
# Images


def encode_image(
    image: str | Path | bytes | Image.Image, size: int | None = None, pad: bool = False
) -> bytes:
    """Validate one image and return it encoded for a `datasets.Image()` column, as RGB.

    The image is fully decoded with `load_image` (so a truncated file fails here, not in training), made
    upright and RGB. With `size`, it becomes `size` x `size`: squashed with PIL bicubic like
    `SiglipImageProcessor` (`pad=False`), or fitted inside and centred on white (`pad=True`, for drawings
    whose background is white anyway, where squashing would only distort them). Without `size`, an
    original JPEG/PNG/WebP that is already plain RGB and upright keeps its bytes (re-encoding a JPEG as PNG
    would multiply its size); anything else is stored as PNG.

    Raises `ImageLoadError` for anything unreadable."""
    rgb = load_image(image)
    if size is not None:
        rgb = fit_square(rgb, size, pad)
    elif isinstance(image, (bytes, bytearray)) and _is_plain_rgb(bytes(image)):
        return bytes(image)
    return png_bytes(rgb)


def fit_square(image: Image.Image, size: int, pad: bool = False) -> Image.Image:
    """Resize an RGB image to `size` x `size`: squash (as the SigLIP processor) or fit and pad on white."""
    if image.size == (size, size):
        return image
    if not pad:
        return image.resize((size, size), resample=Image.Resampling.BICUBIC, reducing_gap=None)
    width, height = image.size
    scale = size / max(width, height)
    new = (max(1, round(width * scale)), max(1, round(height * scale)))
    canvas = Image.new("RGB", (size, size), (255, 255, 255))
    resized = image.resize(new, resample=Image.Resampling.BICUBIC, reducing_gap=None)
    canvas.paste(resized, ((size - new[0]) // 2, (size - new[1]) // 2))
    return canvas


def png_bytes(image: Image.Image) -> bytes:
    """PNG at zlib level 1: twice as fast to write as Pillow's default 6, and for small images (64 x 64
    Fashion-MNIST) no larger. Encoding is most of the cost of building a source."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _is_plain_rgb(data: bytes) -> bool:
    """True when `load_image` would not change these pixels: RGB, no transparency key, no EXIF rotation."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            orientation = image.getexif().get(0x0112, 1)  # 0x0112: the EXIF Orientation tag
            return (
                image.format in ("JPEG", "PNG", "WEBP")
                and image.mode == "RGB"
                and "transparency" not in image.info
                and orientation in (None, 1)
            )
    except Exception:
        return False


def _read_image(
    source: str | Path | bytes, ref: str, size: int | None, pad: bool
) -> tuple[bytes | None, str, str]:
    """(encoded image, "", "") or (None, skip reason, detail). Never raises for a bad image."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            return None, MISSING_FILE, f"{ref}: {path}"
        try:
            data = path.read_bytes()
        except OSError as err:
            return None, UNREADABLE_IMAGE, f"{ref}: {path}: {err.strerror or err}"
        name = str(path)
    else:
        data, name = bytes(source), "<bytes>"
    try:
        return encode_image(data, size, pad), "", ""
    except ImageLoadError as err:
        return None, UNREADABLE_IMAGE, f"{ref}: {name}: {err.reason}"


# ---------------------------------------------------------------------------------------------------------
# Building and caching


def cache_root() -> Path:
    """Where built datasets live: `$VLM_CACHE/data`, else `~/.cache/vlm/data`."""
    return Path(os.environ.get("VLM_CACHE", Path.home() / ".cache" / "vlm")).expanduser() / "data"


def fingerprint(*parts: object) -> str:
    """A short stable hash of JSON-able parts, for cache folder names."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha1(blob).hexdigest()[:16]


def materialize(
    generator: Callable[..., Iterator[dict[str, Any]]],
    items: Sequence[Any],
    features: Features,
    report: SkipReport,
    kwargs: dict[str, Any] | None = None,
    cache_key: str | None = None,
    num_proc: int | None = None,
) -> datasets.Dataset:
    """Run `generator(items, **kwargs)` into a Dataset, count and drop its skipped rows, cache the result.

    The generator yields rows of `features`, one per input item; an item it cannot use is yielded as
    `skipped(reason, detail)`, counted into `report` and left out; the second and later pairs made from one
    item carry `"_extra": True` so `report.total` counts input rows, not pairs. `report` may already hold
    rows counted (and skipped) before generation, e.g. malformed JSON lines. With `num_proc` > 1 the items
    are dealt into shards that worker processes generate in parallel; rows come back in input order. None
    uses all CPUs (up to 8) from 2,000 items, one process below.

    With `cache_key`, the result is saved under `cache_root() / cache_key` (the report beside it) and the
    next call with the same key loads it instead of building: delete the folder to rebuild. It is written
    under a temporary name and renamed at the end, so a killed build never leaves a half-written cache that
    looks complete."""
    target = cache_root() / _safe_name(cache_key) if cache_key else None
    if target is not None and target.is_dir():
        return _load_cached(target)

    # from_generator always writes Arrow files under a cache dir: keep them out of ~/.cache/huggingface, and
    # beside the target so the final rename stays on one file system.
    scratch_parent = None
    if target is not None:
        scratch_parent = target.parent
        scratch_parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".building-", dir=scratch_parent) as scratch:
        if num_proc is None:  # auto: worker processes cost about a second to start, worth it for big builds
            num_proc = min(os.cpu_count() or 1, 8) if len(items) >= _PARALLEL_FROM else 1
        workers = max(1, num_proc)
        # datasets calls the generator once per element of a list-valued gen_kwarg and hands each worker a
        # contiguous run of them: give it 4 shards per worker, each a stride through the items (not a
        # contiguous run, so slow items, which cluster, e.g. one SVG folder, are spread over the workers).
        n_shards = max(1, min(len(items), 4 * workers if workers > 1 else 1))
        shards = [[(i, items[i]) for i in range(start, len(items), n_shards)] for start in range(n_shards)]
        raw = datasets.Dataset.from_generator(
            _run_shards,
            features=Features({**features, **_BOOKKEEPING}),
            cache_dir=str(Path(scratch) / "generator"),
            gen_kwargs={"shards": shards, "generator": generator, "kwargs": kwargs or {}},
            num_proc=workers if workers > 1 else None,
            keep_in_memory=target is None,  # the scratch folder is deleted on return
            # Our own fingerprint: hashing large gen_kwargs (lists of records) would cost more than it saves,
            # and the scratch cache is never reused anyway.
            fingerprint=fingerprint(cache_key, random.random()),
        )
        kept: list[tuple[int, int]] = []  # (input position, row), to sort back into input order
        bookkeeping = raw.select_columns(list(_BOOKKEEPING)).to_dict()
        for row, (reason, detail, extra, order) in enumerate(
            zip(*(bookkeeping[c] for c in _BOOKKEEPING), strict=True)
        ):
            if reason == _END_OF_SHARD:
                continue
            if reason:
                report.add(reason, detail or "")
                continue
            kept.append((order, row))
            report.total += not extra
        keep = [row for _, row in sorted(kept)]
        dataset = raw.select(keep).remove_columns(list(_BOOKKEEPING))
        _log_report(report)
        if target is None:
            return _attach(dataset.flatten_indices(keep_in_memory=True), report)
        staged = Path(scratch) / "dataset"
        dataset.save_to_disk(str(staged))
        (staged / _REPORT_FILE).write_text(json.dumps(report.to_dict(), indent=1))
        del raw, dataset  # release the memory maps on the scratch files before they are deleted
        try:
            staged.rename(target)
        except OSError:
            if not target.is_dir():  # another process may have finished the same build first: use theirs
                raise
    return _load_cached(target, quiet=True)


def _run_shards(
    shards: list[list[tuple[int, Any]]],
    generator: Callable[..., Iterator[dict[str, Any]]],
    kwargs: dict[str, Any],
) -> Iterator[dict[str, Any]]:
    """Run a `materialize` generator over (position, item) pairs, tagging each row with its item's position.

    A generator yields, per item in order, one skipped row or one row plus `_extra` rows: so the item
    behind each row is known without the generator having to pass positions along."""
    yield {_SKIP: _END_OF_SHARD}  # datasets refuses a generator that yields nothing (an empty build)
    pairs = [pair for shard in shards for pair in shard]
    item = -1
    for row in generator([it for _, it in pairs], **kwargs):
        if not row.get(_EXTRA):
            item += 1
        # A stream (one item, many rows) tags everything with its one position: sorting by (position, row)
        # then keeps the generation order.
        row[_ORDER] = pairs[min(item, len(pairs) - 1)][0]
        yield row


def skipped(reason: str, detail: str = "") -> dict[str, Any]:
    """The row a `materialize` generator yields for an input row it skips."""
    return {_SKIP: reason, _SKIP_DETAIL: detail}


def load_cached(cache_key: str | None) -> datasets.Dataset | None:
    """The dataset `materialize` cached under `cache_key`, or None: lets a builder skip its preparation
    (listing files, reading metadata) when the result is already on disk."""
    if cache_key is None or not (cache_root() / _safe_name(cache_key)).is_dir():
        return None
    return _load_cached(cache_root() / _safe_name(cache_key))


def _safe_name(cache_key: str) -> str:
    """A cache key as one folder name (a source named "user/dataset" must not make a subfolder)."""
    return re.sub(r"[^\w.+=-]", "_", cache_key)


def _load_cached(target: Path, quiet: bool = False) -> datasets.Dataset:
    dataset = datasets.load_from_disk(str(target))
    report_file = target / _REPORT_FILE
    report = (
        SkipReport.from_dict(json.loads(report_file.read_text()))
        if report_file.is_file()
        else SkipReport(target.name, total=len(dataset))
    )
    if not quiet:
        logger.info("loaded %s from the cache %s (%s rows)", report.source, target, f"{len(dataset):,}")
    return _attach(dataset, report)


def _log_report(report: SkipReport) -> None:
    # A warning when rows were lost, so it shows with Python's default logging set-up; info otherwise.
    logger.log(logging.WARNING if report.skipped else logging.INFO, report.summary())


# ---------------------------------------------------------------------------------------------------------
# Captions


def clean_caption(text: object) -> str | None:
    """A caption with whitespace collapsed, or None when it is not a string or is blank."""
    if not isinstance(text, str):
        return None
    cleaned = " ".join(text.split())
    return cleaned or None


def _pick_captions(value: object, policy: CaptionPolicy, seed: int, ref: str) -> list[str] | None:
    """The captions to pair with one image; None when there is none usable (skipped as an empty caption)."""
    values = value if isinstance(value, (list, tuple)) else [value]
    texts = [t for t in (clean_caption(v) for v in values) if t is not None]
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


class _Record(NamedTuple):
    """One input row that parsed: an image (path or encoded bytes), its captions, and a name for messages."""

    image: str | bytes
    texts: list[str]
    ref: str


def _record_rows(records: Sequence[_Record], size: int | None, source: str) -> Iterator[dict[str, Any]]:
    """Generator for `materialize`: validate and encode each record's image, one row per caption."""
    for record in records:
        data, reason, detail = _read_image(record.image, record.ref, size, pad=False)
        if data is None:
            yield skipped(reason, detail)
            continue
        for i, text in enumerate(record.texts):
            yield {"image": {"bytes": data, "path": None}, "text": text, "source": source, _EXTRA: i > 0}


def _build_records(
    records: list[_Record],
    report: SkipReport,
    size: int | None,
    cache: bool,
    num_proc: int | None,
    options: dict[str, Any],
) -> datasets.Dataset:
    """Shared tail of the file-based loaders: cache key from the inputs, then `materialize`."""
    cache_key = None
    if cache:
        # The key covers every image file's size and modification time, so editing an image (not only the
        # caption file) invalidates the cache.
        stats = []
        for record in records:
            if isinstance(record.image, str):
                try:
                    stat = os.stat(record.image)
                    stats.append((record.image, stat.st_size, stat.st_mtime_ns))
                except OSError:
                    stats.append((record.image, -1, -1))
            else:
                stats.append(hashlib.sha1(record.image).hexdigest())
        key = fingerprint(options, size, [r.texts for r in records], stats, report.to_dict())
        cache_key = f"{report.source}-{size or 'orig'}-{key}"
    return materialize(
        _record_rows,
        records,
        PAIR_FEATURES,
        report,
        kwargs={"size": size, "source": report.source},
        cache_key=cache_key,
        num_proc=num_proc,
    )


# ---------------------------------------------------------------------------------------------------------
# Generic loaders


def from_jsonl(
    path: str | Path,
    image_key: str = "image",
    text_key: str = "text",
    *,
    captions: CaptionPolicy = "all",
    size: int | None = None,
    source: str | None = None,
    seed: int = 0,
    cache: bool = False,
    num_proc: int | None = None,
) -> datasets.Dataset:
    """Pairs from a JSON Lines file: one object per line with an image path and a caption.

    `{"image": "cats/01.jpg", "text": "a cat on a mat"}`: the path is relative to the JSONL file's folder,
    or absolute. The caption may be a list of strings: `captions="all"` makes one pair per caption,
    "first" keeps the first, "random" one chosen per row with `seed`. Blank lines are ignored; a malformed
    line, a missing key, a missing or unreadable image or an empty caption is counted and skipped.
    `source` names the rows (default: the file's stem). `size` pre-resizes to `size` x `size`.
    With `cache=True` the result is kept under `cache_root()` and reused while the file and images are
    unchanged."""
    path = Path(path)
    report = SkipReport(source or path.stem)
    records: list[_Record] = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            record = _parse_row(
                _json_object(line), image_key, text_key, path.parent, captions, seed, f"line {number}", report
            )
            if record is not None:
                records.append(record)
    options = {"loader": "jsonl", "keys": [image_key, text_key], "captions": captions, "seed": seed}
    return _build_records(records, report, size, cache, num_proc, options)


def from_folder(
    path: str | Path,
    text_key: str = "text",
    *,
    captions: CaptionPolicy = "all",
    size: int | None = None,
    source: str | None = None,
    seed: int = 0,
    cache: bool = False,
    num_proc: int | None = None,
) -> datasets.Dataset:
    """Pairs from a folder of images with captions, in the first of these layouts that is present:

    1. `metadata.jsonl` or `metadata.csv` (Hugging Face imagefolder): a `file_name` column, relative to the
       folder, and a caption column `text_key`;
    2. `captions.jsonl`: as `metadata.jsonl`, with the image under `file_name` or `image`;
    3. a caption file beside each image: `cat.jpg` + `cat.txt` (an image without one is skipped as an empty
       caption).

    Other arguments and the skipping of bad rows are as in `from_jsonl`. Raises `FileNotFoundError` for a
    folder with none of these layouts."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a folder")
    report = SkipReport(source or root.name)
    records: list[_Record] = []

    def parse(row: object, ref: str) -> None:
        image_key = "file_name" if isinstance(row, dict) and "file_name" in row else "image"
        record = _parse_row(row, image_key, text_key, root, captions, seed, ref, report)
        if record is not None:
            records.append(record)

    layout: str
    if (root / "metadata.jsonl").is_file() or (root / "captions.jsonl").is_file():
        name = "metadata.jsonl" if (root / "metadata.jsonl").is_file() else "captions.jsonl"
        layout = name
        with (root / name).open(encoding="utf-8") as lines:
            for number, line in enumerate(lines, start=1):
                if line.strip():
                    parse(_json_object(line), f"{name} line {number}")
    elif (root / "metadata.csv").is_file():
        layout = "metadata.csv"
        with (root / "metadata.csv").open(encoding="utf-8", newline="") as f:
            for number, row in enumerate(csv.DictReader(f), start=2):  # line 1 is the header
                parse(row, f"metadata.csv line {number}")
    else:
        layout = "sidecar"
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
            parse({"image": str(image), text_key: text}, str(image.relative_to(root)))
    options = {"loader": "folder", "layout": layout, "text_key": text_key, "captions": captions, "seed": seed}
    return _build_records(records, report, size, cache, num_proc, options)


class _Malformed(NamedTuple):
    reason: str


def _json_object(line: str) -> object:
    try:
        return json.loads(line)
    except json.JSONDecodeError as err:
        return _Malformed(f"not JSON ({err.msg} at column {err.colno})")


def _parse_row(
    row: object,
    image_key: str,
    text_key: str,
    root: Path,
    captions: CaptionPolicy,
    seed: int,
    ref: str,
    report: SkipReport,
) -> _Record | None:
    """One parsed JSON/CSV row -> a record, or None after counting why it is skipped."""
    if isinstance(row, _Malformed):
        report.add(MALFORMED_LINE, f"{ref}: {row.reason}")
        return None
    if not isinstance(row, dict):
        report.add(MALFORMED_LINE, f"{ref}: expected a JSON object, got {type(row).__name__}")
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
    return _Record(str(root / Path(image.strip()).expanduser()), texts, ref)  # `/` keeps absolute paths


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
    a column that does not exist raises `KeyError`. A streamed dataset is read once, in one process, and
    is never cached (it has no fingerprint to key the cache on)."""
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
    source = source or name
    kwargs: dict[str, Any] = {
        "dataset": dataset,
        "columns": (image_column, text_column),
        "captions": captions,
        "seed": seed,
        "size": size,
        "source": source,
        "root": str(Path(image_root) if image_root is not None else Path.cwd()),
    }
    if isinstance(dataset, datasets.IterableDataset):
        if limit is not None:
            dataset = dataset.take(limit)
        kwargs["dataset"] = dataset
        rows: list[int | None] = [None]  # one item standing for the whole stream
        cache_key, num_proc = None, None
    else:
        if limit is not None:
            dataset = dataset.select(range(min(limit, len(dataset))))
        kwargs["dataset"] = dataset
        # Row numbers only: workers read their own rows from the Arrow files, nothing is copied up front.
        rows = list(range(len(dataset)))
        options = {k: v for k, v in kwargs.items() if k not in ("root", "dataset")}
        cache_key = f"{source}-{size or 'orig'}-{fingerprint(dataset._fingerprint, options, kwargs['root'])}"
    return materialize(
        _hf_rows,
        rows,
        PAIR_FEATURES,
        SkipReport(source),
        kwargs=kwargs,
        cache_key=cache_key if cache else None,
        num_proc=num_proc,
    )


def _hf_rows(
    rows: list[int | None],
    dataset: datasets.Dataset | datasets.IterableDataset,
    columns: tuple[str, str],
    captions: CaptionPolicy,
    seed: int,
    size: int | None,
    source: str,
    root: str,
) -> Iterator[dict[str, Any]]:
    """Generator for `materialize`: rows of a Hugging Face dataset -> pairs (or skipped rows)."""
    image_column, text_column = columns
    if rows == [None]:  # a streamed dataset: read it all, in order
        numbered: Iterator[tuple[int, dict[str, Any]]] = enumerate(dataset)
    else:
        assert isinstance(dataset, datasets.Dataset)
        batches = (rows[i : i + 256] for i in range(0, len(rows), 256))  # a shard's rows, read 256 at a time
        numbered = (pair for batch in batches for pair in zip(batch, dataset.select(batch), strict=True))
    for index, row in numbered:
        ref = f"row {index}"
        image = _hf_image(row.get(image_column), Path(root))
        if image is None:
            yield skipped(MISSING_KEY, f"{ref}: no image in {image_column!r}")
            continue
        texts = _pick_captions(row.get(text_column), captions, seed, ref)
        if texts is None:
            yield skipped(EMPTY_CAPTION, f"{ref}: {text_column!r} is {row.get(text_column)!r}")
            continue
        yield from _record_rows([_Record(image, texts, ref)], size, source)


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


# ---------------------------------------------------------------------------------------------------------
# Mixing and splitting


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
    return _attach(mixed, report)


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


def unit_hash(key: str, salt: str = "") -> float:
    """A deterministic pseudo-random number in [0, 1) from a key: held-out membership and sampling."""
    return int.from_bytes(hashlib.sha1(f"{salt}:{key}".encode()).digest()[:8], "big") / 2**64
