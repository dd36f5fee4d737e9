"""Image–text pairs through Hugging Face `datasets`: generic loaders (`pairs`) and packaged offline sources
(`sources`). Every loader returns a `datasets.Dataset` with columns image (RGB), text and source."""

from vlm.data.pairs import (
    PAIR_FEATURES,
    SkipReport,
    TrainEval,
    cache_root,
    from_folder,
    from_hf_dataset,
    from_jsonl,
    mix,
    skip_report,
    split,
)
from vlm.data.sources import (
    SOURCES,
    SourceUnavailable,
    build_easy_vqa,
    build_emoji,
    build_fashion_mnist,
    build_flags,
    build_mixture,
    build_openclipart,
)

__all__ = [
    "PAIR_FEATURES",
    "SOURCES",
    "SkipReport",
    "SourceUnavailable",
    "TrainEval",
    "build_easy_vqa",
    "build_emoji",
    "build_fashion_mnist",
    "build_flags",
    "build_mixture",
    "build_openclipart",
    "cache_root",
    "from_folder",
    "from_hf_dataset",
    "from_jsonl",
    "mix",
    "skip_report",
    "split",
]
