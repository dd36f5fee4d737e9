"""`vlm.data`: the readers of your own data (caption pairs, VQA rows) on small local fixtures with
deliberately bad rows, caching, splitting and mixing. Nothing touches the network; the packaged sources are
tested in test_data_sources.py."""

import io
import json
import logging
import os
from collections import Counter
from pathlib import Path

import datasets
import pytest
from PIL import Image

from vlm.data import (
    PAIR_FEATURES,
    SkipReport,
    encode_image,
    from_folder,
    from_hf_dataset,
    from_jsonl,
    mix,
    skip_report,
    split,
)

datasets.disable_progress_bars()


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own empty cache folder, so nothing is read from (or left in) ~/.cache."""
    root = tmp_path / "vlm-cache"
    monkeypatch.setenv("VLM_CACHE", str(root))
    return root / "data"


def _png(color: tuple[int, int, int], size: tuple[int, int] = (24, 16), mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).convert(mode).save(buffer, format="PNG")
    return buffer.getvalue()


def _jpeg(color: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (20, 20), color).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _rows(dataset: datasets.Dataset) -> list[tuple[tuple[int, int, int], str]]:
    """(top-left pixel, text) of every row: the images here are solid colours, so this identifies them."""
    return [(row["image"].getpixel((0, 0)), row["text"]) for row in dataset]


@pytest.fixture
def pairs_dir(tmp_path: Path) -> Path:
    """A folder of images and a JSONL with 7 good rows (9 pairs) and 7 bad ones, one of each kind."""
    folder = tmp_path / "pairs"
    (folder / "img").mkdir(parents=True)
    (folder / "img" / "red.png").write_bytes(_png((255, 0, 0)))
    (folder / "img" / "dark.jpg").write_bytes(_jpeg((64, 64, 64)))  # a grey survives JPEG exactly
    (folder / "img" / "blue.png").write_bytes(_png((0, 0, 255), mode="P"))  # a palette image -> RGB
    (folder / "img" / "grey.png").write_bytes(_png((128, 128, 128), mode="L"))
    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(folder / "img" / "clear.png")  # fully transparent
    (folder / "img" / "truncated.png").write_bytes(_png((1, 2, 3), size=(64, 64))[:60])
    outside = tmp_path / "elsewhere.png"
    outside.write_bytes(_png((255, 255, 0)))
    lines = [
        {"image": "img/red.png", "text": "a red square"},
        {"image": "img/dark.jpg", "text": ["a dark square", "  dark  "]},  # two captions, one to clean
        {"image": "img/blue.png", "text": "a blue square"},
        {"image": "img/grey.png", "text": ["", "a grey square", "   "]},  # blank captions are dropped
        {"image": "img/clear.png", "text": "a square", "extra": 1},
        {"image": str(outside), "text": ["a yellow square", "yellow"]},  # an absolute path
        {"image": "img/red.png", "text": "red again"},
        # bad rows
        {"image": "img/missing.png", "text": "nothing here"},
        {"image": "img/truncated.png", "text": "cut short"},
        {"image": "img/red.png", "text": "   "},
        {"image": "img/red.png", "text": []},
        {"image": "img/red.png"},
    ]
    text = "\n".join(json.dumps(line) for line in lines)
    text += '\n{"image": "img/red.png", "text": "no closing brace"\n\n["not", "an object"]\n'
    (folder / "pairs.jsonl").write_text(text)
    return folder


# ---------------------------------------------------------------------------------------------------------
# Generic loaders


def test_from_jsonl_counts_and_skips_bad_rows(pairs_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="vlm.data"):
        dataset = from_jsonl(pairs_dir / "pairs.jsonl")
    report = skip_report(dataset)
    assert report is not None
    assert report.total == 14
    assert dict(report.reasons) == {
        "missing file": 1,
        "unreadable image": 1,
        "empty caption": 2,
        "missing key": 1,
        "malformed line": 2,
    }
    assert report.kept == 7
    assert report.summary() == (
        "pairs: skipped 7 of 14 rows: 2 empty caption, 2 malformed line, 1 missing file, 1 missing key, "
        "1 unreadable image"
    )
    assert report.summary() in caplog.text  # logged once, as one line
    assert any("line 8" in e and "missing.png" in e for e in report.examples["missing file"])
    assert any("truncated" in e for e in report.examples["unreadable image"])

    assert dataset.features == PAIR_FEATURES
    assert _rows(dataset) == [
        ((255, 0, 0), "a red square"),
        ((64, 64, 64), "a dark square"),
        ((64, 64, 64), "dark"),
        ((0, 0, 255), "a blue square"),
        ((128, 128, 128), "a grey square"),
        ((255, 255, 255), "a square"),  # transparent black composited onto white
        ((255, 255, 0), "a yellow square"),
        ((255, 255, 0), "yellow"),
        ((255, 0, 0), "red again"),
    ]
    assert {row["image"].mode for row in dataset} == {"RGB"}
    assert set(dataset["source"]) == {"pairs"}


def test_from_jsonl_resizes_and_picks_captions(pairs_dir: Path) -> None:
    dataset = from_jsonl(pairs_dir / "pairs.jsonl", size=8, captions="first", source="mine")
    assert {row["image"].size for row in dataset} == {(8, 8)}
    assert len(dataset) == 7  # one pair per good row
    assert set(dataset["source"]) == {"mine"}
    once = from_jsonl(pairs_dir / "pairs.jsonl", captions="random", seed=3)["text"]
    assert once == from_jsonl(pairs_dir / "pairs.jsonl", captions="random", seed=3)["text"]
    assert len(once) == 7 and "a grey square" in once


def test_from_jsonl_custom_keys(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(_png((9, 9, 9)))
    (tmp_path / "data.jsonl").write_text(json.dumps({"path": "a.png", "caption": "dark"}) + "\n")
    dataset = from_jsonl(tmp_path / "data.jsonl", image_key="path", text_key="caption")
    assert _rows(dataset) == [((9, 9, 9), "dark")]


def test_encode_image_keeps_plain_originals_and_converts_the_rest() -> None:
    jpeg = _jpeg((0, 200, 0))
    assert encode_image(jpeg) == jpeg  # re-encoding a JPEG as PNG would only make it bigger
    palette = _png((0, 0, 255), mode="P")
    assert Image.open(io.BytesIO(encode_image(palette))).mode == "RGB"
    assert Image.open(io.BytesIO(encode_image(jpeg, size=5))).size == (5, 5)
    padded = Image.open(io.BytesIO(encode_image(_png((0, 0, 0), size=(40, 20)), size=10, pad=True)))
    assert padded.getpixel((5, 0)) == (255, 255, 255) and padded.getpixel((5, 5)) == (0, 0, 0)


def test_parallel_build_matches_serial(pairs_dir: Path) -> None:
    serial = from_jsonl(pairs_dir / "pairs.jsonl", num_proc=1)
    parallel = from_jsonl(pairs_dir / "pairs.jsonl", num_proc=2)
    assert _rows(parallel) == _rows(serial)  # input order, whatever worker made each row
    assert skip_report(parallel) == skip_report(serial)


def test_cache_reuses_and_invalidates(pairs_dir: Path, _cache: Path) -> None:
    first = from_jsonl(pairs_dir / "pairs.jsonl", size=8, cache=True)
    written = sorted(_cache.iterdir())
    assert first.cache_files and all(f["filename"].startswith(str(_cache)) for f in first.cache_files)
    again = from_jsonl(pairs_dir / "pairs.jsonl", size=8, cache=True)
    assert sorted(_cache.iterdir()) == written  # loaded: nothing built, nothing half-written left over
    assert again.cache_files == first.cache_files
    assert _rows(again) == _rows(first)
    assert skip_report(again) == skip_report(first)  # the report survives the cache
    # An edited image (same caption file) is a different dataset.
    (pairs_dir / "img" / "red.png").write_bytes(_png((200, 0, 0)))
    os.utime(pairs_dir / "img" / "red.png", ns=(1, 1))
    edited = from_jsonl(pairs_dir / "pairs.jsonl", size=8, cache=True)
    assert edited[0]["image"].getpixel((0, 0)) == (200, 0, 0)
    assert edited.cache_files[0] != first.cache_files[0]


def test_from_folder_metadata_jsonl(pairs_dir: Path) -> None:
    lines = [
        {"file_name": "img/red.png", "text": "red"},
        {"file_name": "img/nope.png", "text": "missing"},
        {"file_name": "img/dark.jpg", "text": ""},
    ]
    (pairs_dir / "metadata.jsonl").write_text("\n".join(map(json.dumps, lines)))
    dataset = from_folder(pairs_dir)
    assert _rows(dataset) == [((255, 0, 0), "red")]
    assert dict(skip_report(dataset).reasons) == {"missing file": 1, "empty caption": 1}
    assert set(dataset["source"]) == {"pairs"}


def test_from_folder_metadata_csv(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(_png((1, 1, 1)))
    (tmp_path / "metadata.csv").write_text('file_name,caption\na.png,"one, with a comma"\nb.png,gone\n')
    dataset = from_folder(tmp_path, text_key="caption")
    assert _rows(dataset) == [((1, 1, 1), "one, with a comma")]
    assert skip_report(dataset).examples["missing file"] == [f"metadata.csv line 3: {tmp_path / 'b.png'}"]


def test_from_folder_sidecar_captions(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.png").write_bytes(_png((1, 2, 3)))
    (tmp_path / "a.txt").write_text("first image\n")
    (tmp_path / "sub" / "b.jpg").write_bytes(_jpeg((0, 0, 0)))  # no caption file
    (tmp_path / ".hidden.png").write_bytes(_png((0, 0, 0)))
    dataset = from_folder(tmp_path)
    assert dataset["text"] == ["first image"]
    assert dict(skip_report(dataset).reasons) == {"empty caption": 1}
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no metadata"):
        from_folder(tmp_path / "empty")


def _hf_fixture() -> datasets.Dataset:
    """A local dataset with the usual hub layout but unusual names: an Image column and a list of captions."""
    return datasets.Dataset.from_dict(
        {
            "img": [
                {"bytes": _png((255, 0, 0)), "path": None},
                {"bytes": _png((0, 255, 0), mode="RGBA"), "path": None},
                {"bytes": b"not an image", "path": None},
                {"bytes": _png((0, 0, 255)), "path": None},
                None,
            ],
            "captions": [["red", "a red thing"], ["green"], ["broken"], [], ["no image"]],
            "other": [1, 2, 3, 4, 5],
        },
        features=datasets.Features(
            {
                "img": datasets.Image(),
                "captions": datasets.List(datasets.Value("string")),
                "other": datasets.Value("int32"),
            }
        ),
    )


def test_from_hf_dataset_custom_columns_and_caption_lists(tmp_path: Path) -> None:
    local = _hf_fixture()
    dataset = from_hf_dataset(local, image_column="img", text_column="captions", size=4, source="hub-like")
    assert _rows(dataset) == [((255, 0, 0), "red"), ((255, 0, 0), "a red thing"), ((0, 255, 0), "green")]
    assert dataset.column_names == ["image", "text", "source"]
    assert {row["image"].size for row in dataset} == {(4, 4)}
    report = skip_report(dataset)
    assert (report.total, dict(report.reasons)) == (
        5,
        {"unreadable image": 1, "empty caption": 1, "missing key": 1},
    )
    assert from_hf_dataset(local, "img", "captions", captions="first")["text"] == ["red", "green"]

    # The same from a save_to_disk folder, a DatasetDict and a stream.
    local.save_to_disk(str(tmp_path / "saved"))
    assert from_hf_dataset(tmp_path / "saved", "img", "captions")["text"] == ["red", "a red thing", "green"]
    splits = datasets.DatasetDict({"train": local.select([3]), "validation": local})
    assert from_hf_dataset(splits, "img", "captions", split="validation")["text"] == dataset["text"]
    streamed = from_hf_dataset(local.to_iterable_dataset(), "img", "captions", limit=2)
    assert streamed["text"] == ["red", "a red thing", "green"]

    with pytest.raises(KeyError, match="'caption'"):
        from_hf_dataset(local, "img", "caption")


def test_from_hf_dataset_with_path_column(tmp_path: Path) -> None:
    (tmp_path / "x.png").write_bytes(_png((5, 6, 7)))
    local = datasets.Dataset.from_dict({"image": ["x.png", "y.png"], "text": ["there", "not there"]})
    dataset = from_hf_dataset(local, image_root=tmp_path)
    assert _rows(dataset) == [((5, 6, 7), "there")]
    assert dict(skip_report(dataset).reasons) == {"missing file": 1}


# ---------------------------------------------------------------------------------------------------------
# Splitting and mixing


def _coloured(n: int, captions_per_image: int = 1, source: str = "toy") -> datasets.Dataset:
    images, texts = [], []
    for i in range(n):
        for j in range(captions_per_image):
            images.append({"bytes": _png((i, 0, 0), size=(4, 4)), "path": None})
            texts.append(f"image {i} caption {j}")
    return datasets.Dataset.from_dict(
        {"image": images, "text": texts, "source": [source] * len(texts)}, features=PAIR_FEATURES
    )


def test_split_holds_out_whole_images_deterministically() -> None:
    dataset = _coloured(40, captions_per_image=3)
    train, held_out = split(dataset, eval_fraction=0.25, seed=1)
    train_images = {row[0] for row in _rows(train)}
    eval_images = {row[0] for row in _rows(held_out)}
    assert not train_images & eval_images
    assert len(eval_images) == 10 and len(train_images) == 30  # exactly a quarter of the distinct images
    assert len(train) + len(held_out) == len(dataset) and len(held_out) == 30
    assert split(dataset, 0.25, seed=1).eval["text"] == held_out["text"]  # deterministic
    assert set(split(dataset.shuffle(seed=5), 0.25, seed=1).eval["text"]) == set(held_out["text"])
    assert set(split(dataset, 0.25, seed=2).eval["text"]) != set(held_out["text"])
    assert train["text"] == sorted(train["text"], key=dataset["text"].index)  # original order kept
    assert len(split(_coloured(3), 0.01).eval) == 1  # a requested split is never empty...
    assert len(split(_coloured(3), 0.99).train) == 1  # ...on either side
    with pytest.raises(ValueError):
        split(dataset, 1.5)


def test_mix_concatenates_or_weights() -> None:
    big, small = _coloured(30, source="big"), _coloured(3, source="small")
    mixed = mix([big, small], seed=0)
    assert len(mixed) == 33 and sorted(mixed["source"]) == ["big"] * 30 + ["small"] * 3
    assert mixed["text"] == mix([big, small], seed=0)["text"] != mix([big, small], seed=1)["text"]
    weighted = mix([big, small], weights=[1, 1], num_rows=20)
    assert sorted(weighted["source"]) == ["big"] * 10 + ["small"] * 10
    small_texts = [t for t, s in zip(weighted["text"], weighted["source"], strict=True) if s == "small"]
    assert sorted(Counter(small_texts).values()) == [3, 3, 4]  # each row repeated, none left out
    labelled = big.add_column("label", [0] * 30)
    assert mix([labelled, small]).column_names == ["image", "text", "source"]
    with pytest.raises(ValueError):
        mix([big, small], weights=[1])


def test_skip_report_summary() -> None:
    report = SkipReport("x")
    report.total = 7  # rows kept; `add` counts each skipped row into the total as well
    for reason in ["a", "b", "a"]:
        report.add(reason, f"detail {reason}")
    assert report.summary() == "x: skipped 3 of 10 rows: 2 a, 1 b"
