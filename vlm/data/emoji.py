"""Noto Color Emoji glyphs captioned by their Unicode names: "an emoji of a grinning face".

Packages: fonts-noto-color-emoji (the font) and unicode-data (emoji-test.txt, the names). 1,704 train / 166
test pairs without skin-tone variants. Drawn with Pillow and fitted inside the square on white: their
background is white, so padding is invisible where squashing would distort them.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import datasets
from datasets import Features, Value
from PIL import Image, ImageDraw, ImageFont

from vlm.data import common
from vlm.processing import load_image

EMOJI_FONT = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
EMOJI_TEST = "/usr/share/unicode/emoji/emoji-test.txt"
_EMOJI_PX = 109  # the only size of the font's colour bitmaps (CBDT strikes are 136 x 128 at 109 px)
_SKIN_TONES = frozenset(range(0x1F3FB, 0x1F400))  # Fitzpatrick modifiers U+1F3FB..U+1F3FF
_VERSION = 1
FEATURES = Features(
    {
        **common.PAIR_FEATURES,
        "name": Value("string"),
        "group": Value("string"),
        "subgroup": Value("string"),
        "codepoints": Value("string"),
    }
)


def build(
    split: common.Split = "train",
    size: int | None = 64,
    limit: int | None = None,
    *,
    skin_tones: bool = False,
    cache: bool = True,
) -> datasets.Dataset:
    """Fully-qualified emoji of `emoji-test.txt` (3,655 in Unicode 15.0), without the skin-tone variants
    unless `skin_tones` (1,785 of them, each the same picture in another colour: 1,870 remain).

    Each is drawn at the font's bitmap size on transparent RGBA, composited on white, padded to a square
    and resized to `size` (None: 136 px). Held out by the emoji without skin tone, so a "test" emoji never
    has a variant in "train". Columns: image, text, source, name, group, subgroup, codepoints."""
    common.require(EMOJI_FONT, "fonts-noto-color-emoji")
    common.require(EMOJI_TEST, "unicode-data")
    items = [
        e for e in read_emoji_test(EMOJI_TEST) if skin_tones or not _SKIN_TONES & set(map(ord, e["emoji"]))
    ]
    items = common.held_out(items, split, lambda e: strip_skin_tones(e["emoji"]))
    items = common.hash_sample(items, lambda e: e["emoji"], limit)
    return common.build_rows("emoji", items, _draw, FEATURES, version=_VERSION, cache=cache, size=size)


def read_emoji_test(path: str) -> list[dict[str, str]]:
    """The fully-qualified lines of emoji-test.txt, in file order, with their caption."""
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
            rows.append(
                {
                    "emoji": emoji,
                    "text": emoji_caption(name),
                    "name": name,
                    "group": group,
                    "subgroup": subgroup,
                    "codepoints": " ".join(f"{ord(c):04X}" for c in emoji),
                }
            )
    return rows


def strip_skin_tones(emoji: str) -> str:
    return "".join(c for c in emoji if ord(c) not in _SKIN_TONES)


def emoji_caption(name: str) -> str:
    """A Unicode emoji name as a caption: "flag: France" -> "an emoji of the flag of France"."""
    if name.startswith("flag: "):
        phrase = f"the flag of {name[len('flag: ') :]}"
    elif ": " in name:
        # "woman: red hair", "thumbs up: medium skin tone", "family: man, woman, boy", "keycap: 1"
        head, detail = name.split(": ", 1)
        joiner = "with" if ("skin tone" in detail or "hair" in detail or "beard" in detail) else None
        phrase = common.with_article(f"{head} {joiner} {detail}" if joiner else f"{head} ({detail})")
    else:
        phrase = common.with_article(name)
    return f"an emoji of {phrase}"


@functools.cache  # once per worker process
def _font() -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(EMOJI_FONT, _EMOJI_PX)


def _draw(item: dict[str, Any], size: int | None) -> dict[str, Any]:
    emoji = item.pop("emoji")
    left, top, right, bottom = _font().getbbox(emoji)
    canvas = Image.new("RGBA", (max(1, right - left), max(1, bottom - top)), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((-left, -top), emoji, font=_font(), embedded_color=True)
    if canvas.getbbox() is None:
        raise common.Skip("no glyph in the font", f"{item['codepoints']} {item['name']}")
    # Without a shaping engine (Pillow built without libraqm) a ZWJ sequence or a flag comes out as several
    # glyphs side by side: not the picture its name describes.
    if canvas.width > 1.5 * canvas.height:
        raise common.Skip("not drawn as one glyph", f"{item['codepoints']} {item['name']}")
    rgb = load_image(canvas)  # composites the transparent background onto white
    return {**item, "image": common.png_cell(rgb, size or max(rgb.size), pad=True), "source": "emoji"}
