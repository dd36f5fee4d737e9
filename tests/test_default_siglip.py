"""The shipped SigLIP dual encoder (vlm/default_siglip/): loads by default, and a regression guard on the
easy-VQA shape and colour figures its card states."""

from __future__ import annotations

import re

import pytest

from vlm import cli
from vlm.data import EASY_VQA_COLORS, EASY_VQA_SHAPES, SOURCES
from vlm.siglip_eval import easy_vqa_probe
from vlm.zeroshot import DEFAULT_SIGLIP_DIR, load_dual_encoder

EXAMPLES = sorted((DEFAULT_SIGLIP_DIR.parents[1] / "demo" / "examples").glob("easyvqa_*.png"))


def card_figures() -> dict[str, float]:
    """The easy-VQA shape and colour accuracies the model card (vlm/default_siglip/README.md) states in its
    evaluation table: its rows "| easy-VQA shape, ... | 0.983 | ..." and "| easy-VQA colour, ... | 1.000 | ..."."""
    figures = {}
    for line in (DEFAULT_SIGLIP_DIR / "README.md").read_text().splitlines():
        match = re.match(r"\|\s*easy-VQA (shape|colour)\b[^|]*\|\s*([\d.]+)\s*\|", line)
        if match:
            figures["color" if match[1] == "colour" else "shape"] = float(match[2])
    assert figures.keys() == {"shape", "color"}, f"the card's table no longer states both: {figures}"
    return figures


@pytest.fixture(scope="module")
def dual():
    assert (DEFAULT_SIGLIP_DIR / "config.json").is_file(), "the dual encoder ships with the package"
    return load_dual_encoder(None)


def test_shape_and_colour_zero_shot_hold_what_the_card_states(dual, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("VLM_CACHE", str(tmp_path))  # the built test images stay out of ~/.cache
    model, tokenizer = dual
    data = SOURCES["easy-vqa"](split="test", size=64, limit=300).filter(
        lambda r: bool(r["shape"] and r["color"])
    )
    result = easy_vqa_probe(model, tokenizer, data)
    card = card_figures()
    for key in ("shape", "color"):
        assert result[f"easy_vqa_{key}"] >= card[key] - 0.02, (key, result, card)


def test_vlm_zeroshot_uses_it_when_no_model_is_named(capsys) -> None:
    assert EXAMPLES
    for path in EXAMPLES:  # easyvqa_<id>_<colour>_<shape>.png
        colour, shape = path.stem.split("_")[2:]
        labels = [f"a {c} {s}" for c in EASY_VQA_COLORS for s in EASY_VQA_SHAPES]
        # Prompted as its training captions read ("a blue circle"); "a photo of ..." is not how they read.
        assert cli.main(["zeroshot", str(path), "--labels", ",".join(labels), "--template", "{}"]) == 0
        best = capsys.readouterr().out.splitlines()[1].rsplit(maxsplit=1)[0]
        assert best == f"a {colour} {shape}", path.name


def test_a_template_without_a_slot_is_refused(capsys) -> None:
    assert cli.main(["zeroshot", str(EXAMPLES[0]), "--labels", "a circle", "--template", "a photo"]) == 2
    assert "needs {}" in capsys.readouterr().err
