"""Sort-of-CLEVR (Santoro et al. 2017, "A simple neural network module for relational reasoning", section 3.2
and supplementary D), generated here from seeds, with its questions phrased in English: a yardstick from
outside this project. The paper reports CNN+RN above 94% on both kinds of question, and CNN+MLP at the same
level on non-relational ones but plateauing at 63% on relational ones.

    scene = generate(seed=3)   # 6 objects: (colour, shape, centre)
    render(scene)              # 75 x 75 RGB
    questions(scene)           # 10 non-relational, then 10 relational QA

What the paper specifies (supplementary D): 10,000 images of 75 x 75 px, 200 withheld for validation; 6
objects in each, one of each of 6 colours (red, blue, green, orange, yellow, gray), which identify them,
each a randomly chosen shape (square or circle); 20 questions per image, 10 relational and 10
non-relational. Non-relational: the shape of the red object; is it on the left or right of the image; is it
on the top or bottom. Relational: the shape of the object closest to the green object; of the object
furthest from it; how many objects have its shape.

What the paper leaves open is taken from the reference generator that RN re-implementations share
(kimhc6028/relational-networks, `sort_of_clevr_generator.py`): objects are 11 x 11 px (a square from centre - 5
to centre + 5 inclusive, or a disc of radius 5), not anti-aliased, on white; centres uniform in [5, 70) on each
axis, redrawn until at least 10 px (2 x 5) from every centre placed before; the colours in RGB; each
question's colour and subtype drawn uniformly with replacement; "left" is centre x < 37.5 and "top" centre y <
37.5; closest and furthest by the distance between centres; the count includes the object itself (answers 1-6,
as the reference's "count->1~6").

One deviation: a closest or furthest question whose answer a tie would decide (two objects at the same distance
with different shapes) is drawn again, never asked; the reference took the first in colour order.

Rows (`load_rows`, for `vlm.data.named.open_data`): question_type "relational" or "non-relational" (what the
paper reports by), answer_type the subtype (shape, horizontal, vertical, closest, furthest, count). Split
"train" is 9,800 images (seeds 0, 1, ...), "test" the paper's 200 withheld ones (seeds from `TEST_SEED`).
"""

from __future__ import annotations

import functools
import math
import random
from dataclasses import asdict, dataclass
from typing import Any

import datasets
from datasets import Features, List, Value
from PIL import Image, ImageDraw

from vlm.data import common

SIZE = 75
HALF = 5  # an object spans centre - 5 .. centre + 5
MIN_DISTANCE = 2 * HALF  # between centres
QUESTIONS_PER_KIND = 10
TEST_SEED = 10**9
TRAIN_IMAGES, TEST_IMAGES = 9_800, 200
_VERSION = 1
# The reference's colours (it writes BGR for OpenCV), as RGB.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "orange": (255, 156, 0),
    "gray": (128, 128, 128),
    "yellow": (255, 255, 0),
}
SHAPES = ("square", "circle")
# Supplementary D's example questions, one sentence per subtype (the paper encodes each as fixed bits).
PHRASES = {
    "shape": "What is the shape of the {c} object?",
    "horizontal": "Is the {c} object on the left or right of the image?",
    "vertical": "Is the {c} object on the top or bottom of the image?",
    "closest": "What is the shape of the object that is closest to the {c} object?",
    "furthest": "What is the shape of the object that is furthest from the {c} object?",
    "count": "How many objects have the shape of the {c} object?",
}
NON_RELATIONAL = ("shape", "horizontal", "vertical")
RELATIONAL = ("closest", "furthest", "count")


@dataclass(frozen=True)
class Item:
    color: str
    shape: str
    center: tuple[int, int]  # x, y in px


@dataclass(frozen=True)
class Scene:
    seed: int
    objects: tuple[Item, ...]  # in the order of COLORS

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def find(self, color: str) -> Item:
        return next(o for o in self.objects if o.color == color)


@dataclass(frozen=True)
class QA:
    kind: str  # "relational" or "non-relational"
    subtype: str  # a key of PHRASES
    color: str  # the object the question is about
    answer: str

    @property
    def question(self) -> str:
        return PHRASES[self.subtype].format(c=self.color)


def scene_seed(split: str, index: int) -> int:
    if split not in ("train", "test"):
        raise ValueError(f"Sort-of-CLEVR has the splits 'train' and 'test', not {split!r}")
    if not 0 <= index < TEST_SEED:
        raise ValueError(f"image index {index} is out of range [0, {TEST_SEED})")
    return index + (TEST_SEED if split == "test" else 0)


def generate(seed: int) -> Scene:
    """The scene of `seed`: the 6 colours in order, each a square or a circle, placed as the reference does."""
    rng = random.Random(f"sort-of-clevr:{_VERSION}:{seed}")
    objects: list[Item] = []
    for color in COLORS:
        while True:
            center = (rng.randrange(HALF, SIZE - HALF), rng.randrange(HALF, SIZE - HALF))
            if all(math.dist(center, o.center) >= MIN_DISTANCE for o in objects):
                break
        objects.append(Item(color, rng.choice(SHAPES), center))
    return Scene(seed, tuple(objects))


def render(scene: Scene) -> Image.Image:
    image = Image.new("RGB", (SIZE, SIZE), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    for o in scene.objects:
        x, y = o.center
        box = (x - HALF, y - HALF, x + HALF, y + HALF)  # inclusive: 11 x 11 px
        if o.shape == "square":
            draw.rectangle(box, fill=COLORS[o.color])
        else:
            draw.ellipse(box, fill=COLORS[o.color])
    return image


def answer(scene: Scene, subtype: str, color: str) -> str | None:
    """The answer to one question, or None when a tie leaves it open (closest / furthest only)."""
    me = scene.find(color)
    if subtype == "shape":
        return me.shape
    if subtype == "horizontal":
        return "left" if me.center[0] < SIZE / 2 else "right"
    if subtype == "vertical":
        return "top" if me.center[1] < SIZE / 2 else "bottom"
    if subtype == "count":
        return str(sum(o.shape == me.shape for o in scene.objects))
    others = [(math.dist(me.center, o.center), o.shape) for o in scene.objects if o is not me]
    best = min(d for d, _ in others) if subtype == "closest" else max(d for d, _ in others)
    shapes = {shape for d, shape in others if d == best}
    return shapes.pop() if len(shapes) == 1 else None


def questions(scene: Scene) -> list[QA]:
    """10 non-relational then 10 relational questions, each of a colour and a subtype drawn uniformly."""
    rng = random.Random(f"sort-of-clevr-questions:{_VERSION}:{scene.seed}")
    out = []
    for kind, subtypes in (("non-relational", NON_RELATIONAL), ("relational", RELATIONAL)):
        asked = 0
        while asked < QUESTIONS_PER_KIND:
            color, subtype = rng.choice(list(COLORS)), rng.choice(subtypes)
            reply = answer(scene, subtype, color)
            if reply is not None:
                out.append(QA(kind, subtype, color, reply))
                asked += 1
    return out


FEATURES = Features(
    {
        "image": Value("string"),  # "sort-of-clevr/<seed>": drawn when the row is read (see `load_rows`)
        "question": Value("string"),
        "answers": List(Value("string")),
        "question_type": Value("string"),
        "answer_type": Value("string"),
        "seed": Value("int64"),  # `generate(seed)` gives the scene back
    }
)


def load_rows(
    kind: str, split: str = "train", limit: int | None = None, subset: str | None = None, cache: bool = True
) -> datasets.Dataset:
    """VQA rows for `vlm.data.named.open_data`: 20 an image, `limit` in all (default: the split's images, as
    the paper: 9,800 train, 200 test). `subset` keeps "relational" or "non-relational" questions only, and
    "relational,per-image=N" the first N of an image's ten (each drawn uniformly, so the first is a fair
    draw: "per-image=1" with `limit` 200 is one question from each of the paper's 200 test images, where ten
    a kind would be 20 images). An image is drawn when its row is read, not stored 20 times: six flat shapes
    at 75 px take 0.2 ms (a scene of `vlm.data.scenes` takes 2.5 ms, so those are drawn once and stored once
    per scene)."""
    if kind != "vqa":
        raise ValueError(f"Sort-of-CLEVR is of kind vqa, not {kind!r}")
    question_kind, per_image = _parse_subset(subset)
    scene_seed(split, 0)  # checks the split
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    images = -(-limit // per_image) if limit else (TRAIN_IMAGES if split == "train" else TEST_IMAGES)
    items = [{"seed": scene_seed(split, i)} for i in range(images)]
    # per_image is named only when it is not the default, so sets built before it keep their fingerprints.
    fewer = {} if per_image == QUESTIONS_PER_KIND * (1 if question_kind else 2) else {"per_image": per_image}
    built = common.build_rows(
        "sort-of-clevr",
        items,
        _encode,
        FEATURES,
        version=_VERSION,
        cache=cache,
        subset=question_kind,
        **fewer,
    )
    report = common.skip_report(built)
    if limit is not None and len(built) > limit:
        built = built.select(range(limit))
    return common.with_report(built.with_transform(_draw_images), report)


def _parse_subset(subset: str | None) -> tuple[str | None, int]:
    """A subset's question kind and questions an image: "relational" or "non-relational" (10 an image), either
    with ",per-image=N" (the first N of the 10), or None (both kinds, 20)."""
    kinds = ("relational", "non-relational")
    items = [item.strip() for item in (subset or "").split(",") if item.strip()]
    per_image = [item for item in items if item.startswith("per-image=")]
    rest = [item for item in items if not item.startswith("per-image=")]
    if not items:
        return None, 2 * QUESTIONS_PER_KIND
    if len(rest) != 1 or rest[0] not in kinds or len(per_image) > 1:
        raise ValueError(
            f"subset {subset!r}: Sort-of-CLEVR's subsets are {', '.join(kinds)}, each with per-image=N or without"
        )
    if not per_image:
        return rest[0], QUESTIONS_PER_KIND
    return rest[0], common.per_image(per_image[0], subset, QUESTIONS_PER_KIND)


def _draw_images(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
    """The rows' transform: each row's image, drawn from its seed."""
    return {**batch, "image": [{"bytes": _png(seed), "path": None} for seed in batch["seed"]]}


@functools.lru_cache(maxsize=64)
def _png(seed: int) -> bytes:
    return common.png_bytes(render(generate(seed)))


def _encode(
    item: dict[str, Any], subset: str | None, per_image: int = 2 * QUESTIONS_PER_KIND
) -> list[dict[str, Any]]:
    scene = generate(item["seed"])
    asked = [qa for qa in questions(scene) if subset is None or qa.kind == subset]
    return [
        {
            "image": f"sort-of-clevr/{item['seed']}",
            "question": qa.question,
            "answers": [qa.answer],
            "question_type": qa.kind,
            "answer_type": qa.subtype,
            "seed": item["seed"],
        }
        for qa in asked[:per_image]
    ]
