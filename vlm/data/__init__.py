"""Data for training and evaluation through Hugging Face `datasets`, one module per source:

- `common`: what the builders share: held-out splits and samples by hash, image encoding, skip reports, and
  `build_rows`, the one map-filter-cache step every builder ends in;
- `files`: your own caption pairs for pretraining, from JSONL, folders and Hugging Face datasets;
- `emoji`, `openclipart`, `flags`, `fashion_mnist`, `easy_vqa`: the packaged offline sources, each with the
  same `build(split, size, limit, ...)`; `easy_vqa` also gives its questions as VQA rows;
- `scenes`: generated scenes (shapes, emoji and clip art pictures, words, a bar chart) described in full, with
  questions by skill (existence, count, color, shape, position, relation, compare, reading, chart, caption,
  detail) computed from the description: `open_data` names them `scenes` (vqa, caption, chat);
- `sort_of_clevr`: Sort-of-CLEVR as Santoro et al. 2017 specify it, with English questions (`sort-of-clevr`,
  vqa; question_type relational or non-relational);
- `sources`: the sources by name (`SOURCES`), mixing and splitting;
- `named`: data as a config names it (a packaged source, a file, a folder or a hub id, of kind vqa, caption or
  chat: VQAv2, several captions an image, LLaVA-Instruct, transformers' chat format, the Cauldron), as
  conversations for fine-tuning and rows for `vlm eval`.

A caption pair dataset has the columns image (RGB), text and source."""

from vlm.data.common import (
    HELD_OUT_FRACTION,
    PAIR_FEATURES,
    SkipReport,
    SourceUnavailable,
    cache_root,
    encode_image,
    skip_report,
    undecoded,
)
from vlm.data.easy_vqa import (
    EASY_VQA_COLORS,
    EASY_VQA_SHAPES,
    easy_vqa_attributes,
    easy_vqa_caption,
    easy_vqa_type,
    load_easy_vqa_rows,
)
from vlm.data.fashion_mnist import FASHION_MNIST_CLASSES, FASHION_MNIST_PHRASES, FASHION_MNIST_TEMPLATES
from vlm.data.files import from_folder, from_hf_dataset, from_jsonl
from vlm.data.named import BadRow, DataError, DataSpec, Rows, open_data
from vlm.data.sources import SOURCES, TrainEval, build_mixture, mix, split

__all__ = [
    "EASY_VQA_COLORS",
    "EASY_VQA_SHAPES",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_PHRASES",
    "FASHION_MNIST_TEMPLATES",
    "HELD_OUT_FRACTION",
    "PAIR_FEATURES",
    "SOURCES",
    "BadRow",
    "DataError",
    "DataSpec",
    "Rows",
    "SkipReport",
    "SourceUnavailable",
    "TrainEval",
    "build_mixture",
    "cache_root",
    "easy_vqa_attributes",
    "easy_vqa_caption",
    "easy_vqa_type",
    "encode_image",
    "from_folder",
    "from_hf_dataset",
    "from_jsonl",
    "load_easy_vqa_rows",
    "mix",
    "open_data",
    "skip_report",
    "split",
    "undecoded",
]
