"""openclipart drawings captioned from their SVG metadata: "a clip art drawing of an oboe (music, equipment)".

Packages: openclipart-svg and libcairo2 (Debian), cairosvg (PyPI). 6,657 train / 730 test pairs. The subject
is the `dc:title` unless it is empty, not ASCII (often not English) or a collection name ("Part of the Flat
Icon Collection", "gramastar" on 1,375 stars), in which case the file name stands in; up to 4 `dc:subject`
keywords follow in brackets, minus bookkeeping tags. Drawings are fitted inside the square on white (their
background), not squashed.
"""

from __future__ import annotations

import html
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

import datasets
from datasets import Features, List, Value

from vlm.data import common
from vlm.processing import ImageLoadError, load_image

OPENCLIPART_DIR = "/usr/share/openclipart/svg"
_VERSION = 1
FEATURES = Features(
    {
        **common.PAIR_FEATURES,
        "title": Value("string"),
        "keywords": List(Value("string")),
        "category": Value("string"),
        "path": Value("string"),
    }
)

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


def build(
    split: common.Split = "train",
    size: int = 64,
    limit: int | None = None,
    *,
    root: str | Path = OPENCLIPART_DIR,
    cache: bool = True,
) -> datasets.Dataset:
    """The 7,458 SVG files of Debian's openclipart-svg (the 663 symlinks are duplicates and are left out),
    rendered with cairosvg on white, `size` px wide, then fitted into the square and padded with white.

    About 20 files cairosvg cannot draw are counted and skipped. Rendering is the slow part (about 115
    CPU-seconds for all files), shared by worker processes (all CPUs, up to 8). Held out by the file's path.
    Columns: image, text, source, title, keywords, category, path. `root` points at another tree of SVG files
    with the same RDF metadata."""
    if size is None:
        raise ValueError("openclipart needs a size: SVG drawings have no natural pixel size")
    root = common.require(root, "openclipart-svg")
    try:
        import cairosvg  # noqa: F401  (imports libcairo too)
    except (ImportError, OSError) as err:
        install = "pip install cairosvg, and apt-get install --no-install-recommends libcairo2"
        raise common.SourceUnavailable(f"cairosvg is not usable ({err}); install: {install}") from None
    items = _openclipart_items(root)
    titles = Counter(item["title"] for item in items)
    items = common.hash_sample(common.held_out(items, split, lambda i: i["path"]), lambda i: i["path"], limit)
    for item in items:
        item["text"] = _clipart_caption(item["path"], item["title"], item["keywords"], titles[item["title"]])
    return common.build_rows(
        "openclipart", items, _render, FEATURES, version=_VERSION, cache=cache, root=str(root), size=size
    )


_TITLE = re.compile(r"<dc:title>(.*?)</dc:title>", re.DOTALL)
_SUBJECT = re.compile(r"<dc:subject>(.*?)</dc:subject>", re.DOTALL)
_LI = re.compile(r"<rdf:li>(.*?)</rdf:li>", re.DOTALL)
_AGENT = re.compile(r"<cc:Agent.*?</cc:Agent>", re.DOTALL)


def _openclipart_items(root: Path) -> list[dict[str, Any]]:
    """{path relative to root, title, keywords} of every SVG file that is not a symlink, sorted by path.

    A regular expression over the RDF block rather than an XML parser: reading all 7,458 files (166 MB)
    this way takes 0.2 s instead of 2.6 s, and the metadata of these files is uniform."""
    items = []
    for folder, _, files in os.walk(root):
        for name in files:
            path = Path(folder) / name
            if not name.endswith(".svg") or path.is_symlink():
                continue
            # Creators and publishers are cc:Agents with a dc:title of their own.
            metadata = _AGENT.sub("", path.read_text(encoding="utf-8", errors="replace"))
            title = _TITLE.search(metadata)
            subject = _SUBJECT.search(metadata)
            tags = [html.unescape(t).strip() for t in _LI.findall(subject.group(1))] if subject else []
            items.append(
                {
                    "path": str(path.relative_to(root)),
                    "title": " ".join(html.unescape(title.group(1)).split()) if title else "",
                    "keywords": [t for t in tags if t],
                }
            )
    return sorted(items, key=lambda item: item["path"])


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


def _clipart_caption(path: str, title: str, tags: list[str], title_count: int) -> str:
    """The caption of one drawing; "" when nothing is usable."""
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
        subject = subject if not subject or starts_with_article else common.with_article(subject)
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
        return ""
    if shown:
        caption += f" ({', '.join(shown)})"
    return caption


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


def _render(item: dict[str, Any], root: str, size: int) -> dict[str, Any]:
    import cairosvg

    if not item["text"]:
        raise common.Skip("no usable title or keyword", item["path"])
    try:
        svg = _inline_entities((Path(root) / item["path"]).read_bytes())
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
        image = common.png_cell(load_image(png), size, pad=True)
    except ImageLoadError as err:
        raise common.Skip("render failed", f"{item['path']}: {err.reason}") from None
    except Exception as err:  # cairosvg raises anything from ValueError to ZeroDivisionError on bad SVG
        raise common.Skip("render failed", f"{item['path']}: {type(err).__name__}: {err}") from None
    return {**item, "image": image, "source": "openclipart", "category": str(Path(item["path"]).parent)}
