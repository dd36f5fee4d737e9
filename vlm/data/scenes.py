"""Generated scenes: 1 to 8 objects (geometric shapes, and the emoji and clip art pictures installed here),
optional written words and an optional bar chart, each scene kept with its full description, and questions
and answers computed from that description, skill by skill.

    scene = generate(seed=7)            # a Scene: objects, words, chart (no pixels yet)
    image = render(scene)               # 128 x 128 RGB
    questions(scene)                    # [QA(skill, template, question, answer), ...] one or two per skill
    caption(scene), description(scene)  # one sentence; every object with its position

Why 128 px: the offline vision tower is pretrained at 64 px on 2 CPU cores today, so the scene must survive
being shrunk to that; but 1-8 objects of 3 sizes (16, 24, 34 px), a sign or a word of up to 6 letters at a
legible 13-17 px and a chart with its digits need about 128 px to be drawn without crowding (8 large objects
cover 56% of the canvas). Shrunk to 64 px, shapes, pictures and words stay recognisable; the chart's 9 px
digits do not, so chart (and finer reading) questions want a tower at 96-128 px. `size` scales everything.

Determinism: a scene is a function of its seed alone (and of the pictures and fonts installed, which its
`unavailable` note names when missing). Split "train" is seeds 0, 1, 2, ...; split "test" starts at
`TEST_SEED` = 10^9, so the splits never share a scene however many images either has.

Drawing: shapes are drawn at twice the size and reduced (a 2 x 2 box filter, i.e. anti-aliasing), so their
edges are smooth but every pixel outside an object's box stays the white background: the description's
boxes are exact. Objects never overlap (2 px apart at least).

The questions (`candidates` lists every one a scene allows; `questions` samples a few per skill) never ask
what the scene leaves ambiguous: an object is named only by a label that is unique in its scene ("blue
square", "large blue square", "tiger"); positions and relations are asked only with a margin (an object
near the middle is never asked "left or right"); a nearest / highest / bigger question only when the winner
is clear; rectangles and squares are not asked about where a sign or a chart (also rectangles) is drawn, nor
are the colours a sign, a word or the chart uses. Answers are canonical: one word where possible, numbers as
digits, an object's label, a cell of the 3 x 3 grid ("top left", "center"). Pictures carry no colour
attribute (an emoji apple is red, but colour questions are about shapes, and are worded so).

Rows for `vlm.data.named.open_data` (`load_rows`, cached by `common.build_rows`): kind vqa (question_type =
the skill, answer_type = the template, for a finer breakdown; each scene's image is stored once, in a table of
its own, and looked up by the row's seed when the row is read, rather than stored with each of its 10
questions), caption (the one-sentence caption) and chat (a few questions about one image as one
conversation). `subset` keeps only the named skills ("count,position") or templates ("reading-word", see
`TEMPLATES`), may ask for smaller scenes (a `Layout`, for a curriculum: "objects=1-2,plain,count" — one
or two objects, no words or chart) and fewer questions a scene ("count,per-image=1": a test set of 200
questions from 200 scenes; `parse_subset`).
"""

from __future__ import annotations

import functools
import json
import math
import random
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import datasets
from datasets import Features, List, Value
from datasets import Image as ImageFeature
from PIL import Image, ImageDraw, ImageFont

from vlm.data import common

SIZE = 128  # the canvas, px (see the module docstring)
TEST_SEED = 10**9  # the first seed of split "test"; "train" is 0 .. TEST_SEED - 1
TRAIN_IMAGES, TEST_IMAGES = 20_000, 1_000  # a split's images when no `limit` is given
QUESTIONS_PER_IMAGE = 10
MAX_OBJECTS = 8
_VERSION = 1  # bump when the same seed draws or asks something else (the build cache is keyed by it)
_SS = 2  # supersampling factor of the drawing

# Plain colour names (easy-VQA spells "gray"), each clearly apart from the others and from the white ground.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 38, 38),
    "orange": (245, 130, 20),
    "yellow": (235, 205, 20),
    "green": (30, 150, 60),
    "blue": (35, 95, 230),
    "purple": (125, 55, 190),
    "pink": (240, 110, 180),
    "brown": (120, 70, 30),
    "gray": (130, 130, 130),
    "black": (25, 25, 25),
}
SHAPES = ("circle", "square", "rectangle", "triangle", "diamond", "star", "cross", "heart")
PLURALS = {shape: shape + ("es" if shape.endswith("s") else "s") for shape in SHAPES}
# An object's extent (its box's longer side) at 128 px. "Bigger" is asked only of small against large.
SIZES = {"small": 16, "medium": 24, "large": 34}
_BOXY = ("square", "rectangle")  # what a sign or a chart's bars also look like
NUMBER_WORDS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# Things with a short English name that a Noto emoji has (its Unicode name, in emoji-test.txt) and that are
# recognisable at 16-34 px. A clip art drawing takes part when its title is one of these names, so a name
# comes in two styles of picture. No name holds a colour or shape word (an emoji "red heart" would make
# "How many hearts?" ambiguous), and `WORDS` holds none of their words.
PICTURE_NAMES = (
    "dog", "cat", "horse", "cow", "pig", "mouse", "rabbit", "bear", "panda", "monkey", "elephant", "giraffe",
    "zebra", "lion", "tiger", "fox", "wolf", "deer", "camel", "kangaroo", "koala", "penguin", "chicken",
    "rooster", "duck", "owl", "eagle", "bird", "frog", "turtle", "snake", "fish", "whale", "dolphin", "shark",
    "octopus", "crab", "snail", "butterfly", "bug", "ant", "spider", "honeybee", "banana", "grapes", "pear",
    "cherries", "strawberry", "lemon", "pineapple", "watermelon", "carrot", "tomato", "potato", "mushroom",
    "bread", "pizza", "hamburger", "hot dog", "taco", "egg", "cookie", "doughnut", "cupcake", "lollipop",
    "bus", "taxi", "locomotive", "bicycle", "airplane", "helicopter", "rocket", "sailboat", "ship", "tractor",
    "ambulance", "motorcycle", "house", "sun", "cloud", "umbrella", "snowman", "balloon", "key", "scissors",
    "hammer", "pencil", "guitar", "trumpet", "violin", "drum", "bell", "camera", "television", "laptop",
    "telephone", "light bulb", "candle", "crown", "backpack", "cactus", "sunflower", "rose", "tulip",
    "soccer ball", "basketball", "trophy", "kite", "teddy bear", "anchor", "wrench", "teapot",
)  # fmt: skip
# Short dictionary words (<= 6 letters) for signs and writing: none is a colour, a shape, a size, a position,
# yes/no, a digit or a word of a picture's name, so reading never collides with another question.
WORDS = (
    "open", "closed", "exit", "enter", "push", "pull", "hello", "happy", "quiet", "slow", "fast", "sale",
    "free", "menu", "hotel", "cafe", "help", "north", "south", "east", "west", "park", "shop", "bank", "water",
    "music", "smile", "dream", "peace", "hope", "magic", "world", "night", "winter", "summer", "spring",
    "river", "ocean", "city", "road", "door", "gate", "room", "home", "cold", "warm", "dry", "new", "old",
    "sleep", "jump", "run", "walk", "read", "write", "sing", "dance", "play", "swim", "cook", "bake", "drink",
    "eat", "wash", "clean", "story", "poem", "math", "art", "class", "lunch", "dinner", "party", "game",
    "team", "queen", "king", "gold", "silver", "paper", "stone", "metal", "wood", "sand", "rain", "wind",
    "storm", "sunny", "zoo", "farm", "camp", "beach", "hill", "lake", "field", "forest", "garden", "bridge",
    "tower", "office", "school", "street", "market", "radio", "photo", "video", "movie", "news", "mail",
    "post", "card", "gift", "prize", "money", "price", "cheap", "best", "first", "last", "next", "back",
    "inside", "out", "love", "kind", "brave", "calm", "busy", "early", "late", "today", "lucky", "sweet",
)  # fmt: skip
# Signs: (fill, lettering). Free words take a lettering colour alone.
SIGN_COLORS = (
    ("yellow", "black"),
    ("white", "black"),
    ("green", "white"),
    ("blue", "white"),
    ("red", "white"),
)
TEXT_COLORS = ("black", "red", "blue", "green", "purple", "brown")
_SIGN_FILLS = {**COLORS, "white": (255, 255, 255)}
# Bold faces read best when small; the first 3 found are used. The DejaVu three come with Debian's
# fonts-dejavu-core (which fontconfig, and so Chromium, pulls in); Pillow's own font is the last resort.
FONT_DIRS = ("/usr/share/fonts/truetype", "/usr/share/fonts/TTF", "/usr/share/fonts")
FONT_FILES = (
    "DejaVuSans-Bold.ttf",
    "DejaVuSerif-Bold.ttf",
    "DejaVuSansMono-Bold.ttf",
    "LiberationSans-Bold.ttf",
    "LiberationSerif-Bold.ttf",
    "FreeSansBold.ttf",
)
PILLOW_FONT = "pillow-default"
CHART_LABELS = "ABCDE"

# 3 x 3 grid cells, by (row, column).
CELLS = (
    ("top left", "top middle", "top right"),
    ("middle left", "center", "middle right"),
    ("bottom left", "bottom middle", "bottom right"),
)
# A cell as a place in a sentence ("a cat at the top left").
_CELL_PHRASES = {
    "top left": "at the top left",
    "top middle": "at the top",
    "top right": "at the top right",
    "middle left": "on the left",
    "center": "in the center",
    "middle right": "on the right",
    "bottom left": "at the bottom left",
    "bottom middle": "at the bottom",
    "bottom right": "at the bottom right",
}

Box = tuple[int, int, int, int]  # left, top, right, bottom in px; right and bottom exclusive


# -- the description -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Thing:
    """One object: a geometric shape (`kind` "shape", `name` its shape, `color` its colour) or a picture
    (`kind` "emoji" or "clipart", `name` what it shows, `source` the emoji or the SVG's path, no colour)."""

    kind: str
    name: str
    color: str | None
    size: str  # a key of SIZES
    box: Box
    source: str = ""

    @property
    def center(self) -> tuple[float, float]:
        return ((self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2)

    @property
    def is_shape(self) -> bool:
        return self.kind == "shape"


@dataclass(frozen=True)
class Word:
    """A written word: on a sign (`sign` its fill colour) or on its own (`sign` None)."""

    text: str
    color: str  # the lettering's
    font: str  # the font file's name (or PILLOW_FONT)
    px: int  # the font size
    box: Box  # the sign's box (with its post), or the lettering's
    sign: str | None = None


@dataclass(frozen=True)
class Chart:
    """A bar chart: bars labelled A, B, ... with values 1-9 (written above each bar), in one colour."""

    box: Box
    labels: tuple[str, ...]
    values: tuple[int, ...]
    color: str


@dataclass(frozen=True)
class Scene:
    """Everything drawn, with where; `render` draws it. `unavailable` says which picture sources were missing
    when it was generated (their objects were drawn as shapes instead)."""

    seed: int
    size: int
    objects: tuple[Thing, ...]
    words: tuple[Word, ...] = ()
    chart: Chart | None = None
    unavailable: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Scene:
        chart = data.get("chart")
        return cls(
            seed=data["seed"],
            size=data["size"],
            objects=tuple(Thing(**{**o, "box": tuple(o["box"])}) for o in data["objects"]),
            words=tuple(Word(**{**w, "box": tuple(w["box"])}) for w in data.get("words", ())),
            chart=Chart(
                box=tuple(chart["box"]),
                labels=tuple(chart["labels"]),
                values=tuple(chart["values"]),
                color=chart["color"],
            )
            if chart
            else None,
            unavailable=tuple(data.get("unavailable", ())),
        )

    @property
    def shapes(self) -> list[Thing]:
        return [o for o in self.objects if o.is_shape]

    @property
    def pictures(self) -> list[Thing]:
        return [o for o in self.objects if not o.is_shape]

    @property
    def cluttered(self) -> bool:
        """A sign, a word or a chart is drawn: then "objects" and rectangles are not counted or asked about."""
        return bool(self.words or self.chart)

    @property
    def clutter_colors(self) -> set[str]:
        """Colours that a sign, a word or the chart wears: colour questions about shapes avoid them."""
        colors = {w.color for w in self.words} | {w.sign for w in self.words if w.sign}
        return colors | ({self.chart.color} if self.chart else set())


def scene_seed(split: str, index: int) -> int:
    """The seed of image `index` of a split: train 0, 1, ...; test TEST_SEED, TEST_SEED + 1, ..."""
    if split not in ("train", "test"):
        raise ValueError(f"generated scenes have the splits 'train' and 'test', not {split!r}")
    if not 0 <= index < TEST_SEED:
        raise ValueError(f"image index {index} is out of range [0, {TEST_SEED})")
    return index + (TEST_SEED if split == "test" else 0)


# -- what is installed: pictures and fonts ----------------------------------------------------------------------


@dataclass(frozen=True)
class Picture:
    kind: str  # "emoji" or "clipart"
    name: str
    source: str  # the emoji itself, or the SVG's path under OPENCLIPART_DIR


@functools.cache
def emoji_pictures() -> tuple[Picture, ...]:
    """The emoji of `PICTURE_NAMES` (one code point each, so Pillow draws them as one glyph); raises
    `SourceUnavailable` when the font or the names are not installed."""
    from vlm.data import emoji

    common.require(emoji.EMOJI_FONT, "fonts-noto-color-emoji")
    common.require(emoji.EMOJI_TEST, "unicode-data")
    wanted = set(PICTURE_NAMES)
    found = {}
    for item in emoji.read_emoji_test(emoji.EMOJI_TEST):
        if item["name"] in wanted and len(item["emoji"].replace("\ufe0f", "")) == 1:
            found.setdefault(item["name"], Picture("emoji", item["name"], item["emoji"]))
    return tuple(found[name] for name in PICTURE_NAMES if name in found)


# Drawings whose title names something else than the emoji of that name shows.
_CLIPART_MISNAMED = frozenset(
    {
        "mouse",  # both are computer mice
        "food/fruit/pear_jean-victor_balin_01r.svg",  # a red apple, to the eye
    }
)


@functools.cache
def clipart_pictures() -> tuple[Picture, ...]:
    """The openclipart drawings whose title (tidied as `vlm.data.openclipart` does) is one of
    `PICTURE_NAMES`, up to 3 per name (63 drawings of 43 names here; drawing them all takes 1.5 s, once per
    process); raises `SourceUnavailable` when openclipart-svg or cairosvg is not usable."""
    from vlm.data import openclipart

    root = common.require(openclipart.OPENCLIPART_DIR, "openclipart-svg")
    try:
        import cairosvg  # noqa: F401  (imports libcairo too)
    except (ImportError, OSError) as err:
        install = "pip install cairosvg, and apt-get install --no-install-recommends libcairo2"
        raise common.SourceUnavailable(f"cairosvg is not usable ({err}); install: {install}") from None
    wanted = set(PICTURE_NAMES)
    per_name: dict[str, list[str]] = {}
    for item in openclipart._openclipart_items(root):
        title = item["title"]
        name = openclipart._tidy(title) if title.isascii() else ""
        if name in wanted and len(per_name.setdefault(name, [])) < 3:
            per_name[name].append(item["path"])
    pictures = []
    for name in PICTURE_NAMES:
        for path in per_name.get(name, ()):
            if name in _CLIPART_MISNAMED or path in _CLIPART_MISNAMED:
                continue
            try:  # drawn now (and kept): a drawing cairosvg cannot draw is left out, never met in a scene
                glyph = _picture_image("clipart", path)
            except Exception:  # cairosvg raises anything from ValueError to ZeroDivisionError on bad SVG
                continue
            # A sliver (a pencil seen from the side) or thin line art (a pale bulb) all but vanishes at 16 px.
            opaque = sum(glyph.getchannel("A").point(lambda a: a > 127).histogram()[1:])
            if max(glyph.size) > 3 * min(glyph.size) or opaque < 0.1 * glyph.width * glyph.height:
                continue
            pictures.append(Picture("clipart", name, path))
    return tuple(pictures)


@functools.cache
def picture_pool() -> tuple[tuple[Picture, ...], tuple[Picture, ...], tuple[str, ...]]:
    """(emoji, clip art, notes on the sources that are missing): what `generate` draws pictures from."""
    pools, notes = [], []
    for kind, find in (("emoji", emoji_pictures), ("clipart", clipart_pictures)):
        try:
            pools.append(find())
        except common.SourceUnavailable as err:
            pools.append(())
            notes.append(f"{kind}: {err}")
    return pools[0], pools[1], tuple(notes)


@functools.cache
def fonts() -> tuple[str, ...]:
    """Paths of the fonts words are written in (the first 3 of `FONT_FILES` found), else Pillow's own font
    (`PILLOW_FONT`)."""
    found = []
    for name in FONT_FILES:
        for folder in FONT_DIRS:
            hits = sorted(Path(folder).rglob(name)) if Path(folder).is_dir() else []
            if hits:
                found.append(str(hits[0]))
                break
    return tuple(found[:3]) or (PILLOW_FONT,)


@functools.lru_cache(maxsize=64)
def _font(path: str, px: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    if path == PILLOW_FONT:
        return ImageFont.load_default(px)
    return ImageFont.truetype(path, px)


@functools.lru_cache(maxsize=512)
def _picture_image(kind: str, source: str) -> Image.Image:
    """A picture as RGBA on transparency, cropped to what it draws (drawn once per process)."""
    if kind == "emoji":
        from vlm.data import emoji

        font = emoji._font()  # at its one bitmap size, 109 px
        left, top, right, bottom = font.getbbox(source)
        glyph = Image.new("RGBA", (max(1, right - left), max(1, bottom - top)), (0, 0, 0, 0))
        ImageDraw.Draw(glyph).text((-left, -top), source, font=font, embedded_color=True)
    else:
        import io

        import cairosvg

        from vlm.data import openclipart

        svg = openclipart._inline_entities((Path(openclipart.OPENCLIPART_DIR) / source).read_bytes())
        png = cairosvg.svg2png(
            bytestring=svg, output_width=96, parent_width=96, parent_height=96, unsafe=False
        )
        glyph = Image.open(io.BytesIO(png)).convert("RGBA")
    box = glyph.getchannel("A").getbbox()
    return glyph.crop(box) if box else glyph


# -- generating ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """What a scene may hold: between `objects[0]` and `objects[1]` objects, and (with `clutter`) words and a
    bar chart. The default is the full world; a curriculum starts smaller, e.g. one or two objects on a plain
    ground (`Layout((1, 2), clutter=False)`, subset "objects=1-2,plain"), where an answer can only come from
    looking: a model fine-tuned on the full world for 250 steps still answers from each question's prior."""

    objects: tuple[int, int] = (1, MAX_OBJECTS)
    clutter: bool = True

    def __post_init__(self) -> None:
        low, high = self.objects
        if not 1 <= low <= high <= MAX_OBJECTS:
            raise ValueError(f"objects {low}-{high}: a scene holds 1 to {MAX_OBJECTS} objects, fewest first")

    def __str__(self) -> str:
        """The subset items that ask for this layout ("" for the default)."""
        items = [] if self.objects == (1, MAX_OBJECTS) else [f"objects={self.objects[0]}-{self.objects[1]}"]
        return ",".join(items + ([] if self.clutter else ["plain"]))


def generate(seed: int, size: int = SIZE, pictures: bool = True, layout: Layout = Layout()) -> Scene:
    """The scene of `seed`: with probability 0.25 a bar chart, with 0.4 one or two words (half of them on
    signs) — neither without `layout.clutter` — then 1-8 objects (`layout.objects`; shapes, pictures too when
    `pictures` and installed) wherever they fit. The chart and words go first so that they always fit; an
    object that finds no room after 200 tries is drawn a size smaller, and left out if even small finds none
    (in 0.2% of scenes). The default layout draws what it always drew for a seed; another draws other scenes
    from the same seeds."""
    if size < 64:
        raise ValueError(f"size {size} is too small for words and charts; use 64 px or more")
    rng = random.Random(f"scenes:{_VERSION}:{seed}")
    scale = size / SIZE
    emoji_pool, clipart_pool, notes = picture_pool() if pictures else ((), (), ("pictures: not asked for",))
    boxes: list[Box] = []
    chart = None
    if layout.clutter and rng.random() < 0.25:
        bars = rng.randint(3, 5)
        box = _place(rng, boxes, (round((12 * bars + 8) * scale), round(56 * scale)), size)
        if box is not None:
            boxes.append(box)
            values = tuple(rng.randint(1, 9) for _ in range(bars))
            chart = Chart(box, tuple(CHART_LABELS[:bars]), values, rng.choice(list(COLORS)))
    words: list[Word] = []
    if layout.clutter and rng.random() < 0.4:
        for text in rng.sample(WORDS, 2 if rng.random() < 0.25 else 1):
            word = _make_word(rng, text, boxes, size)
            if word is not None:
                boxes.append(word.box)
                words.append(word)
    objects: list[Thing] = []
    for _ in range(rng.randint(*layout.objects)):
        thing = _draw_thing(rng, objects, emoji_pool, clipart_pool, scale)
        box = _place(rng, boxes, _extent(thing, scale), size)
        while box is None and thing["size"] != "small":  # no room: a size smaller
            thing = {**thing, "size": list(SIZES)[list(SIZES).index(thing["size"]) - 1]}
            box = _place(rng, boxes, _extent(thing, scale), size)
        if box is not None:
            boxes.append(box)
            objects.append(Thing(box=box, **thing))
    return Scene(seed, size, tuple(objects), tuple(words), chart, notes)


def _draw_thing(
    rng: random.Random,
    placed: list[Thing],
    emoji_pool: Sequence[Picture],
    clipart_pool: Sequence[Picture],
    scale: float,
) -> dict[str, Any]:
    """An object's attributes (not yet placed). A third of the time it repeats an attribute of one already
    drawn, so that counts above 1 and comparisons are common."""
    size = rng.choice(list(SIZES))
    pictures = [*emoji_pool, *clipart_pool]
    if pictures and rng.random() < 0.3:
        shown = [o for o in placed if not o.is_shape]
        if shown and rng.random() < 0.35:
            name = rng.choice(shown).name
        else:  # never two names that share a word ("tiger" and "tiger face" would blur counts)
            used = {w for o in shown for w in o.name.split()}
            names = sorted({p.name for p in pictures if not used & set(p.name.split())})
            name = rng.choice(names) if names else None
        if name is not None:
            kinds = [pool for pool in (emoji_pool, clipart_pool) if any(p.name == name for p in pool)]
            # Emoji three times out of four when a name has both: they are the clearer pictures.
            pool = kinds[0] if len(kinds) == 1 or rng.random() < 0.75 else kinds[1]
            picture = rng.choice([p for p in pool if p.name == name])
            return {"kind": picture.kind, "name": name, "color": None, "size": size, "source": picture.source}
    shape, color = rng.choice(SHAPES), rng.choice(list(COLORS))
    shapes = [o for o in placed if o.is_shape]
    if shapes and rng.random() < 0.35:
        model = rng.choice(shapes)
        shape, color = (model.name, color) if rng.random() < 0.5 else (shape, model.color)
    source = rng.choice(("wide", "tall")) if shape == "rectangle" else ""
    return {"kind": "shape", "name": shape, "color": color, "size": size, "source": source}


def _extent(thing: dict[str, Any], scale: float) -> tuple[int, int]:
    side = round(SIZES[thing["size"]] * scale)
    if thing["name"] == "rectangle" and thing["kind"] == "shape":
        short = round(side * 0.55)
        return (side, short) if thing["source"] == "wide" else (short, side)
    return side, side


def _place(rng: random.Random, boxes: Sequence[Box], extent: tuple[int, int], size: int) -> Box | None:
    """A free box of `extent` (2 px from every other box and from the edge), or None after 200 tries."""
    width, height = extent
    if width > size - 4 or height > size - 4:
        return None
    for _ in range(200):
        left, top = rng.randint(2, size - 2 - width), rng.randint(2, size - 2 - height)
        box = (left, top, left + width, top + height)
        if all(_apart(box, other, 2) for other in boxes):
            return box
    return None


def _apart(a: Box, b: Box, gap: int) -> bool:
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def _make_word(rng: random.Random, text: str, boxes: list[Box], size: int) -> Word | None:
    scale = size / SIZE
    font = rng.choice(fonts())
    px = round(rng.randint(13, 17) * scale)
    # Measured as drawn (at the supersampled size), so the lettering never leaves its box.
    left, top, right, bottom = _font(font, px * _SS).getbbox(text)
    width, height = -(-(right - left) // _SS), -(-(bottom - top) // _SS)
    if rng.random() < 0.5:  # on a sign: padding and a post below
        fill, lettering = rng.choice(SIGN_COLORS)
        pad = max(2, round(3 * scale))
        extent = (width + 2 * pad + 2, height + 2 * pad + 2 + round(6 * scale))
        box = _place(rng, boxes, extent, size)
        return None if box is None else Word(text, lettering, Path(font).name, px, box, sign=fill)
    box = _place(rng, boxes, (width, height), size)
    return None if box is None else Word(text, rng.choice(TEXT_COLORS), Path(font).name, px, box)


# -- drawing ------------------------------------------------------------------------------------------------------


def render(scene: Scene) -> Image.Image:
    """The scene as an RGB image of `scene.size` px: drawn at twice the size, then reduced."""
    big = scene.size * _SS
    canvas = Image.new("RGB", (big, big), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for thing in scene.objects:
        if thing.is_shape:
            _draw_shape(draw, thing)
        else:
            _paste_picture(canvas, thing)
    for word in scene.words:
        _draw_word(draw, word, scene.size)
    if scene.chart is not None:
        _draw_chart(draw, scene.chart, scene.size)
    return canvas.reduce(_SS)


def _big(box: Box) -> tuple[float, float, float, float]:
    """A box in supersampled pixels, as the corners PIL fills (inclusive)."""
    return box[0] * _SS, box[1] * _SS, box[2] * _SS - 1, box[3] * _SS - 1


def _draw_shape(draw: ImageDraw.ImageDraw, thing: Thing) -> None:
    left, top, right, bottom = _big(thing.box)
    color = COLORS[thing.color or "black"]
    cx, cy, w, h = (left + right) / 2, (top + bottom) / 2, right - left, bottom - top
    name = thing.name
    if name == "circle":
        draw.ellipse((left, top, right, bottom), fill=color)
    elif name in ("square", "rectangle"):
        draw.rectangle((left, top, right, bottom), fill=color)
    elif name == "triangle":
        draw.polygon([(cx, top), (right, bottom), (left, bottom)], fill=color)
    elif name == "diamond":
        draw.polygon([(cx, top), (right, cy), (cx, bottom), (left, cy)], fill=color)
    elif name == "star":
        outer = w / 2
        shift = outer * (1 - math.cos(math.pi / 5)) / 2  # centre the star's height in the box
        points = []
        for i in range(10):
            radius = outer if i % 2 == 0 else outer * 0.5
            angle = -math.pi / 2 + i * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy + shift + radius * math.sin(angle)))
        draw.polygon(points, fill=color)
    elif name == "cross":
        arm = w * 0.18
        draw.rectangle((cx - arm, top, cx + arm, bottom), fill=color)
        draw.rectangle((left, cy - arm, right, cy + arm), fill=color)
    elif name == "heart":
        r = w * 0.26
        for x in (left + w * 0.28, left + w * 0.72):
            draw.ellipse((x - r, top + h * 0.32 - r, x + r, top + h * 0.32 + r), fill=color)
        draw.polygon(
            [
                (left + w * 0.035, top + h * 0.42),
                (cx, bottom),
                (right - w * 0.035, top + h * 0.42),
                (cx, top + h * 0.3),
            ],
            fill=color,
        )
    else:
        raise ValueError(f"unknown shape {name!r}")


def _paste_picture(canvas: Image.Image, thing: Thing) -> None:
    left, top, right, bottom = (v * _SS for v in thing.box)
    glyph = _picture_image(thing.kind, thing.source)
    scale = min((right - left) / glyph.width, (bottom - top) / glyph.height)
    fitted = glyph.resize(
        (max(1, round(glyph.width * scale)), max(1, round(glyph.height * scale))), Image.Resampling.LANCZOS
    )
    x = left + (right - left - fitted.width) // 2
    y = top + (bottom - top - fitted.height) // 2
    canvas.paste(fitted, (x, y), fitted)


def _font_path(name: str) -> str:
    return next((path for path in fonts() if Path(path).name == name), PILLOW_FONT)


def _draw_word(draw: ImageDraw.ImageDraw, word: Word, size: int) -> None:
    font = _font(_font_path(word.font), word.px * _SS)
    ink = _SIGN_FILLS[word.color]
    left, top, right, bottom = _big(word.box)
    x0, y0, x1, y1 = font.getbbox(word.text)
    if word.sign is None:  # the box is the lettering's own
        draw.text((left - x0, top - y0), word.text, font=font, fill=ink)
        return
    board = bottom - round(6 * size / SIZE) * _SS  # the post takes the rest
    middle = (left + right) / 2
    draw.rectangle((middle - _SS, board, middle + _SS, bottom), fill=COLORS["gray"])
    draw.rounded_rectangle(
        (left, top, right, board),
        radius=3 * _SS,
        fill=_SIGN_FILLS[word.sign],
        outline=(40, 40, 40),
        width=_SS,
    )
    x = (left + right + 1 - (x1 - x0)) / 2 - x0
    y = (top + board + 1 - (y1 - y0)) / 2 - y0
    draw.text((x, y), word.text, font=font, fill=ink)


def _draw_chart(draw: ImageDraw.ImageDraw, chart: Chart, size: int) -> None:
    scale = size / SIZE
    left, top, right, bottom = _big(chart.box)
    font = _font(fonts()[0], round(9 * scale) * _SS)
    band = (round(9 * scale) + 2) * _SS  # room for the labels below and the values above
    axis_y = bottom - band
    unit = (axis_y - top - band) / 9
    slot = (right - left - 4 * _SS) / len(chart.values)
    draw.line((left, axis_y, right, axis_y), fill=COLORS["black"], width=_SS)
    draw.line((left + _SS, top, left + _SS, axis_y), fill=COLORS["black"], width=_SS)
    for i, (label, value) in enumerate(zip(chart.labels, chart.values, strict=True)):
        x0 = left + 4 * _SS + i * slot + slot * 0.15
        x1 = x0 + slot * 0.7
        draw.rectangle((x0, axis_y - value * unit, x1, axis_y - _SS), fill=COLORS[chart.color])
        for text, y in ((label, axis_y + _SS), (str(value), axis_y - value * unit - band + _SS)):
            tl, tt, tr, tb = font.getbbox(text)
            draw.text(((x0 + x1) / 2 - (tr - tl) / 2 - tl, y - tt), text, font=font, fill=COLORS["black"])


# -- questions --------------------------------------------------------------------------------------------------

SKILLS = (
    "existence", "count", "color", "shape", "position", "relation", "compare", "reading", "chart", "caption",
    "detail",
)  # fmt: skip
# Each skill's templates (a row's answer_type). A subset may name templates as well as skills: the skill
# table reads the words ("reading-word,reading-sign,reading-color") apart from "is this word written?", the
# yes/no template that would otherwise fill most of a reading test set (see `questions`).
TEMPLATES: dict[str, tuple[str, ...]] = {
    "existence": ("exist-color-shape", "exist-shape", "exist-color", "exist-picture"),
    "count": ("count-objects", "count-shapes", "count-shape", "count-color", "count-color-shape", "count-picture"),
    "color": ("color-of-shape", "color-of-sized-shape", "color-of-sign", "color-of-word", "color-of-bars"),
    "shape": ("shape-of-color",),
    "position": (
        "position-side", "position-height", "position-cell", "position-what",
        "position-leftmost", "position-rightmost", "position-topmost", "position-bottommost",
    ),
    "relation": (
        "relation-left", "relation-right", "relation-above", "relation-below", "relation-what-left",
        "relation-what-right", "relation-what-above", "relation-what-below", "relation-nearest", "relation-furthest",
    ),
    "compare": (
        "compare-more", "compare-fewer", "compare-which-more", "compare-same", "compare-bigger", "compare-smaller",
        "compare-is-bigger",
    ),
    "reading": ("reading-sign", "reading-word", "reading-color", "reading-exists"),
    "chart": ("chart-highest", "chart-lowest", "chart-value", "chart-bars", "chart-compare"),
    "caption": ("caption",),
    "detail": ("detail",),
}  # fmt: skip
_ONCE = ("caption", "detail")  # asked at most once per image
# Questions per round of the skills: those a scene has only sometimes (words: 40%, a chart: 25% of scenes)
# get more of its turns, so each skill has a few hundred test questions in TEST_IMAGES.
_TURNS = {"reading": 2, "chart": 3}
# Skills whose answer is drawn first, over all their templates: yes and no, or each count, come up equally
# often in the skill as a whole (drawn per template, a template that can only say "no" or "0" here, such as
# "Is there a zebra?" without pictures, would tilt it).
_ANSWER_FIRST = ("existence", "count")


@dataclass(frozen=True)
class QA:
    """One question about a scene: its skill (the rows' question_type), its template (answer_type), the
    answer, and the same question phrased several ways (`question` is the first)."""

    skill: str
    template: str
    answer: str
    phrasings: tuple[str, ...]

    @property
    def question(self) -> str:
        return self.phrasings[0]


def candidates(scene: Scene) -> list[QA]:
    """Every question `scene` allows (see the module docstring for what is never asked), in a fixed order."""
    view = _View(scene)
    out: list[QA] = []
    for template in _TEMPLATES:
        out.extend(template(view))
    return out


def questions(
    scene: Scene,
    rng: random.Random | None = None,
    count: int = QUESTIONS_PER_IMAGE,
    skills: Iterable[str] | None = None,
) -> list[QA]:
    """`count` questions about `scene` (fewer if it allows fewer), each with one phrasing drawn, of `skills`
    (skills or templates, `TEMPLATES`; default: every skill): the skills in turn (in a random order; reading
    twice and chart three times a turn, as fewer scenes have them), within a skill a template at random, then
    an answer at random among those the template can give here (for existence and count, the answer first,
    over the skill's templates), then a question with that answer.
    Caption and detail come at most once. `rng` defaults to one seeded by the scene.

    Asked for one skill alone, an image's questions drain its pools: once a scene's few "yes" answers (or
    its one word) are asked, only "no" is left, so such a set leans to "no" (reading-exists: 88%) where the
    mixed rows are even. A test set of one skill asks one question a scene for that reason (`count=1`, subset
    "per-image=1"), and the skill table reports a blind guess beside each score."""
    rng = rng or random.Random(f"questions:{_VERSION}:{scene.seed}")
    wanted = set(SKILLS if skills is None else skills)
    pools: dict[str, dict[str, list[QA]]] = {}
    for qa in candidates(scene):
        if qa.skill in wanted or qa.template in wanted:
            pools.setdefault(qa.skill, {}).setdefault(qa.template, []).append(qa)
    order = list(pools)
    rng.shuffle(order)
    chosen: list[QA] = []
    while order and len(chosen) < count:
        for skill in list(order):
            if len(chosen) == count:
                break
            templates = pools[skill]
            for _ in range(_TURNS.get(skill, 1)):
                if not templates or len(chosen) == count:
                    break
                if skill in _ANSWER_FIRST:
                    answers = sorted({qa.answer for qas in templates.values() for qa in qas})
                    # Counts weighed by (value + 1)^2: a scene has many small counts (every absent kind is a
                    # 0, most present ones a 1) and few large ones. Over the test split this gives 0: 10%,
                    # 1: 34%, 2: 23%, 3: 10%, 4-8: 22% (drawn evenly, "0" alone was 36%).
                    weights = [(int(a) + 1) ** 2 if a.isdigit() else 1 for a in answers]
                    answer = rng.choices(answers, weights)[0]
                    template = rng.choice(
                        sorted(t for t, qas in templates.items() if any(qa.answer == answer for qa in qas))
                    )
                else:
                    template = rng.choice(sorted(templates))
                    answer = rng.choice(sorted({qa.answer for qa in templates[template]}))
                qa = rng.choice([qa for qa in templates[template] if qa.answer == answer])
                templates[template].remove(qa)
                chosen.append(QA(qa.skill, qa.template, qa.answer, (rng.choice(qa.phrasings),)))
                if not templates[template]:
                    del templates[template]
            if not templates or skill in _ONCE:
                order.remove(skill)
    return chosen


def conversation(
    scene: Scene, rng: random.Random | None = None, skills: Iterable[str] | None = None
) -> list[QA]:
    """A few turns about one image: 2-5 questions of different skills, a caption first a third of the time."""
    rng = rng or random.Random(f"conversation:{_VERSION}:{scene.seed}")
    wanted = [s for s in (SKILLS if skills is None else skills) if s not in _ONCE]
    turns = questions(scene, rng, count=rng.randint(2, 5), skills=wanted)
    if (skills is None or "caption" in skills) and rng.random() < 1 / 3:
        turns.insert(0, questions(scene, rng, count=1, skills=["caption"])[0])
    return turns or questions(scene, rng, count=1, skills=skills)


class _View:
    """A scene with what the templates share: labels, geometry and the margins that keep questions clear."""

    def __init__(self, scene: Scene) -> None:
        self.scene = scene
        self.size = scene.size
        self.margin = scene.size / 16  # relations and extremes: 8 px at 128
        self.objects = scene.objects
        self.shapes = scene.shapes
        self.bad_colors = scene.clutter_colors
        self.labels = _labels(scene)
        # Centres of what is drawn besides the objects (signs, words, the chart).
        self.clutter = [_center(w.box) for w in scene.words] + (
            [_center(scene.chart.box)] if scene.chart else []
        )

    def askable(self, shape: str) -> bool:
        """Kind-level questions about `shape` (counts, existence): not about boxes next to signs and charts."""
        return not (self.scene.cluttered and shape in _BOXY)

    def near_misses(self) -> list[tuple[str, str]]:
        """(colour, shape) pairs with the colour or the shape in the scene: those drawn, and the absent ones
        that a glance could mistake for them (a question about a purple star where none is purple or a star
        teaches little)."""
        colors, kinds = {o.color for o in self.shapes}, {o.name for o in self.shapes}
        return [(c, s) for c in COLORS for s in SHAPES if c in colors or s in kinds]

    def labelled(self) -> list[tuple[Thing, str]]:
        return [(o, label) for o, label in zip(self.objects, self.labels, strict=True) if label]

    def side(self, thing: Thing) -> str | None:
        x = thing.center[0]
        return "left" if x < 0.4 * self.size else "right" if x > 0.6 * self.size else None

    def height(self, thing: Thing) -> str | None:
        y = thing.center[1]
        return "top" if y < 0.4 * self.size else "bottom" if y > 0.6 * self.size else None

    def cell(self, point: tuple[float, float], strict: bool = True) -> str | None:
        """The 3 x 3 grid cell of a point; None (when `strict`) within size / 24 of a cell's edge."""
        third, band = self.size / 3, self.size / 24
        if strict and any(abs(v - k * third) < band for v in point for k in (1, 2)):
            return None
        row, col = (min(2, max(0, int(v // third))) for v in (point[1], point[0]))
        return CELLS[row][col]

    def cells_near(self, point: tuple[float, float]) -> set[str]:
        """The cells a point is in or within size / 24 of."""
        band = self.size / 24
        return {
            self.cell((point[0] + dx, point[1] + dy), strict=False)
            for dx in (-band, 0, band)
            for dy in (-band, 0, band)
        }


def _center(box: Box) -> tuple[float, float]:
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2


def _labels(scene: Scene) -> list[str | None]:
    """Each object's shortest unique name ("blue square", "large blue square", "tiger", "small tiger"), or None
    when even that is not unique, or when it is a box that a sign or chart of its colour could pass for."""

    def base(o: Thing) -> str:
        return f"{o.color} {o.name}" if o.is_shape else o.name

    plain = Counter(base(o) for o in scene.objects)
    sized = Counter(f"{o.size} {base(o)}" for o in scene.objects)
    bad = scene.clutter_colors
    labels: list[str | None] = []
    for o in scene.objects:
        if o.is_shape and o.name in _BOXY and scene.cluttered and o.color in bad:
            labels.append(None)
        elif plain[base(o)] == 1:
            labels.append(base(o))
        elif sized[f"{o.size} {base(o)}"] == 1:
            labels.append(f"{o.size} {base(o)}")
        else:
            labels.append(None)
    return labels


def _yes(value: bool) -> str:
    return "yes" if value else "no"


@functools.lru_cache(maxsize=4096)
def _a(phrase: str) -> str:
    return common.with_article(phrase)


def _existence(v: _View) -> Iterable[QA]:
    present = {(o.color, o.name) for o in v.shapes}
    kinds = {o.name for o in v.shapes}
    for color, shape in v.near_misses():
        if v.askable(shape):
            a = _a(f"{color} {shape}")
            yield QA(
                "existence",
                "exist-color-shape",
                _yes((color, shape) in present),
                (
                    f"Is there {a}?",
                    f"Do you see {a}?",
                    f"Does the image contain {a}?",
                    f"Is there {a} in the image?",
                ),
            )
    for shape in SHAPES:
        if v.askable(shape):
            yield QA(
                "existence",
                "exist-shape",
                _yes(shape in kinds),
                (f"Is there {_a(shape)}?", f"Are there any {PLURALS[shape]}?", f"Can you see {_a(shape)}?"),
            )
    for color in COLORS:
        if color not in v.bad_colors:
            yield QA(
                "existence",
                "exist-color",
                _yes(any(o.color == color for o in v.shapes)),
                (
                    f"Is there {_a(color + ' shape')}?",
                    f"Are any of the shapes {color}?",
                    f"Do you see any {color} shapes?",
                ),
            )
    for name, count in _picture_counts(v).items():
        a = _a(name)
        yield QA(
            "existence",
            "exist-picture",
            _yes(count > 0),
            (
                f"Is there {a}?",
                f"Do you see {a}?",
                f"Is there a picture of {a}?",
                f"Does the image show {a}?",
            ),
        )


def _picture_counts(v: _View) -> dict[str, int]:
    """How often each picture name is drawn: the names present, and (when some picture source is installed,
    so that a "no" is no artefact of a missing package) every name that shares no word with them."""
    shown = Counter(o.name for o in v.objects if not o.is_shape)
    counts = dict(shown)
    if len([n for n in v.scene.unavailable if n.startswith(("emoji:", "clipart:", "pictures:"))]) < 2:
        used = {w for name in shown for w in name.split()}
        counts |= {n: 0 for n in PICTURE_NAMES if n not in shown and not used & set(n.split())}
    return counts


def _count(v: _View) -> Iterable[QA]:
    n = str(len(v.objects))
    if not v.scene.cluttered:
        yield QA(
            "count",
            "count-objects",
            n,
            (
                "How many objects are there?",
                "How many things are in the image?",
                "Count the objects in the image.",
                "How many items can you see?",
            ),
        )
        yield QA(
            "count",
            "count-shapes",
            str(len(v.shapes)),
            (
                "How many shapes are there?",
                "How many geometric shapes are in the image?",
                "Count the shapes.",
            ),
        )
    for shape in SHAPES:
        if v.askable(shape):
            p = PLURALS[shape]
            yield QA(
                "count",
                "count-shape",
                str(sum(o.name == shape for o in v.shapes)),
                (
                    f"How many {p} are there?",
                    f"How many {p} do you see?",
                    f"Count the {p}.",
                    f"What is the number of {p}?",
                ),
            )
    for color in COLORS:
        if color not in v.bad_colors:
            yield QA(
                "count",
                "count-color",
                str(sum(o.color == color for o in v.shapes)),
                (
                    f"How many {color} shapes are there?",
                    f"How many shapes are {color}?",
                    f"Count the {color} shapes.",
                ),
            )
    for color, shape in v.near_misses():
        if v.askable(shape) and not (shape in _BOXY and color in v.bad_colors):
            p = f"{color} {PLURALS[shape]}"
            yield QA(
                "count",
                "count-color-shape",
                str(sum(o.color == color and o.name == shape for o in v.shapes)),
                (f"How many {p} are there?", f"How many {p} can you see?", f"Count the {p}."),
            )
    for name, count in _picture_counts(v).items():
        a = _a(name)
        yield QA(
            "count",
            "count-picture",
            str(count),
            (
                f"How many pictures of {a} are there?",
                f"How many times is {a} shown?",
                f"Count the pictures of {a}.",
            ),
        )


def _color(v: _View) -> Iterable[QA]:
    kinds = Counter(o.name for o in v.shapes)
    sized = Counter((o.size, o.name) for o in v.shapes)
    for o in v.shapes:
        if o.color in v.bad_colors and o.name in _BOXY and v.scene.cluttered:
            continue  # it could be taken for the sign or the chart
        if kinds[o.name] == 1 and v.askable(o.name):
            k = o.name
            yield QA(
                "color",
                "color-of-shape",
                o.color,
                (
                    f"What colour is the {k}?",
                    f"What color is the {k}?",
                    f"Which colour is the {k}?",
                    f"The {k} is what color?",
                ),
            )
        elif kinds[o.name] > 1 and sized[(o.size, o.name)] == 1 and v.askable(o.name):
            k = f"{o.size} {o.name}"
            yield QA(
                "color",
                "color-of-sized-shape",
                o.color,
                (f"What colour is the {k}?", f"What color is the {k}?", f"Which colour is the {k}?"),
            )
    signs = [w for w in v.scene.words if w.sign]
    if len(signs) == 1:
        yield QA(
            "color",
            "color-of-sign",
            signs[0].sign,
            ("What colour is the sign?", "What color is the sign?", "Which colour is the sign?"),
        )
    for word in v.scene.words:
        w = word.text
        yield QA(
            "color",
            "color-of-word",
            word.color,
            (
                f'What colour is the word "{w}"?',
                f'What color is the word "{w}" written in?',
                f'In which colour is "{w}" written?',
            ),
        )
    if v.scene.chart is not None:
        yield QA(
            "color",
            "color-of-bars",
            v.scene.chart.color,
            (
                "What colour are the bars?",
                "What color are the bars of the chart?",
                "Which colour are the bars in the chart?",
            ),
        )


def _shape(v: _View) -> Iterable[QA]:
    colors = Counter(o.color for o in v.shapes)
    for o in v.shapes:
        c = o.color
        if colors[c] == 1 and c not in v.bad_colors:
            yield QA(
                "shape",
                "shape-of-color",
                o.name,
                (
                    f"Which shape is {c}?",
                    f"What is the {c} shape?",
                    f"What kind of shape is the {c} one?",
                    f"Name the {c} shape.",
                ),
            )


def _position(v: _View) -> Iterable[QA]:
    for o, label in v.labelled():
        if side := v.side(o):
            yield QA(
                "position",
                "position-side",
                side,
                (
                    f"Is the {label} on the left or the right?",
                    f"Is the {label} on the left or right side of the image?",
                    f"Which side is the {label} on, left or right?",
                ),
            )
        if height := v.height(o):
            yield QA(
                "position",
                "position-height",
                height,
                (
                    f"Is the {label} at the top or the bottom?",
                    f"Is the {label} in the top or bottom half of the image?",
                    f"Is the {label} near the top or the bottom?",
                ),
            )
        if cell := v.cell(o.center):
            yield QA(
                "position",
                "position-cell",
                cell,
                (
                    f"Where is the {label}?",
                    f"Where is the {label} in the image?",
                    f"In which part of the image is the {label}?",
                    f"Where can you see the {label}?",
                ),
            )
    # What is in a cell: one object clearly there, and nothing else (no object, sign, word or chart) in it or
    # near it.
    for o, label in v.labelled():
        cell = v.cell(o.center)
        others = [p.center for p in v.objects if p is not o] + v.clutter
        if cell and not any(cell in v.cells_near(p) for p in others):
            yield QA(
                "position",
                "position-what",
                label,
                (
                    f"What is in the {cell} of the image?",
                    f"What can you see in the {cell} of the image?",
                    f"Which object is in the {cell}?",
                ),
            )
    extremes = (
        (
            "leftmost",
            0,
            -1,
            (
                "Which object is furthest to the left?",
                "What is the leftmost object?",
                "What is closest to the left edge?",
            ),
        ),
        (
            "rightmost",
            0,
            1,
            (
                "Which object is furthest to the right?",
                "What is the rightmost object?",
                "What is closest to the right edge?",
            ),
        ),
        (
            "topmost",
            1,
            -1,
            (
                "Which object is nearest the top?",
                "What is the topmost object?",
                "What is closest to the top edge?",
            ),
        ),
        (
            "bottommost",
            1,
            1,
            (
                "Which object is nearest the bottom?",
                "What is the bottommost object?",
                "What is closest to the bottom edge?",
            ),
        ),
    )
    for name, axis, sign, phrasings in extremes:
        if len(v.objects) < 2:
            break
        order = sorted(range(len(v.objects)), key=lambda i: sign * v.objects[i].center[axis], reverse=True)
        first, second = v.objects[order[0]], v.objects[order[1]]
        ahead = sign * (first.center[axis] - second.center[axis])
        beaten = any(sign * (p[axis] - first.center[axis]) > -v.margin for p in v.clutter)
        if ahead >= v.margin and v.labels[order[0]] and not beaten:
            yield QA("position", f"position-{name}", v.labels[order[0]], phrasings)


_DIRECTIONS = (  # (template, axis, sign of the other's offset, phrasings of "is A <dir> B?")
    (
        "left",
        0,
        -1,
        (
            "Is the {a} to the left of the {b}?",
            "Is the {a} left of the {b}?",
            "Is the {a} on the left side of the {b}?",
        ),
    ),
    (
        "right",
        0,
        1,
        (
            "Is the {a} to the right of the {b}?",
            "Is the {a} right of the {b}?",
            "Is the {a} on the right side of the {b}?",
        ),
    ),
    (
        "above",
        1,
        -1,
        ("Is the {a} above the {b}?", "Is the {a} higher up than the {b}?", "Is the {a} over the {b}?"),
    ),
    (
        "below",
        1,
        1,
        ("Is the {a} below the {b}?", "Is the {a} lower down than the {b}?", "Is the {a} under the {b}?"),
    ),
)
_WHAT_IS = {
    "left": (
        "What is to the left of the {b}?",
        "Which object is left of the {b}?",
        "What do you see to the left of the {b}?",
    ),
    "right": (
        "What is to the right of the {b}?",
        "Which object is right of the {b}?",
        "What do you see to the right of the {b}?",
    ),
    "above": ("What is above the {b}?", "Which object is above the {b}?", "What do you see above the {b}?"),
    "below": ("What is below the {b}?", "Which object is below the {b}?", "What do you see below the {b}?"),
}


def _relation(v: _View) -> Iterable[QA]:
    m = v.margin
    labelled = v.labelled()
    for a, la in labelled:
        for b, lb in labelled:
            if a is b:
                continue
            for name, axis, sign, phrasings in _DIRECTIONS:
                offset = a.center[axis] - b.center[axis]
                if abs(offset) >= m:
                    yield QA(
                        "relation",
                        f"relation-{name}",
                        _yes(sign * offset > 0),
                        tuple(p.format(a=la, b=lb) for p in phrasings),
                    )
    for b, lb in labelled:
        others = [(o, label) for o, label in zip(v.objects, v.labels, strict=True) if o is not b]
        for name, axis, sign, _ in _DIRECTIONS:
            offsets = [sign * (o.center[axis] - b.center[axis]) for o, _ in others]
            clear = [i for i, d in enumerate(offsets) if d >= m]
            unsure = [d for d in offsets if 0 < d < m]
            clutter = any(sign * (p[axis] - b.center[axis]) > 0 for p in v.clutter)
            if len(clear) == 1 and not unsure and not clutter and others[clear[0]][1]:
                phrasings = tuple(p.format(b=lb) for p in _WHAT_IS[name])
                yield QA("relation", f"relation-what-{name}", others[clear[0]][1], phrasings)
        if not others:
            continue
        distances = sorted(
            ((math.dist(o.center, b.center), label) for o, label in others), key=lambda d: d[0]
        )
        near = [math.dist(p, b.center) for p in v.clutter]
        (d1, l1), (dn, ln) = distances[0], distances[-1]
        runner_up = distances[1][0] if len(distances) > 1 else math.inf
        if l1 and runner_up - d1 >= m and all(d >= d1 + m for d in near):
            yield QA(
                "relation",
                "relation-nearest",
                l1,
                (
                    f"What is nearest to the {lb}?",
                    f"Which object is closest to the {lb}?",
                    f"What is the closest thing to the {lb}?",
                ),
            )
        second_last = distances[-2][0] if len(distances) > 1 else -math.inf
        if len(distances) > 1 and ln and dn - second_last >= m and all(d <= dn - m for d in near):
            yield QA(
                "relation",
                "relation-furthest",
                ln,
                (
                    f"What is furthest from the {lb}?",
                    f"Which object is farthest from the {lb}?",
                    f"What is the furthest thing from the {lb}?",
                ),
            )


def _compare(v: _View) -> Iterable[QA]:
    kinds = Counter(o.name for o in v.shapes)
    colors = Counter(o.color for o in v.shapes)
    groups = [(PLURALS[s], kinds[s]) for s in SHAPES if v.askable(s)]
    groups += [(f"{c} shapes", colors[c]) for c in COLORS if c not in v.bad_colors]
    for p1, c1 in groups:
        for p2, c2 in groups:
            if p1 == p2 or p1.endswith("shapes") != p2.endswith("shapes") or c1 + c2 == 0:
                continue
            if c1 != c2:
                yield QA(
                    "compare",
                    "compare-more",
                    _yes(c1 > c2),
                    (
                        f"Are there more {p1} than {p2}?",
                        f"Is the number of {p1} greater than the number of {p2}?",
                        f"Do {p1} outnumber {p2}?",
                    ),
                )
                yield QA(
                    "compare",
                    "compare-fewer",
                    _yes(c1 < c2),
                    (
                        f"Are there fewer {p1} than {p2}?",
                        f"Is the number of {p1} smaller than the number of {p2}?",
                        f"Are there less {p1} than {p2}?",
                    ),
                )
                if c1 and c2:
                    yield QA(
                        "compare",
                        "compare-which-more",
                        p1 if c1 > c2 else p2,
                        (
                            f"Are there more {p1} or more {p2}?",
                            f"Which are there more of, {p1} or {p2}?",
                            f"Which are more common here, {p1} or {p2}?",
                        ),
                    )
            if c1 and c2:
                yield QA(
                    "compare",
                    "compare-same",
                    _yes(c1 == c2),
                    (
                        f"Are there as many {p1} as {p2}?",
                        f"Is the number of {p1} the same as the number of {p2}?",
                        f"Are there equally many {p1} and {p2}?",
                    ),
                )
    # Bigger: only small against large, and only by labels that do not say the size.
    plain = [(o, label) for o, label in v.labelled() if o.size not in label.split()]
    for a, la in plain:
        for b, lb in plain:
            if a.size == "small" and b.size == "large":
                for x, y in ((la, lb), (lb, la)):
                    yield QA(
                        "compare",
                        "compare-bigger",
                        lb,
                        (
                            f"Which is bigger, the {x} or the {y}?",
                            f"Which is larger: the {x} or the {y}?",
                            f"Which one is bigger, the {x} or the {y}?",
                        ),
                    )
                    yield QA(
                        "compare",
                        "compare-smaller",
                        la,
                        (
                            f"Which is smaller, the {x} or the {y}?",
                            f"Which is tinier: the {x} or the {y}?",
                            f"Which one is smaller, the {x} or the {y}?",
                        ),
                    )
                for x, y, answer in ((la, lb, "no"), (lb, la, "yes")):
                    yield QA(
                        "compare",
                        "compare-is-bigger",
                        answer,
                        (
                            f"Is the {x} bigger than the {y}?",
                            f"Is the {x} larger than the {y}?",
                            f"Is the {x} the bigger of the two, compared with the {y}?",
                        ),
                    )


def _reading(v: _View) -> Iterable[QA]:
    words = v.scene.words
    signs = [w for w in words if w.sign]
    if len(signs) == 1:
        yield QA(
            "reading",
            "reading-sign",
            signs[0].text,
            (
                "What does the sign say?",
                "What is written on the sign?",
                "Read the sign.",
                "What word is on the sign?",
            ),
        )
    if len(words) == 1:
        yield QA(
            "reading",
            "reading-word",
            words[0].text,
            (
                "What word is written in the image?",
                "What does the text say?",
                "Read the word in the image.",
                "What is written here?",
            ),
        )
    inks = Counter(w.color for w in words)
    if len(words) > 1:
        for word in words:
            if inks[word.color] == 1:
                c = word.color
                yield QA(
                    "reading",
                    "reading-color",
                    word.text,
                    (
                        f"Which word is written in {c}?",
                        f"What does the {c} text say?",
                        f"What is the {c} word?",
                    ),
                )
    if words:
        shown = {w.text for w in words}
        for text in WORDS:
            yield QA(
                "reading",
                "reading-exists",
                _yes(text in shown),
                (
                    f'Does the image say "{text}"?',
                    f'Is the word "{text}" written in the image?',
                    f'Can you see the word "{text}"?',
                ),
            )


def _chart(v: _View) -> Iterable[QA]:
    chart = v.scene.chart
    if chart is None:
        return
    values, labels = chart.values, chart.labels
    if values.count(max(values)) == 1:
        yield QA(
            "chart",
            "chart-highest",
            labels[values.index(max(values))],
            (
                "Which bar is the highest?",
                "Which bar is the tallest?",
                "Which bar has the largest value?",
                "What is the label of the highest bar?",
            ),
        )
    if values.count(min(values)) == 1:
        yield QA(
            "chart",
            "chart-lowest",
            labels[values.index(min(values))],
            (
                "Which bar is the lowest?",
                "Which bar is the shortest?",
                "Which bar has the smallest value?",
                "What is the label of the lowest bar?",
            ),
        )
    for label, value in zip(labels, values, strict=True):
        yield QA(
            "chart",
            "chart-value",
            str(value),
            (
                f"What is the value of bar {label}?",
                f"How high is bar {label}?",
                f"What number is shown for bar {label}?",
            ),
        )
    yield QA(
        "chart",
        "chart-bars",
        str(len(values)),
        (
            "How many bars are in the chart?",
            "How many bars does the chart have?",
            "Count the bars in the chart.",
        ),
    )
    for a, va in zip(labels, values, strict=True):
        for b, vb in zip(labels, values, strict=True):
            if va != vb:
                yield QA(
                    "chart",
                    "chart-compare",
                    _yes(va > vb),
                    (
                        f"Is bar {a} higher than bar {b}?",
                        f"Is bar {a} taller than bar {b}?",
                        f"Does bar {a} have a larger value than bar {b}?",
                    ),
                )


def _captions(v: _View) -> Iterable[QA]:
    yield QA(
        "caption",
        "caption",
        caption(v.scene),
        (
            "Describe the image.",
            "What is in this image?",
            "Give a short description of the image.",
            "Describe the picture in one sentence.",
        ),
    )
    yield QA(
        "detail",
        "detail",
        description(v.scene),
        (
            "Describe the image in detail.",
            "Describe every object and where it is.",
            "Give a detailed description of the image.",
            "List everything in the image and where it is.",
        ),
    )


_TEMPLATES: tuple[Callable[[_View], Iterable[QA]], ...] = (
    _existence, _count, _color, _shape, _position, _relation, _compare, _reading, _chart, _captions,
)  # fmt: skip


# -- captions -------------------------------------------------------------------------------------------------

_ALREADY_PLURAL = frozenset({"grapes", "cherries", "scissors", "fish"})
_IRREGULAR = {"mouse": "mice", "potato": "potatoes", "tomato": "tomatoes"}


def plural(name: str) -> str:
    """ "tiger" -> "tigers", "bus" -> "buses", "butterfly" -> "butterflies", "hot dog" -> "hot dogs"."""
    *head, last = name.split()
    if last in _ALREADY_PLURAL or name in _ALREADY_PLURAL:
        word = last
    elif last in _IRREGULAR:
        word = _IRREGULAR[last]
    elif last.endswith(("s", "x", "ch", "sh")):
        word = last + "es"
    elif last.endswith("y") and last[-2:-1] not in "aeiou":
        word = last[:-1] + "ies"
    else:
        word = last + "s"
    return " ".join([*head, word])


def _reading_order(v: _View, items: Sequence[Any], box: Callable[[Any], Box]) -> list[Any]:
    """Top row first, left to right within a row (rows of the 3 x 3 grid)."""

    def key(item: Any) -> tuple[int, float]:
        x, y = _center(box(item))
        return min(2, int(y // (v.size / 3))), x

    return sorted(items, key=key)


def _listing(parts: Sequence[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:] + "."


def caption(scene: Scene) -> str:
    """One sentence: 'Two red circles, a blue star, a tiger and a sign that says "open".' Alike objects are
    counted together; with more than four kinds, colours are left out ("three circles, two stars, ...")."""
    v = _View(scene)
    things = _reading_order(v, scene.objects, lambda o: o.box)

    def grouped(name_of: Callable[[Thing], tuple[str, str]]) -> list[str]:
        counts: Counter[tuple[str, str]] = Counter(name_of(o) for o in things)
        return [_a(one) if n == 1 else f"{NUMBER_WORDS[n]} {many}" for (one, many), n in counts.items()]

    def full(o: Thing) -> tuple[str, str]:
        return (
            (f"{o.color} {o.name}", f"{o.color} {PLURALS[o.name]}")
            if o.is_shape
            else (o.name, plural(o.name))
        )

    def kind(o: Thing) -> tuple[str, str]:
        return (o.name, PLURALS[o.name]) if o.is_shape else (o.name, plural(o.name))

    parts = grouped(full)
    if len(parts) > 4:
        parts = grouped(kind)
    for word in _reading_order(v, scene.words, lambda w: w.box):
        parts.append(f'a sign that says "{word.text}"' if word.sign else f'the word "{word.text}"')
    if scene.chart is not None:
        parts.append("a bar chart")
    return _sentence(_listing(parts))


def description(scene: Scene) -> str:
    """Every object with its size, colour and place, then the words and the chart: "There are two objects. A
    large red circle at the top left. A small tiger in the center. A yellow sign at the bottom says "open"."."""
    v = _View(scene)
    n = len(scene.objects)
    sentences = [f"There {'is' if n == 1 else 'are'} {NUMBER_WORDS[n]} object{'' if n == 1 else 's'}"]
    for o in _reading_order(v, scene.objects, lambda o: o.box):
        where = _CELL_PHRASES[v.cell(o.center, strict=False)]
        what = f"{o.size} {o.color} {o.name}" if o.is_shape else f"{o.size} {o.name}"
        sentences.append(f"{_a(what)} {where}")
    for w in _reading_order(v, scene.words, lambda w: w.box):
        where = _CELL_PHRASES[v.cell(_center(w.box), strict=False)]
        if w.sign:
            sentences.append(f'{_a(w.sign + " sign")} {where} says "{w.text}"')
        else:
            sentences.append(f'the word "{w.text}" is written in {w.color} {where}')
    if (chart := scene.chart) is not None:
        where = _CELL_PHRASES[v.cell(_center(chart.box), strict=False)]
        bars = _listing(
            [f"{label} at {value}" for label, value in zip(chart.labels, chart.values, strict=True)]
        )
        sentences.append(f"a bar chart {where} shows {bars}")
    return " ".join(_sentence(s) for s in sentences)


# -- rows -----------------------------------------------------------------------------------------------------

VQA_FEATURES = Features(
    {
        "image": Value("string"),  # "scenes/<size>[/<layout>]/<seed>": its PNG when read (`load_rows`)
        "question": Value("string"),
        "answers": List(Value("string")),
        "question_type": Value("string"),
        "answer_type": Value("string"),
        "seed": Value("int64"),  # `generate(seed, size, layout=...)` gives the scene back
    }
)
# The vqa rows' images, one row per scene (see `load_rows`).
IMAGE_FEATURES = Features({"seed": Value("int64"), "png": Value("binary")})
CAPTION_FEATURES = Features(
    {**common.PAIR_FEATURES, "description": Value("string"), "seed": Value("int64"), "scene": Value("string")}
)
CHAT_FEATURES = Features(
    {
        "texts": List({"user": Value("string"), "assistant": Value("string")}),
        "images": List(ImageFeature()),
        "seed": Value("int64"),
        "scene": Value("string"),
    }
)


class Subset(NamedTuple):
    """What a `subset` string asks of the scenes (`parse_subset`)."""

    skills: tuple[str, ...] | None  # skills or templates to ask (None: every skill)
    layout: Layout
    per_image: int = QUESTIONS_PER_IMAGE  # vqa questions asked of each scene


def parse_subset(subset: str | None) -> Subset:
    """A `subset` ("count,position", "objects=1-2,plain,count", "reading-word,count,per-image=1") as its
    skills and templates (`TEMPLATES`; None: every skill), its layout ("objects=N" or "objects=LOW-HIGH"
    bounds the number of objects, "plain" leaves words and charts out) and the vqa questions asked of each
    scene ("per-image=N", default QUESTIONS_PER_IMAGE). ValueError for anything else.

    "per-image=1" is how a test set of one skill is drawn (the skill table's): ten questions of one skill
    from one scene drain its pools (see `questions`), so 200 of them come from 20 scenes, lean to "no" and
    "0", and are not 200 independent trials; one a scene gives 200 scenes and the answers' own spread."""
    skills: list[str] = []
    objects, clutter, per_image = (1, MAX_OBJECTS), True, QUESTIONS_PER_IMAGE
    for item in (s.strip() for s in (subset or "").split(",")):
        if item == "plain":
            clutter = False
        elif item.startswith("objects="):
            bounds = item.removeprefix("objects=").split("-")
            if len(bounds) > 2 or not all(b.strip().isdigit() for b in bounds):
                raise ValueError(f"{item!r} in subset {subset!r}: write objects=N or objects=LOW-HIGH")
            objects = (int(bounds[0]), int(bounds[-1]))
        elif item.startswith("per-image="):
            per_image = common.per_image(item, subset, QUESTIONS_PER_IMAGE)
        elif item:
            skills.append(item)
    templates = {t for names in TEMPLATES.values() for t in names}
    unknown = [s for s in skills if s not in SKILLS and s not in templates]
    if unknown:
        raise ValueError(
            f"unknown skill(s) {unknown} in subset {subset!r}; the skills: {', '.join(SKILLS)}"
            " (a skill's templates: vlm.data.scenes.TEMPLATES; the layout: objects=LOW-HIGH, plain;"
            " questions a scene: per-image=N)"
        )
    return Subset(tuple(skills) or None, Layout(objects, clutter), per_image)


def build(
    split: str = "train", size: int | None = SIZE, limit: int | None = None, *, cache: bool = True
) -> datasets.Dataset:
    """Scenes as caption pairs, the `vlm.data.sources.SOURCES` builder that the SigLIP pretraining reads:
    image, text (the one-sentence caption), source "scenes", description (the detailed one), seed, scene
    (JSON). `limit` images (default: TRAIN_IMAGES or TEST_IMAGES). Drawn at 128 px (`SIZE`), then resized
    to `size` x `size` (None: kept) like every source's images: a 64-px tower is pretrained on what the VLM's
    processor makes of a 128-px scene, not on a scene drawn at 64 px (other fonts, thinner lines)."""
    if split == "all":  # as the other sources: both splits
        parts = [build(part, size, limit, cache=cache) for part in ("train", "test")]
        return common.with_report(datasets.concatenate_datasets(parts), common.SkipReport("scenes"))
    rows = load_rows("caption", split, limit=limit, cache=cache)
    if size is None or size == SIZE:
        return rows
    resized = rows.map(_resized, fn_kwargs={"size": size}, desc=f"scenes at {size} px")
    return common.with_report(resized, common.skip_report(rows))


def _resized(row: dict[str, Any], size: int) -> dict[str, Any]:
    return {"image": common.png_cell(row["image"].convert("RGB"), size)}


def load_rows(
    kind: str,
    split: str = "train",
    limit: int | None = None,
    subset: str | None = None,
    size: int = SIZE,
    cache: bool = True,
) -> datasets.Dataset:
    """Rows of `kind` for `vlm.data.named.open_data`: "vqa" (`limit` questions, QUESTIONS_PER_IMAGE an
    image), "caption" or "chat" (`limit` images, one row each). Without `limit`, TRAIN_IMAGES or
    TEST_IMAGES images. `subset` names the skills or templates to keep (vqa and chat) and the scenes' `Layout`
    (any kind; `parse_subset`). Built with `common.build_rows` and cached by its fingerprint (`cache`).

    A vqa row's image is stored once per scene, not once per question: the scenes are drawn once each into
    a table of their own (`_images`: seed and PNG, about 3 KB a scene, 65 MB for the default 20,000 train
    scenes, cached like the rows), and a `datasets` transform looks each row's image up there by its seed
    when the row is read (a memory-mapped read of microseconds). Stored with the questions, each image would
    be written once per question, 10 copies, 650 MB for the default 200,000 train questions; drawn when the
    row is read, every read would cost about 2.5 ms, since training reads rows in random order over
    thousands of scenes and no small cache of recent images would hit."""
    if kind not in ("vqa", "caption", "chat"):
        raise ValueError(f"generated scenes come as kind vqa, caption or chat, not {kind!r}")
    skills, layout, per_image = parse_subset(subset)
    if skills is not None and kind == "caption":
        raise ValueError("a subset of skills applies to kinds vqa and chat, not caption")
    if per_image != QUESTIONS_PER_IMAGE and kind != "vqa":
        raise ValueError(f"per-image applies to kind vqa (questions a scene), not {kind}")
    # Named only when it is not the default, so the sets built before it keep their cache fingerprints.
    asked = {} if per_image == QUESTIONS_PER_IMAGE else {"per_image": per_image}
    scene_seed(split, 0)  # checks the split
    images = TRAIN_IMAGES if split == "train" else TEST_IMAGES
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    if limit is not None:
        images = _images_for(split, limit, skills, size, layout, per_image) if kind == "vqa" else limit
    items = [{"seed": scene_seed(split, i)} for i in range(images)]
    built = common.build_rows(
        f"scenes-{kind}",
        items,
        _encode,
        {"vqa": VQA_FEATURES, "caption": CAPTION_FEATURES, "chat": CHAT_FEATURES}[kind],
        version=_VERSION,
        cache=cache,
        kind=kind,
        size=size,
        skills=list(skills) if skills else None,
        layout=layout,
        **asked,
    )
    if kind != "vqa":
        return built
    report = common.skip_report(built)
    if limit is not None and len(built) > limit:
        built = built.select(range(limit))
    table = _images(split, images, size, layout, cache)
    look_up = functools.partial(
        _look_up_images, images=table, first_seed=scene_seed(split, 0), size=size, layout=layout
    )
    return common.with_report(built.with_transform(look_up), report)


def _images_for(
    split: str, rows: int, skills: Sequence[str] | None, size: int, layout: Layout, per_image: int
) -> int:
    """How many images give `rows` questions. Every scene of the default layout has `per_image` of all
    skills; for some skills only, or smaller scenes, the scenes' questions are counted (their descriptions are
    generated, not drawn)."""
    if skills is None and layout == Layout():
        return -(-rows // per_image)
    total = index = 0
    while total < rows:
        if index >= TEST_SEED or (index > 1000 and total == 0):
            raise ValueError(f"no scene has a question of the skills {list(skills)}")
        scene = generate(scene_seed(split, index), size, layout=layout)
        total += len(questions(scene, count=per_image, skills=skills))
        index += 1
    return index


def _images(split: str, n_images: int, size: int, layout: Layout, cache: bool) -> datasets.Dataset:
    """The split's first `n_images` scenes drawn once each, in seed order: columns seed and png (the bytes a
    vqa row's image holds). Built with `common.build_rows` (so cached by the seeds, `size` and `_VERSION`
    and `layout` with `cache`, kept in memory without)."""
    items = [{"seed": scene_seed(split, i)} for i in range(n_images)]
    return common.build_rows(
        "scenes-images",
        items,
        _encode_png,
        IMAGE_FEATURES,
        version=_VERSION,
        cache=cache,
        size=size,
        layout=layout,
    )


def _encode_png(item: dict[str, Any], size: int, layout: Layout) -> dict[str, Any]:
    return {"seed": item["seed"], "png": _draw(item["seed"], size, layout)}


def _look_up_images(
    batch: dict[str, list[Any]], images: datasets.Dataset, first_seed: int, size: int, layout: Layout
) -> dict[str, list[Any]]:
    """The vqa rows' transform: each row's image, read from `images` (`_images`) by its seed.

    The seeds there are contiguous from `first_seed`, so a seed's row is `seed - first_seed`; the seed stored
    in that row is checked, and a scene the table lacks is drawn instead. The Arrow columns are read
    directly (about 8 us a row, against 43 us through `images[i]`, which formats a whole row): they are
    the table under `build_rows`' filter, whose rows are the dataset's since drawing never skips one."""
    table = images.data
    seeds, pngs = table.column("seed"), table.column("png")
    out = []
    for seed in batch["seed"]:
        index = seed - first_seed
        if 0 <= index < len(seeds) and seeds[index].as_py() == seed:
            png = pngs[index].as_py()
        else:
            png = _png(seed, size, layout)
        out.append({"bytes": png, "path": None})
    return {**batch, "image": out}


@functools.lru_cache(maxsize=64)
def _png(seed: int, size: int, layout: Layout) -> bytes:
    """A scene's image drawn (for a seed outside the table), the last few kept."""
    return _draw(seed, size, layout)


def _draw(seed: int, size: int, layout: Layout) -> bytes:
    return common.png_bytes(render(generate(seed, size, layout=layout)))


def _encode(
    item: dict[str, Any],
    kind: str,
    size: int,
    skills: list[str] | None,
    layout: Layout,
    per_image: int = QUESTIONS_PER_IMAGE,
) -> dict[str, Any] | list[dict[str, Any]]:
    """One seed -> its rows (`common.build_rows`' encode step)."""
    seed = item["seed"]
    scene = generate(seed, size, layout=layout)
    if kind == "vqa":  # the image is looked up in `_images` when a row is read
        return [
            {
                "image": "/".join(["scenes", str(size), *([str(layout)] if str(layout) else []), str(seed)]),
                "question": qa.question,
                "answers": [qa.answer],
                "question_type": qa.skill,
                "answer_type": qa.template,
                "seed": seed,
            }
            for qa in questions(scene, count=per_image, skills=skills)
        ]
    image = {"bytes": common.png_bytes(render(scene)), "path": None}
    meta = json.dumps(scene.to_dict())  # the description as JSON (`Scene.from_dict(json.loads(meta))`)
    if kind == "caption":
        return {
            "image": image,
            "text": caption(scene),
            "source": "scenes",
            "description": description(scene),
            "seed": seed,
            "scene": meta,
        }
    texts = [{"user": qa.question, "assistant": qa.answer} for qa in conversation(scene, skills=skills)]
    return {"texts": texts, "images": [image], "seed": seed, "scene": meta}
