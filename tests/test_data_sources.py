"""The packaged offline sources of `vlm.data`, each built on a small `limit`, and their registry. Nothing
touches the network.

They need Debian/PyPI packages (see shared/DATA.md). The project's set-up installs them in CI, so there a
missing one fails; on a developer machine without them (`CI` unset) these tests skip (`needs.missing`)."""

import importlib.util
import logging
import re
from collections.abc import Callable
from pathlib import Path

import datasets
import numpy as np
import pytest
from needs import missing
from PIL import Image

from vlm.data import (
    SOURCES,
    SourceUnavailable,
    build_mixture,
    easy_vqa,
    emoji,
    fashion_mnist,
    flags,
    load_easy_vqa_rows,
    openclipart,
    skip_report,
)
from vlm.data.common import held_out

datasets.disable_progress_bars()


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing is read from (or left in) ~/.cache."""
    monkeypatch.setenv("VLM_CACHE", str(tmp_path / "vlm-cache"))


def _build(builder: Callable[..., datasets.Dataset], **kwargs: object) -> datasets.Dataset:
    """Build a packaged source; a missing package skips, except in CI where the set-up must install it."""
    try:
        return builder(cache=False, **kwargs)
    except SourceUnavailable as err:
        missing(f"{builder.__module__}: {err}")


def _check_pairs(dataset: datasets.Dataset, size: int, source: str, count: int) -> None:
    assert len(dataset) == count
    assert set(dataset["source"]) == {source}
    for row in dataset:
        assert row["image"].mode == "RGB" and row["image"].size == (size, size)
        assert row["text"] and row["text"] == row["text"].strip()
    pixels = np.stack([np.asarray(row["image"]) for row in dataset])
    assert pixels.std() > 10  # real pictures, not blank canvases


def test_emoji() -> None:
    dataset = _build(emoji.build, limit=6, size=32)
    _check_pairs(dataset, 32, "emoji", 6)
    for row in dataset:
        assert row["text"].startswith("an emoji of ") and row["group"] and row["subgroup"]
        assert row["text"] == emoji.emoji_caption(row["name"])
    assert emoji.emoji_caption("grinning face") == "an emoji of a grinning face"
    assert emoji.emoji_caption("owl") == "an emoji of an owl"
    assert emoji.emoji_caption("ballet shoes") == "an emoji of ballet shoes"
    assert emoji.emoji_caption("flag: France") == "an emoji of the flag of France"
    assert emoji.emoji_caption("woman: red hair") == "an emoji of a woman with red hair"


def test_emoji_held_out_split_keeps_skin_tone_variants_together() -> None:
    if not Path(emoji.EMOJI_TEST).is_file():
        missing("unicode-data is not installed")
    bases = sorted({emoji.strip_skin_tones(e["emoji"]) for e in emoji.read_emoji_test(emoji.EMOJI_TEST)})
    test, train = set(held_out(bases, "test", str)), set(held_out(bases, "train", str))
    assert not test & train and test | train == set(bases)
    assert 0.07 < len(test) / len(bases) < 0.13


def test_openclipart() -> None:
    dataset = _build(openclipart.build, limit=5, size=32)
    assert len(dataset) >= 4  # of 5 sampled files, at most one may fail to render or lack a title
    _check_pairs(dataset, 32, "openclipart", len(dataset))
    for row in dataset:
        assert row["text"].startswith("a clip art drawing") and row["path"].endswith(".svg")


SVG = """<?xml version="1.0"?>{doctype}
<svg xmlns="http://www.w3.org/2000/svg" xmlns:dc="http://purl.org/dc/elements/1.1/"
     xmlns:cc="http://web.resource.org/cc/" xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"
     width="40" height="20">
  <metadata><rdf:RDF><cc:Work rdf:about="">
    <dc:title>{title}</dc:title>
    <dc:subject><rdf:Bag>
      <rdf:li>hash</rdf:li><rdf:li>fruit</rdf:li><rdf:li>food</rdf:li>
    </rdf:Bag></dc:subject>
    <dc:publisher><cc:Agent><dc:title>Open Clip Art Library</dc:title></cc:Agent></dc:publisher>
  </cc:Work></rdf:RDF></metadata>
  <rect x="0" y="0" width="40" height="20" fill="{fill}"/>
</svg>"""


def test_openclipart_metadata_rendering_and_failures(tmp_path: Path) -> None:
    if importlib.util.find_spec("cairosvg") is None:
        missing("cairosvg is not installed")
    (tmp_path / "food").mkdir()
    (tmp_path / "food" / "apple.svg").write_text(SVG.format(doctype="", title="Red_Apple 01", fill="red"))
    illustrator = '<!DOCTYPE svg [<!ENTITY ns_flows "http://ns.adobe.com/Flows/1.0/">]>'
    (tmp_path / "food" / "pear.svg").write_text(SVG.format(doctype=illustrator, title="", fill="green"))
    (tmp_path / "food" / "broken.svg").write_text("<svg xmlns='http://www.w3.org/2000/svg'><rect")
    (tmp_path / "food" / "copy.svg").symlink_to("apple.svg")  # a duplicate: left out, not counted
    dataset = openclipart.build(split="all", size=16, root=tmp_path, cache=False)
    assert dataset["text"] == [
        "a clip art drawing of a red apple (fruit, food)",
        "a clip art drawing of a pear (fruit, food)",  # no title: the file name stands in
    ]
    assert dataset["title"] == ["Red_Apple 01", ""] and dataset["keywords"][0] == ["hash", "fruit", "food"]
    apple = dataset[0]["image"]
    # 40 x 20 fitted into 16 x 16: red band in the middle, white padding above and below
    assert (
        apple.size == (16, 16)
        and apple.getpixel((8, 8)) == (255, 0, 0)
        and apple.getpixel((8, 0)) == (255,) * 3
    )
    assert dict(skip_report(dataset).reasons) == {"render failed": 1}


def test_flags() -> None:
    dataset = _build(flags.build, split="all", size=24)
    assert 240 <= len(dataset) <= 262
    _check_pairs(dataset, 24, "flags", len(dataset))
    captions = dict(zip(dataset["code"], dataset["text"], strict=True))
    assert captions["fr"] == "the flag of France"
    assert captions["us"] == "the flag of the United States"
    assert captions["kr"] == "the flag of South Korea"
    assert all(re.fullmatch(r"the flag of \S.*", t) for t in captions.values())
    assert skip_report(dataset).reasons == {"no name": 262 - len(dataset)}


def test_fashion_mnist_labels_match_captions() -> None:
    dataset = _build(fashion_mnist.build, split="test", limit=40, size=32)
    _check_pairs(dataset, 32, "fashion_mnist", 40)
    names = dataset.features["label"].names
    assert names == list(fashion_mnist.FASHION_MNIST_CLASSES)
    for row in dataset:
        phrase = fashion_mnist.FASHION_MNIST_PHRASES[row["label"]]
        assert row["text"] in {t.format(phrase) for t in fashion_mnist.FASHION_MNIST_TEMPLATES}
    assert len(set(dataset["label"])) >= 5  # the sample spreads over the classes
    # The images are the dataset's own: an upscaled 28 x 28 grey picture stored as RGB.
    first = np.asarray(dataset[0]["image"])
    assert (first[..., 0] == first[..., 1]).all()


def test_easy_vqa_captions_agree_with_answers() -> None:
    dataset = _build(easy_vqa.build, split="test", limit=30, size=64)
    _check_pairs(dataset, 64, "easy-vqa", len(dataset))
    assert len(dataset) >= 28
    import easy_vqa as package

    questions, answers, image_ids = package.get_test_questions()
    by_image: dict[int, list[tuple[str, str]]] = {}
    for q, a, i in zip(questions, answers, image_ids, strict=True):
        by_image.setdefault(i, []).append((q, a))
    # Which easy-VQA image each row is: its pixels (stored 64 x 64, as the originals) say.
    ids = {
        np.asarray(Image.open(p).convert("RGB")).tobytes(): i
        for i, p in package.get_test_image_paths().items()
    }
    for row in dataset.select_columns(["text", "shape", "color"]):
        assert row["text"] == easy_vqa.easy_vqa_caption(row["shape"], row["color"])
    checked = 0
    for row in dataset:
        image_id = ids[np.asarray(row["image"]).tobytes()]
        for question, answer in by_image[image_id]:
            if question.startswith("what"):  # every shape or colour answer is in the caption
                assert answer in row["text"].split(), (question, answer, row["text"])
                checked += 1
    assert checked >= 30


def test_easy_vqa_attributes_deduce_and_rule_out() -> None:
    questions = [
        "what color is the circle?",  # 1: both from one answer
        "is there a triangle?",  # 2: the shape from yes...
        "is there not a red shape?",  # ...and red ruled out
        "is there not a circle?",  # 3: two shapes ruled out leave the third
        "does the image not contain a triangle?",
    ]
    answers = ["teal", "yes", "yes", "yes", "yes"]
    found = easy_vqa.easy_vqa_attributes(questions, answers, [1, 2, 2, 3, 3])
    assert found == {1: ("circle", "teal"), 2: ("triangle", ""), 3: ("rectangle", "")}
    assert easy_vqa.easy_vqa_caption("triangle", "") == "a triangle"
    assert easy_vqa.easy_vqa_caption("", "red") == "a red shape"
    with pytest.raises(ValueError, match="contradict"):
        easy_vqa.easy_vqa_attributes(["is there a circle?", "is there a circle?"], ["yes", "no"], [7, 7])


def test_build_mixture_skips_missing_sources(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def missing(**_: object) -> datasets.Dataset:
        raise SourceUnavailable("/nowhere not found; install it with: apt-get install nothing")

    monkeypatch.setitem(SOURCES, "absent", missing)
    available = [n for n in ("flags", "easy-vqa") if _available(n)]
    if not available:
        missing("neither flags nor easy-VQA is installed")
    with caplog.at_level(logging.WARNING, logger="vlm.data"):
        mixed = build_mixture([*available, "absent"], size=16, limit=3, cache=False)
    assert sorted(set(mixed["source"])) == sorted(available) and len(mixed) == 3 * len(available)
    assert "absent: skipped, not available: /nowhere not found" in caplog.text
    with pytest.raises(SourceUnavailable):
        build_mixture(["absent"])
    with pytest.raises(KeyError):
        build_mixture(["no-such-source"])


def _available(name: str) -> bool:
    try:
        SOURCES[name](limit=0, cache=False)
        return True
    except SourceUnavailable:
        return False


def test_registry_takes_the_old_easy_vqa_name() -> None:
    assert "easy_vqa" in SOURCES and SOURCES["easy_vqa"] is SOURCES["easy-vqa"] is easy_vqa.build
    names = ["emoji", "openclipart", "flags", "fashion_mnist", "easy-vqa", "scenes"]
    assert list(SOURCES) == names  # aliases unlisted
    assert "no-such-source" not in SOURCES


def test_easy_vqa_question_rows() -> None:
    if importlib.util.find_spec("easy_vqa") is None:
        missing("the easy_vqa package is not installed")
    rows = load_easy_vqa_rows("test", limit=200, seed=0)
    assert len(rows) == 200 and rows == load_easy_vqa_rows("test", limit=200, seed=0)  # a fixed sample
    assert rows != load_easy_vqa_rows("test", limit=200, seed=1)
    assert {r["question_type"] for r in rows} == {"shape", "color", "yes/no"}
    for row in rows:
        assert len(row["answers"]) == 1
        kind = row["question_type"]
        assert (row["answers"][0] in ("yes", "no")) == (kind == "yes/no")
        assert (row["answers"][0] in ("circle", "rectangle", "triangle")) == (kind == "shape")
    assert len(load_easy_vqa_rows("test")) == 9673
