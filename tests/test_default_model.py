"""The shipped default model (vlm/default_model/): a regression guard on its easy-VQA accuracy, and chat."""

from __future__ import annotations

import json
import random
import re
from math import comb

import pytest

from vlm.data import load_easy_vqa_rows
from vlm.evaluate import evaluate_vqa
from vlm.model import DEFAULT_CONFIG, DEFAULT_MODEL_DIR, VLMConfig

CARD = (
    DEFAULT_MODEL_DIR / "eval.json"
)  # the shipped model's evaluation on the full test set, by question type
PER_TYPE = 80  # questions of each type in the sample: see `floor`


@pytest.fixture(scope="module")
def model(default_model):
    assert (DEFAULT_MODEL_DIR / "config.json").is_file(), "the default model ships with the package"
    return default_model


def test_it_is_the_trained_model(model) -> None:
    from vlm.lora import lora_modules

    assert lora_modules(model), "the shipped model carries its LoRA adapter"
    assert model.config.projector.pooled_token and model.tokens_per_image == 16 + 1


def test_default_config_describes_the_shipped_model() -> None:
    # DEFAULT_CONFIG is the fallback when no model ships and the tower shape bench/train_step.py measures.
    shipped = VLMConfig.from_dict(json.loads((DEFAULT_MODEL_DIR / "config.json").read_text()))
    for field in ("vision", "projector"):
        assert getattr(shipped, field).to_dict() == getattr(DEFAULT_CONFIG, field).to_dict(), field
    assert (shipped.lm_source, shipped.system_prompt) == (
        DEFAULT_CONFIG.lm_source,
        DEFAULT_CONFIG.system_prompt,
    )


def misses_allowed(n: int, accuracy: float, false_alarm: float = 1e-3) -> int:
    """The fewest misses k such that a model as accurate as `accuracy` misses more than k of n questions with
    probability <= `false_alarm` (binomial tail). `accuracy` is capped at 99.5%: a card's 100% on 9,673
    questions does not make one miss in 60 a regression."""
    q = 1 - min(accuracy, 0.995)
    tail = lambda k: sum(comb(n, i) * q**i * (1 - q) ** (n - i) for i in range(k + 1, n + 1))  # noqa: E731
    return next(k for k in range(n + 1) if tail(k) <= false_alarm)


def floor(n: int, accuracy: float) -> float:
    """Per-type floor: the card's accuracy less the binomial margin for n questions (1 false alarm in 1,000
    for a model as good as the card). With n = 80 the card's shape 96.58% gives 9 misses allowed (88.75%), and
    a model at 80% on shapes passes that bar with probability 3% (asserted below): the drop the guard is for."""
    return 1 - misses_allowed(n, accuracy) / n


def stratified(per_type: int, seed: int) -> list[dict]:
    """`per_type` easy-VQA test questions of each type (yes/no, shape, colour), a fixed random sample."""
    rows = load_easy_vqa_rows("test")
    sample = []
    for kind in ("yes/no", "shape", "color"):
        of_kind = [r for r in rows if r["question_type"] == kind]
        sample += random.Random(seed).sample(of_kind, per_type)
    return sample


def test_the_per_type_floors_catch_a_drop_to_80_percent() -> None:
    card = json.loads(CARD.read_text())["by_type"]
    assert set(card) == {"yes/no", "shape", "color"}
    for kind, accuracy in card.items():
        k = misses_allowed(PER_TYPE, accuracy)
        at_80 = sum(comb(PER_TYPE, i) * 0.2**i * 0.8 ** (PER_TYPE - i) for i in range(k + 1))
        assert at_80 < 0.05, (kind, k, at_80)  # P(a model at 80% passes this type's floor)


def test_accuracy_per_question_type_holds_what_the_card_states(model) -> None:
    card = json.loads(CARD.read_text())
    rows = stratified(PER_TYPE, seed=1)
    result = evaluate_vqa(model, rows, batch_size=120, progress=False)
    by_type = result.by_type["question_type"]
    for kind, accuracy in card["by_type"].items():
        got, n = by_type[kind]
        assert n == PER_TYPE and got >= floor(n, accuracy), (kind, result.report(), card["by_type"])


def test_capitalised_questions_hold_what_the_card_states(model) -> None:
    """easy-VQA's questions are lower case; people start theirs with a capital, and a model can read the two
    differently (one answered "What color is the shape?" with a shape 22 times in 342). The same floors, on
    the same kind of sample capitalised, against the card's figures for `vlm eval --capitalise 1`."""
    card = json.loads(CARD.read_text())["capitalised"]
    rows = [
        {**row, "question": row["question"][:1].upper() + row["question"][1:]}
        for row in stratified(PER_TYPE, 2)
    ]
    result = evaluate_vqa(model, rows, batch_size=120, progress=False)
    by_type = result.by_type["question_type"]
    for kind, accuracy in card["by_type"].items():
        got, n = by_type[kind]
        assert n == PER_TYPE and got >= floor(n, accuracy), (kind, result.report(), card["by_type"])


def test_the_readme_states_the_figures_of_eval_json() -> None:
    """The model card (README.md) quotes eval.json's figures, as written and capitalised; the test floors come
    from eval.json."""
    card, text = json.loads(CARD.read_text()), (DEFAULT_MODEL_DIR / "README.md").read_text()
    types = r"\(colour ([\d.]+)%, shape ([\d.]+)%, yes/no ([\d.]+)%\)"
    stated = re.search(r"\*\*([\d.]+)%\*\*\s+on all ([\d,]+) easy-VQA test questions " + types, text)
    assert stated, "README.md no longer states the full-test-set figures"
    capitalised = re.search(
        r"capitalised[^*]*`vlm eval [^`]*--capitalise 1[^`]*`[^*]*\*\*([\d.]+)%\*\*\s+" + types, text
    )
    assert capitalised, "README.md no longer states the capitalised figures"
    assert int(stated.group(2).replace(",", "")) == card["questions"] == card["capitalised"]["questions"]
    for found, figures in (
        (stated.groups()[:1] + stated.groups()[2:], card),
        (capitalised.groups(), card["capitalised"]),
    ):
        by_type = figures["by_type"]
        expected = [figures["accuracy"], by_type["color"], by_type["shape"], by_type["yes/no"]]
        for percent, fraction in zip(found, expected, strict=True):
            assert float(percent) == pytest.approx(100 * fraction, abs=0.005)


def test_it_still_chats_about_text(model) -> None:
    assert "Paris" in model.ask(None, "What is the capital of France?", max_new_tokens=20)


# -- the skills of the generated scenes and Sort-of-CLEVR (issue 15) ------------------------------------------

SKILL_SAMPLE = 20  # the first questions of each skill's test set


def card_skills() -> list:
    from vlm.skills import SkillScore

    return [SkillScore(**s) for s in json.loads(CARD.read_text())["skills"]["skills"]]


def test_the_readme_shows_the_skill_table_of_eval_json() -> None:
    from vlm.skills import SKILLS, skill_table

    scores = card_skills()
    assert [s.skill for s in scores] == [s.name for s in SKILLS], (
        "eval.json measures every skill of the suite"
    )
    assert skill_table(scores) in (DEFAULT_MODEL_DIR / "README.md").read_text()


def test_the_question_skills_hold_what_the_card_states(model) -> None:
    """All question skills pooled (easy-VQA has its own guard above): SKILL_SAMPLE questions of each, against
    the card's mean accuracy over them less the binomial margin (the pooled misses are a sum of per-skill
    binomials, whose variance is at most that of one binomial at the mean: the floor is conservative)."""
    from vlm.skills import SKILLS, evaluate_skills, skill_test_sets

    card = {s.skill: s for s in card_skills()}
    asked = tuple(s for s in SKILLS if s.caption_prompt is None and s.data != "easy-vqa")
    sets = skill_test_sets(SKILL_SAMPLE, asked)
    scores = evaluate_skills(model, sets, batch_size=100, progress=False, guess_rows=None)  # the model's part
    expected = sum(card[s.name].score for s in asked) / len(asked)
    n = SKILL_SAMPLE * len(asked)
    got = sum(s.score * s.questions for s in scores) / n
    table = {s.skill: (round(s.score, 2), round(card[s.skill].score, 2)) for s in scores}
    assert got >= floor(n, expected), (got, expected, table)
