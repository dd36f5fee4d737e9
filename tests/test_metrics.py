"""VQA normalisation and accuracy against hand-computed VQAv2 examples; BLEU-4 and CIDEr-D on tiny sets."""

from __future__ import annotations

import math
import random

import pytest

from vlm.metrics import (
    breakdown,
    caption_scores,
    caption_tokens,
    exact_match,
    leave_one_out_soft_score,
    normalize_answer,
    process_punctuation,
    soft_score,
    vqa_accuracy,
)


@pytest.mark.parametrize(
    "raw, normalised",
    [
        ("Yes", "yes"),
        ("yes.", "yes"),  # a final period goes
        ("yes!", "yes"),
        ("  Yes \n", "yes"),  # whitespace, newlines
        ("red\tand blue", "red and blue"),
        ("Two", "2"),  # number words become digits
        ("none", "0"),
        ("ten dogs", "10 dogs"),
        ("A red circle", "red circle"),  # articles go
        ("an apple", "apple"),
        ("The Triangle.", "triangle"),
        ("dont", "don't"),  # contractions get their apostrophe
        ("isnt it", "isn't it"),
        ("black/white", "black white"),  # a mark inside a word becomes a space ...
        ("black / white", "black white"),  # ... and one touching a space is deleted
        ("1,000", "1000"),  # a comma inside a number is deleted ...
        ("red,blue", "red blue"),  # ... elsewhere it is a space
        ("2.5", "2.5"),  # a period before a digit stays
        ("3.", "3"),
        ("dog's", "dog's"),  # apostrophes are kept
    ],
)
def test_vqa_answer_normalisation(raw: str, normalised: str) -> None:
    assert normalize_answer(raw) == normalised


def test_the_comma_in_a_number_rule_applies_to_every_mark() -> None:
    # The official rule: with a digit,digit comma anywhere in the text, every mark is deleted, not spaced.
    assert process_punctuation("1,000 red/blue") == "1000 redblue"
    assert process_punctuation("red/blue") == "red blue"


def official_accuracy(prediction: str, answers: list[str]) -> float:
    """A literal port of vqaEval.py's loop: leave each annotator out in turn, min(matches among the rest / 3, 1)."""
    predicted = normalize_answer(prediction)
    answers = [normalize_answer(a) for a in answers]
    accs = []
    for left_out in range(len(answers)):
        others = answers[:left_out] + answers[left_out + 1 :]
        accs.append(min(1.0, sum(a == predicted for a in others) / 3))
    return sum(accs) / len(accs)


@pytest.mark.parametrize(
    "humans_agreeing, expected",
    [
        # k of 10 said it. Leaving out one of the k leaves k-1 matches, one of the other 10-k leaves k:
        (0, 0.0),  # nobody: 0
        (1, 0.3),  # (1 * 0/3 + 9 * 1/3) / 10 = 3/10
        (2, 0.6),  # (2 * 1/3 + 8 * 2/3) / 10 = (2/3 + 16/3) / 10 = 6/10
        (3, 0.9),  # (3 * 2/3 + 7 * 1) / 10 = (2 + 7) / 10
        (4, 1.0),  # (4 * 1 + 6 * 1) / 10
        (10, 1.0),
    ],
)
def test_vqav2_soft_score_over_ten_annotators(humans_agreeing: int, expected: float) -> None:
    answers = ["yes"] * humans_agreeing + ["no"] * (10 - humans_agreeing)
    assert vqa_accuracy("Yes.", answers) == pytest.approx(expected, abs=1e-12)
    # min(k/3, 1) alone, the paper's formula, is the cruder number the averaging refines
    assert soft_score("yes", answers) == pytest.approx(min(humans_agreeing / 3, 1.0))


def test_leave_one_out_matches_the_official_loop() -> None:
    rng = random.Random(0)
    vocabulary = ["2", "two", "Two.", "a dog", "dog", "dogs", "yes", "no"]
    for _ in range(200):
        answers = [rng.choice(vocabulary) for _ in range(10)]
        prediction = rng.choice(vocabulary)
        ours = leave_one_out_soft_score(prediction, answers)
        assert ours == pytest.approx(official_accuracy(prediction, answers), abs=1e-12)
        assert vqa_accuracy(prediction, answers) == ours


def test_small_answer_sets() -> None:
    # one answer: normalised exact match (easy-VQA)
    assert vqa_accuracy("Circle.", ["circle"]) == 1.0
    assert vqa_accuracy("circles", ["circle"]) == 0.0
    assert vqa_accuracy("a red circle", ["red circle"]) == 1.0
    # 2-9 answers: min(count / 3, 1), no leave-one-out (it would cap unanimous answers below 1)
    assert vqa_accuracy("yes", ["yes", "no", "no"]) == pytest.approx(1 / 3)
    assert vqa_accuracy("yes", ["yes", "yes", "yes"]) == 1.0
    assert exact_match("two", ["1", "2"]) == 1.0
    with pytest.raises(ValueError, match="at least one"):
        vqa_accuracy("yes", [])


def test_breakdown_by_type() -> None:
    groups = breakdown([1.0, 0.0, 1.0, 0.5, 1.0], ["shape", "color", "shape", "color", None])
    assert groups == {"color": (0.25, 2), "shape": (1.0, 2)}
    assert groups["color"].count == 2
    with pytest.raises(ValueError):
        breakdown([1.0], [])


def test_caption_tokens_are_lower_case_ptb_like_without_punctuation() -> None:
    assert caption_tokens("A dog's toy, on the grass.") == "a dog 's toy on the grass"
    assert caption_tokens('It can\'t be "black-and-white" (3.5 m)...') == "it ca n't be black-and-white 3.5 m"


def test_bleu4_and_cider_on_hand_checkable_sets() -> None:
    refs = [
        ["a red circle on a white background"],
        ["two blue squares side by side"],
        ["a small green triangle"],
    ]
    same = caption_scores([r[0] for r in refs], refs)
    assert same.bleu4 == pytest.approx(1.0, abs=1e-6)
    # CIDEr-D of a caption identical to its only reference: cosine 1 at each of the 4 n-gram orders, times
    # 10 (every caption here has 4-grams; a 3-word one would score 7.5, its 4-gram term being 0)
    assert same.cider == pytest.approx(10.0)
    assert same.cider_per_item == pytest.approx([10.0] * 3)

    disjoint = caption_scores(["zebra zebra zebra zebra", "moon moon moon moon", "cup cup cup cup"], refs)
    assert disjoint.bleu4 == pytest.approx(0.0, abs=1e-6)
    assert disjoint.cider == pytest.approx(0.0)

    partial = caption_scores(["a red circle", "two red squares side by side", "a small green triangle"], refs)
    assert 0.0 < partial.cider < same.cider
    assert partial.cider_per_item[2] == pytest.approx(10.0)


def test_bleu4_brevity_penalty() -> None:
    # A candidate that is the first 5 of its reference's 8 words: every n-gram precision is 1, so BLEU-4 is
    # the brevity penalty alone, exp(1 - 8/5).
    scores = caption_scores(["a b c d e"], [["a b c d e f g h"]])
    assert scores.bleu4 == pytest.approx(math.exp(1 - 8 / 5), rel=1e-6)
    # CIDEr-D of a one-item set is 0 by construction: every n-gram is in every "document" (idf = 0)
    assert scores.cider == 0.0


def test_caption_scores_reject_bad_input() -> None:
    with pytest.raises(ValueError, match="reference"):
        caption_scores(["a cat"], [[]])
    with pytest.raises(ValueError, match="predictions"):
        caption_scores(["a cat"], [])
