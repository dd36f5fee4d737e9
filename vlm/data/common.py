"""What every data builder shares: held-out splits and samples by hash, image encoding, the skip report, and
`build_rows`, which maps an encode function over input items with `datasets` and caches the result by fingerprint.

A builder lists its input items (file paths, captions, metadata) as a `datasets.Dataset`, then `build_rows` maps
`encode(item, **options)` over them, in `num_proc` worker processes for big sources. An item that cannot be
used (missing or unreadable image, a drawing that does not render) makes `encode` raise `Skip(reason,
detail)`: the row is counted by reason into a `SkipReport`, logged as one line such as
"captions: skipped 3 of 1,204 rows: 2 unreadable image, 1 empty caption", and filtered out. Rows dropped while
listing the items (a malformed JSON line, an empty caption) are counted into the same report beforehand.

Why build at all instead of decoding on the fly: every image is opened with `vlm.processing.load_image`
once, here, so a training run never meets a corrupt file, and pre-resizing to the tower's small resolution
(e.g. 64 x 64) keeps the Arrow files small and the data loader cheap. Pre-resizing squashes to a square with
PIL bicubic and no reducing gap, exactly as `SiglipImageProcessor` does, so the processor's own resize is
then the identity.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import random
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import datasets
from datasets import Features, Value
from datasets import Image as ImageFeature
from datasets.fingerprint import Hasher
from PIL import Image

from vlm.processing import ImageLoadError, load_image

logger = logging.getLogger(__name__)

T = TypeVar("T")
Split = Literal["train", "test", "all"]

PAIR_FEATURES = Features({"image": ImageFeature(), "text": Value("string"), "source": Value("string")})
HELD_OUT_FRACTION = 0.1  # the "test" share of the sources that have no official split
_PARALLEL_FROM = 2000  # items from which `build_rows` uses all CPUs (up to 8) by default
_EXAMPLES_PER_REASON = 3

# Skip reasons, worded for the one-line summary ("2 unreadable image, 1 empty caption").
MISSING_FILE = "missing file"
UNREADABLE_IMAGE = "unreadable image"
EMPTY_CAPTION = "empty caption"
MALFORMED_LINE = "malformed line"
MISSING_KEY = "missing key"
NOT_A_PATH = "image not a path"  # a JSON image field that is a number, list or object


class SourceUnavailable(RuntimeError):
    """A packaged source is not installed here; the message says what to install."""


def require(path: str | Path, *apt_packages: str) -> Path:
    """`path`, or `SourceUnavailable` naming the Debian packages that install it."""
    path = Path(path)
    if not path.exists():
        install = f"apt-get install --no-install-recommends {' '.join(apt_packages)}"
        raise SourceUnavailable(f"{path} not found; install it with: {install}")
    return path


# ---------------------------------------------------------------------------------------------------------
# Splits and samples


def unit_hash(key: str, salt: str = "") -> float:
    """A deterministic pseudo-random number in [0, 1) from a key: held-out membership and sampling."""
    return int.from_bytes(hashlib.sha1(f"{salt}:{key}".encode()).digest()[:8], "big") / 2**64


def held_out(items: Sequence[T], split: Split, key: Callable[[T], str]) -> list[T]:
    """The items of `split` for a source without an official one: a fixed ~10% is "test", chosen by a hash
    of each item's key (stable across runs and machines, and independent of any sample taken later)."""
    check_split(split)
    if split == "all":
        return list(items)
    return [
        item for item in items if (unit_hash(key(item), "held-out") < HELD_OUT_FRACTION) == (split == "test")
    ]


def check_split(split: str) -> None:
    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")


def official_splits(split: Split) -> list[str]:
    """The official splits that make up `split` ("all": both) of a source with a train and a test split."""
    check_split(split)
    return ["train", "test"] if split == "all" else [split]


def hash_sample(items: Sequence[T], key: Callable[[T], str], limit: int | None) -> list[T]:
    """`limit` items chosen by a hash of their key, in their original order: deterministic and spread over
    the whole source (the first N emoji would be only smileys), taken before rendering so a small build is
    fast."""
    if limit is None or limit >= len(items):
        return list(items)
    chosen = sorted(range(len(items)), key=lambda i: unit_hash(key(items[i]), "sample"))[: max(0, limit)]
    return [items[i] for i in sorted(chosen)]


def random_sample(items: Sequence[T], limit: int | None, seed: int = 0) -> list[T]:
    """A fixed random sample of `limit` items by `seed` (all of them when None or more), kept in order."""
    if limit is None or limit >= len(items):
        return list(items)
    if limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    return [items[i] for i in sorted(random.Random(seed).sample(range(len(items)), limit))]


# ---------------------------------------------------------------------------------------------------------
# Captions

_PLURAL_WORDS = frozenset({"people", "men", "women", "children", "feet", "teeth", "mice", "geese"})


def per_image(item: str, subset: str | None, most: int) -> int:
    """The N of a generated source's subset item "per-image=N" (questions asked of each image), 1 to `most`;
    ValueError naming `subset` otherwise."""
    value = item.removeprefix("per-image=").strip()
    if not value.isdigit() or not 1 <= int(value) <= most:
        raise ValueError(f"{item!r} in subset {subset!r}: write per-image=N, N from 1 to {most}")
    return int(value)


def with_article(phrase: str) -> str:
    """Prefix a/an: "red apple" -> "a red apple", "owl" -> "an owl"; plurals ("men wrestling") get none."""
    words = phrase.split()
    if not words:
        return phrase
    head = re.split(r" (?:with|of|on|in|for|and) ", phrase, maxsplit=1)[0].split()
    last = head[-1].lower() if head else ""
    plural = (
        words[0].lower() in _PLURAL_WORDS
        or last in _PLURAL_WORDS
        or (len(last) > 3 and last.endswith("s") and not last.endswith(("ss", "us", "is")))
    )
    if plural:
        return phrase
    first = words[0].lower()
    vowel_sound = first[:1] in set("aeiou") and not first.startswith(("one", "uni", "use", "eu"))
    return ("an " if vowel_sound or first in {"hour", "honest"} else "a ") + phrase


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


def undecoded(dataset: datasets.Dataset, column: str = "image") -> datasets.Dataset:
    """`dataset` with its `datasets.Image` column left encoded: a row gives {"bytes", "path"}, not a PIL image.

    For training loops: each image is then decoded by `load_image` when its batch is built, under its pixel
    limit and with its one error type (`ImageLoadError`, which the loop counts and skips), instead of by
    `datasets`, which hands PIL any file it is given and raises whatever PIL raises (a decompression bomb,
    a 0-byte file). The skip report does not carry over: read it first. Other datasets are returned as they
    are."""
    feature = dataset.features.get(column)
    if not isinstance(feature, ImageFeature) or not feature.decode:
        return dataset
    return dataset.cast_column(column, ImageFeature(decode=False))


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


def png_cell(image: Image.Image, size: int | None, pad: bool = False) -> dict[str, Any]:
    """An `Image()` cell of an RGB image, first made `size` x `size` (see `fit_square`) unless size is None."""
    return {"bytes": png_bytes(fit_square(image, size, pad) if size is not None else image), "path": None}


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


def read_image(source: str | Path | bytes, ref: str, size: int | None, pad: bool = False) -> dict[str, Any]:
    """A file path or encoded bytes -> an `Image()` cell of the validated RGB image; `Skip` when unusable.

    `ref` names the input row in the skip detail ("line 7: cats/01.jpg: truncated")."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise Skip(MISSING_FILE, f"{ref}: {path}")
        try:
            data = path.read_bytes()
        except OSError as err:
            raise Skip(UNREADABLE_IMAGE, f"{ref}: {path}: {err.strerror or err}") from None
        name = str(path)
    else:
        data, name = bytes(source), "<bytes>"
    try:
        return {"bytes": encode_image(data, size, pad), "path": None}
    except ImageLoadError as err:
        raise Skip(UNREADABLE_IMAGE, f"{ref}: {name}: {err.reason}") from None


# ---------------------------------------------------------------------------------------------------------
# Skipped rows


class Skip(Exception):
    """Raised by an `encode` function for an item it cannot use: counted by reason, never fatal."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


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
        """Add another report's rows and skips to this one (e.g. the parts of a mixture)."""
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

    def log(self) -> None:
        # A warning when rows were lost, so it shows with Python's default logging set-up; info otherwise.
        logger.log(logging.WARNING if self.skipped else logging.INFO, self.summary())


# Attached as a plain attribute: it describes how this Dataset object was built, so `select`, `map` and
# friends (which return new objects) rightly drop it. A cached build recounts it from the cached rows.
_REPORT_ATTR = "vlm_skip_report"


def skip_report(dataset: datasets.Dataset) -> SkipReport | None:
    """The `SkipReport` of a dataset returned by a loader or builder of `vlm.data`; None for any other."""
    return getattr(dataset, _REPORT_ATTR, None)


def with_report(dataset: datasets.Dataset, report: SkipReport) -> datasets.Dataset:
    setattr(dataset, _REPORT_ATTR, report)
    return dataset


# ---------------------------------------------------------------------------------------------------------
# Building and caching

# The encode step's outcome, as two columns of the mapped rows: a worker process can hand back nothing else.
# They are counted into the report and dropped, with the skipped rows, before the dataset is returned.
_SKIP, _DETAIL = "skip", "skip_detail"


def cache_root() -> Path:
    """Where built datasets are cached: `$VLM_CACHE/data`, else `~/.cache/vlm/data`."""
    return Path(os.environ.get("VLM_CACHE", Path.home() / ".cache" / "vlm")).expanduser() / "data"


def build_rows(
    name: str,
    items: datasets.Dataset | list[dict[str, Any]],
    encode: Callable[..., dict[str, Any] | list[dict[str, Any]]],
    features: Features,
    *,
    version: int = 1,
    report: SkipReport | None = None,
    cache: bool = False,
    num_proc: int | None = None,
    **options: Any,
) -> datasets.Dataset:
    """Rows of `features` from `encode(item, **options)` mapped over `items`, the skipped ones counted
    into `report` (a new one named `name` by default; rows it already holds count too) and left out.

    `encode` returns one row, or a list of rows (one per caption), or raises `Skip`. Rows keep the items'
    order. `num_proc` worker processes share the work; None uses all CPUs (up to 8) from 2,000 items, one
    process below (starting workers costs about a second). With `cache`, the rows are written to
    `cache_root()` in a file named by a fingerprint of the items' content, `name`, `version` and `options`,
    and the next build with the same inputs loads it instead: bump a builder's `version` when its output
    changes for the same inputs. datasets writes cache files under a temporary name and renames them when
    complete, so a killed build never leaves a half-written cache that looks complete."""
    if isinstance(items, list):
        items = datasets.Dataset.from_list(items)
    report = report or SkipReport(name)
    if len(items) == 0:  # nothing to map (a `limit` of 0, or every row skipped while listing)
        report.log()
        return with_report(datasets.Dataset.from_dict({k: [] for k in features}, features=features), report)
    fingerprint = Hasher.hash([items._fingerprint, name, version, options])
    if num_proc is None:
        num_proc = min(os.cpu_count() or 1, 8) if len(items) >= _PARALLEL_FROM else 1
    cache_file = None
    if cache:
        cache_root().mkdir(parents=True, exist_ok=True)
        safe_name = re.sub(r"[^\w.+=-]", "_", name)  # a source named "user/dataset" makes no subfolder
        cache_file = str(cache_root() / f"{safe_name}-{fingerprint}.arrow")
    mapped = items.map(
        _encode_batch,
        batched=True,
        fn_kwargs={"encode": encode, "options": options, "columns": [*features, _SKIP, _DETAIL]},
        features=Features({**features, _SKIP: Value("string"), _DETAIL: Value("string")}),
        remove_columns=items.column_names,
        num_proc=num_proc if num_proc > 1 else None,
        cache_file_name=cache_file,
        new_fingerprint=fingerprint,
        desc=name,
    )
    outcome = mapped.select_columns([_SKIP, _DETAIL]).to_dict()
    skipped = [
        (reason, detail) for reason, detail in zip(outcome[_SKIP], outcome[_DETAIL], strict=True) if reason
    ]
    report.total += len(items) - len(skipped)  # a skipped item gives one row, which `add` counts
    for reason, detail in skipped:
        report.add(reason, detail or "")
    report.log()
    kept = mapped.filter(_kept, batched=True, input_columns=_SKIP, desc=name)
    return with_report(kept.remove_columns([_SKIP, _DETAIL]), report)


def _encode_batch(
    batch: dict[str, list[Any]],
    encode: Callable[..., dict[str, Any] | list[dict[str, Any]]],
    options: dict[str, Any],
    columns: list[str],
) -> dict[str, list[Any]]:
    """`build_rows`' map function: items in, rows out (none, one or several per item)."""
    rows: list[dict[str, Any]] = []
    for values in zip(*batch.values(), strict=True):
        try:
            out = encode(dict(zip(batch, values, strict=True)), **options)
        except Skip as skip:
            out = {_SKIP: skip.reason, _DETAIL: skip.detail}
        rows.extend(out if isinstance(out, list) else [out])
    return {column: [row.get(column) for row in rows] for column in columns}


def _kept(reasons: list[str | None]) -> list[bool]:
    return [not reason for reason in reasons]
