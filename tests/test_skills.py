"""The skill table (`vlm.skills`, `vlm eval --suite skills`): each skill its own held-out test set, each
scored by its metric, on a tiny random VLM."""

from __future__ import annotations

import pytest
from test_evaluate import one_by_one
from test_model import build, tiny_lm
from transformers import AutoTokenizer

from vlm.cli import main
from vlm.conversation import user
from vlm.data.named import DataError, DataSpec, open_data
from vlm.skills import (
    SKILLS,
    Skill,
    SkillScore,
    blind_guess,
    evaluate_skills,
    guess_train_set,
    skill_rows,
    skill_table,
    skill_test_sets,
)


@pytest.fixture(scope="module")
def vlm(smollm2_folder):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_folder)
    return build((tiny_lm(tokenizer), tokenizer))


def test_each_skill_has_its_own_test_set_of_that_skill() -> None:
    sets = skill_test_sets(limit=5)
    assert [skill for skill, _ in sets] == list(SKILLS)
    questions = set()
    for skill, rows in sets:
        assert len(rows) == 5, skill.name
        if skill.data != "easy-vqa":  # the rows are of the subset's skill, or of its templates
            asked = set(skill.subset.split(","))
            kinds = [{row["question_type"], row.get("answer_type")} for row in rows]
            assert all(kind & asked for kind in kinds), (skill.name, kinds)
        questions |= {(skill.name, row["question"]) for row in rows}
    reading = dict(sets)[next(s for s in SKILLS if s.name == "reading")]
    assert all(row["answer_type"] != "reading-exists" for row in reading)  # the bar's questions: the word
    captions = dict(sets)[next(s for s in SKILLS if s.name == "detail")]
    assert all(row["answers"][0].startswith("There ") for row in captions)  # whole descriptions
    # The same limit gives the same questions: a card's figures can be measured again.
    again = skill_test_sets(limit=5, skills=SKILLS[1:2])[0][1]
    assert [r["question"] for r in again] == [r["question"] for r in sets[1][1]]


def test_scene_skills_are_asked_once_a_scene_and_counting_from_one_to_eight() -> None:
    """200 questions of a scene skill are 200 scenes, not 20 drained ones; counting's bar is for counts of
    1 to 8, so its row keeps those answers, the first of them in seed order, the same for a longer limit."""
    scene_skills = [s for s in SKILLS if s.data == "scenes" and s.caption_prompt is None]
    for skill, rows in skill_test_sets(limit=12, skills=tuple(scene_skills)):
        assert len({row["image"] for row in rows}) == 12, skill.name  # each a PNG of its own
    count = next(s for s in SKILLS if s.name.startswith("count"))
    rows = skill_rows(count, "test", 30)
    assert len(rows) == 30 and {r["answers"][0] for r in rows} <= {str(n) for n in range(1, 9)}
    assert len({r["answers"][0] for r in rows}) >= 4  # not only ones and twos
    every = open_data(DataSpec("vqa", "scenes", count.subset, "test", limit=60)).eval_rows()
    kept = [r["question"] for r in every if r["answers"][0] != "0"]
    assert [r["question"] for r in rows] == kept[:30]
    assert [r["question"] for r in skill_rows(count, "test", 40)][:30] == kept[:30]
    # the blind guess learns from the same kind of rows
    assert {r["answers"][0] for r in guess_train_set(count, 50)} <= count.answers
    rare = Skill("rare", "sort-of-clevr", "non-relational", answers=frozenset({"zebra"}))
    with pytest.raises(DataError, match="rare: 0 of the first 40 test questions have its answers, not 5"):
        skill_rows(rare, "test", 5)


def test_each_set_is_scored_with_its_metric(vlm) -> None:
    vqa, caption = (
        Skill("count", "scenes", "count"),
        Skill("caption", "scenes", "caption", caption_prompt="Say."),
    )
    sets = skill_test_sets(limit=4, skills=(vqa, caption))
    rows = sets[0][1]
    said = one_by_one(vlm, rows)
    for i, row in enumerate(rows):  # the model's own answer is right for the first three
        row["answers"] = [said[i]] if i < 3 else ["no such answer"]
    pictures = [row["image"] for row in sets[1][1]]
    own = [vlm.generate([[user("Say.", [p])]], max_new_tokens=8)[0] for p in pictures]
    for row, text in zip(sets[1][1], own, strict=True):
        row["answers"] = [text]
    caption = Skill("caption", "scenes", "caption", caption_prompt="Say.", max_new_tokens=8)
    scores = evaluate_skills(
        vlm, [sets[0], (caption, sets[1][1])], batch_size=3, progress=False, guess_rows=40
    )
    assert [(s.skill, s.questions, s.metric) for s in scores] == [
        ("count", 4, "accuracy"),
        ("caption", 4, "cider"),
    ]
    assert scores[0].score == pytest.approx(0.75)
    assert scores[1].score > 0  # every caption is its own reference
    # beside the accuracy, the blind guess on the same rows from 40 training questions; none for captions
    assert scores[0].guess == blind_guess(guess_train_set(vqa, 40), rows)
    assert scores[1].guess is None


def test_a_blind_guess_answers_each_form_with_its_commonest_training_answer() -> None:
    def row(question: str, answer: str, form: str | None = None) -> dict:
        return {"question": question, "answers": [answer]} | ({"answer_type": form} if form else {})

    train = [
        row("How many stars?", "2", "count"),
        row("How many hearts?", "2", "count"),
        row("How many suns?", "2", "count"),
        row("How many cats?", "3", "count"),
        row("Is there a star?", "Yes.", "exist"),  # answers are normalised as the scorer does
        row("Is there a dog?", "no", "exist"),
        row("Is there a cat?", "yes", "exist"),
        row("what color is the shape?", "red"),  # no template: the question itself is the form
        row("what color is the shape?", "red"),
        row("what color is the shape?", "blue"),
    ]
    test = [
        row("How many birds?", "2", "count"),  # "2": right
        row("How many cows?", "5", "count"),  # "2": wrong
        row("Is there a bird?", "yes", "exist"),  # "yes": right
        row("What color is the shape?", "red"),  # the question's form, whatever its case: right
        row("Which bar is highest?", "2", "chart"),  # a form never trained on: the commonest answer, "2"
    ]
    assert blind_guess(train, test) == pytest.approx(4 / 5)
    assert blind_guess(train, [row("How many cows?", "3", "count")]) == 0.0
    with pytest.raises(ValueError, match="needs training and test"):
        blind_guess([], test)


def test_the_table_states_scores_and_bars() -> None:
    scores = [
        SkillScore("count", 200, "accuracy", 0.915, 0.90, 1.0),
        SkillScore("reading", 200, "accuracy", 0.5, 0.90, 1.0),
        SkillScore("compare", 1_200, "accuracy", 0.25, None, 1.0),
        SkillScore("caption", 200, "cider", 1.234, None, 1.0),
    ]
    lines = skill_table(scores).splitlines()
    assert lines[0] == "| skill | test questions | score | bar |"
    assert lines[2:] == [
        "| count | 200 | 91.5% | 90% (met) |",
        "| reading | 200 | 50.0% | 90% (missed by 40.0 points) |",
        "| compare | 1,200 | 25.0% |  |",
        "| caption | 200 | CIDEr-D 1.23 |  |",
    ]
    # with blind guesses (eval.json files written before them have none: the table above)
    guessed = [SkillScore(**{**s.__dict__, "guess": 0.5 if s.metric == "accuracy" else None}) for s in scores]
    lines = skill_table(guessed).splitlines()
    assert lines[:2] == ["| skill | test questions | score | blind guess | bar |", "|---|---|---|---|---|"]
    assert lines[2] == "| count | 200 | 91.5% | 50.0% | 90% (met) |"
    assert lines[5] == "| caption | 200 | CIDEr-D 1.23 |  |  |"


def test_vlm_eval_suite_refuses_options_it_would_ignore(tmp_path, capsys) -> None:
    assert main(["eval", "--suite", "skills", "--data", "scenes"]) == 2
    assert "--suite runs its own test sets; drop --data" in capsys.readouterr().err
    assert main(["eval", "--suite", "skills", "--capitalise", "1"]) == 2
    assert "drop --capitalise" in capsys.readouterr().err
    assert main(["eval", "--summary", str(tmp_path / "s.json")]) == 2
    assert "--summary goes with --suite" in capsys.readouterr().err
