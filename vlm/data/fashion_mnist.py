"""Fashion-MNIST (60,000 train / 10,000 test) captioned from its class names: "a photo of a sneaker".

Package: dataset-fashion-mnist. The official split; the 28 x 28 grey images are stored as RGB.
"""

from __future__ import annotations

import functools
import gzip
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from datasets import ClassLabel, Features
from PIL import Image

from vlm.data import common

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
_VERSION = 1
FEATURES = Features({**common.PAIR_FEATURES, "label": ClassLabel(names=list(FASHION_MNIST_CLASSES))})
_FILES = {"train": "train", "test": "t10k"}


def build(
    split: common.Split = "train", size: int | None = 64, limit: int | None = None, *, cache: bool = True
) -> datasets.Dataset:
    """The images resized to `size` (None: 28), each with one template of `FASHION_MNIST_TEMPLATES`, chosen
    by a fixed seed. Columns: image, text, source, label (a ClassLabel with `FASHION_MNIST_CLASSES` as
    names, for zero-shot evaluation)."""
    folder = common.require(FASHION_MNIST_DIR, "dataset-fashion-mnist")
    items = []
    for name in common.official_splits(split):
        count = len(_idx(folder / f"{_FILES[name]}-labels-idx1-ubyte.gz"))
        templates = np.random.default_rng(0).integers(len(FASHION_MNIST_TEMPLATES), size=count)
        items.extend({"split": name, "index": i, "template": int(t)} for i, t in enumerate(templates))
    items = common.hash_sample(items, lambda item: f"{item['split']}:{item['index']}", limit)
    return common.build_rows(
        "fashion_mnist", items, _image, FEATURES, version=_VERSION, cache=cache, folder=str(folder), size=size
    )


@functools.lru_cache(maxsize=4)  # the map runs in batches: decompress each file once per process
def _idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format: big-endian magic, dimensions, then uint8 data), gzipped."""
    data = gzip.decompress(path.read_bytes())
    magic = int.from_bytes(data[:4], "big")
    if magic >> 8 != 0x08:  # 0x08: unsigned bytes; the low byte is the number of dimensions
        raise ValueError(f"{path}: not a uint8 IDX file (magic {magic:#x})")
    ndim = magic & 0xFF
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _image(item: dict[str, Any], folder: str, size: int | None) -> dict[str, Any]:
    stem = Path(folder) / _FILES[item["split"]]
    images = _idx(Path(f"{stem}-images-idx3-ubyte.gz"))  # (N, 28, 28)
    label = int(_idx(Path(f"{stem}-labels-idx1-ubyte.gz"))[item["index"]])  # labels: (N,)
    rgb = Image.fromarray(images[item["index"]]).convert("RGB")
    text = FASHION_MNIST_TEMPLATES[item["template"]].format(FASHION_MNIST_PHRASES[label])
    return {"image": common.png_cell(rgb, size), "text": text, "source": "fashion_mnist", "label": label}
