"""Evaluation on a tiny random VLM: the fast path gives exactly the one-by-one answers; files and metrics."""

from __future__ import annotations

import json

import pytest
from PIL import Image
from test_generation import QUESTIONS
from test_model import build, images, tiny_lm
from tiny import image_sources
from transformers import AutoTokenizer

from vlm.conversation import user
from vlm.evaluate import EvalResult, evaluate_captions, evaluate_vqa
from vlm.metrics import breakdown
from vlm.model import VisionLanguageModel


@pytest.fixture(scope="module")
def vlm(smollm2_folder) -> VisionLanguageModel:
    tokenizer = AutoTokenizer.from_pretrained(smollm2_folder)
    return build((tiny_lm(tokenizer), tokenizer))


@pytest.fixture
def rows(tmp_path) -> list[dict]:
    """11 questions about 4 images given as a path, PIL images and bytes, several per image, of varied lengths
    (so batches are padded, reordered, and share images across batch boundaries)."""
    sources = image_sources(tmp_path)
    return [
        {
            "image": image,
            "question": QUESTIONS[i % len(QUESTIONS)],
            "answers": ["circle"],
            "question_type": ["shape", "color", "yes/no"][i % 3],
        }
        for i, image in enumerate(sources)
    ]


def one_by_one(vlm: VisionLanguageModel, rows: list[dict], max_new_tokens: int = 8) -> list[str]:
    return [
        vlm.generate([[user(r["question"], [r["image"]])]], max_new_tokens=max_new_tokens)[0] for r in rows
    ]


def test_the_report_says_when_one_answer_is_given_to_most_questions() -> None:
    """A model that answers from a question's prior says one answer far more often than the data has it: the
    report names each question type's commonest prediction beside its commonest true answer, normalised as
    scored ("One." is "1")."""
    said = ["1", "One.", "1", "2", "yes", "yes"]
    truth = ["0", "0", "1", "2", "no", "yes"]
    kinds = ["count"] * 4 + ["existence"] * 2
    records = [
        {"question_type": k, "prediction": p, "answers": [t], "score": float(p == t)}
        for k, p, t in zip(kinds, said, truth, strict=True)
    ]
    by_type = {"question_type": breakdown([r["score"] for r in records], kinds)}
    result = EvalResult("vqa", {"accuracy": 0.5}, by_type, records, 1.0)
    assert result.answer_spread() == {
        "count": (("1", 0.75), ("0", 0.5)),
        "existence": (("yes", 1.0), ("no", 0.5)),
    }
    lines = result.report().splitlines()
    assert (
        "  question_type=count: 0.5000 (4); says '1' 75% of the time, the commonest answer '0' 50%" in lines
    )


def test_evaluate_vqa_scores_and_writes_predictions(vlm, rows, tmp_path) -> None:
    expected = one_by_one(vlm, rows)
    for i in range(0, len(rows), 2):  # every other row's answer is what the model says: accuracy 6/11
        rows[i]["answers"] = [expected[i].upper() + "."]  # normalisation makes them match
    for i in range(1, len(rows), 2):
        rows[i]["answers"] = ["no such answer"]
    out = tmp_path / "out" / "predictions.jsonl"
    result = evaluate_vqa(vlm, rows, batch_size=4, predictions_path=out, progress=False)
    assert result.metrics == {"accuracy": pytest.approx(6 / 11)}
    assert result.num_examples == 11
    # types cycle shape, color, yes/no; the even rows are right
    assert result.by_type["question_type"]["shape"] == (pytest.approx(2 / 4), 4)
    assert result.by_type["question_type"]["color"] == (pytest.approx(2 / 4), 4)
    assert result.by_type["question_type"]["yes/no"] == (pytest.approx(2 / 3), 3)
    summary = result.summary()
    assert summary["accuracy"] == pytest.approx(6 / 11) and summary["question_type/shape"] == 0.5
    assert "accuracy 0.5455 on 11 examples" in result.report()

    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 11
    assert records == result.predictions
    for i, (record, row) in enumerate(zip(records, rows, strict=True)):
        assert set(record) >= {"question", "answers", "prediction", "score", "correct", "question_type"}
        assert record["question"] == row["question"] and record["answers"] == row["answers"]
        assert record["prediction"] == expected[i]
        assert record["score"] == (1.0 if i % 2 == 0 else 0.0)
        assert record["correct"] is (i % 2 == 0)
        assert record["question_type"] == row["question_type"]
    assert records[0]["image"].endswith("red.png") and "image" not in records[1]  # paths only


def test_evaluate_captions(vlm, rows, tmp_path) -> None:
    pictures = [r["image"] for r in rows[:4]]
    expected = [vlm.generate([[user("Describe it.", [image])]], max_new_tokens=6)[0] for image in pictures]
    data = [
        {"image": image, "captions": [text, "a plain coloured rectangle"]}
        for image, text in zip(pictures, expected, strict=True)
    ]
    out = tmp_path / "captions.jsonl"
    result = evaluate_captions(
        vlm, data, prompt="Describe it.", max_new_tokens=6, predictions_path=out, progress=False
    )
    assert set(result.metrics) == {"bleu4", "cider"}
    assert result.metrics["bleu4"] == pytest.approx(1.0, abs=1e-6)  # each prediction is one of its references
    assert result.metrics["cider"] > 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prediction"] for r in records] == expected
    assert all(set(r) >= {"captions", "prediction", "bleu4", "cider"} for r in records)


def test_bad_rows_are_clear_errors(vlm) -> None:
    with pytest.raises(ValueError, match="row 1 lacks answers"):
        evaluate_vqa(
            vlm, [{"image": images(1)[0], "question": "q", "answers": ["a"]}, {"image": 1, "question": "q"}]
        )
    with pytest.raises(ValueError, match="non-empty list"):
        evaluate_vqa(vlm, [{"image": images(1)[0], "question": "q", "answers": "a"}])
    with pytest.raises(ValueError, match="no rows"):
        evaluate_vqa(vlm, [])


def test_pil_images_from_files_are_read_by_path(vlm, tmp_path) -> None:
    path = tmp_path / "red.png"
    images(1)[0].save(path)
    opened = Image.open(path)  # as `datasets` hands out an Image feature: it remembers its file
    result = evaluate_vqa(
        vlm, [{"image": opened, "question": "What is it?", "answers": ["x"]}], progress=False
    )
    assert result.predictions[0]["image"] == str(path)
