"""The skill table (`vlm.skills`, `vlm eval --suite skills`): each skill its own held-out test set, each
scored by its metric, on a tiny random VLM."""

from __future__ import annotations

import pytest
from test_evaluate import one_by_one
from test_model import build, tiny_lm
from transformers import AutoTokenizer

from vlm.cli import main
from vlm.conversation import user
from vlm.skills import SKILLS, Skill, SkillScore, evaluate_skills, skill_table, skill_test_sets


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
        if skill.data != "easy-vqa":  # scenes and Sort-of-CLEVR name the skill as the rows' question type
            assert {row["question_type"] for row in rows} == {skill.subset}, skill.name
        questions |= {(skill.name, row["question"]) for row in rows}
    captions = dict(sets)[next(s for s in SKILLS if s.name == "detail")]
    assert all(row["answers"][0].startswith("There ") for row in captions)  # whole descriptions
    # The same limit gives the same questions: a card's figures can be measured again.
    again = skill_test_sets(limit=5, skills=SKILLS[1:2])[0][1]
    assert [r["question"] for r in again] == [r["question"] for r in sets[1][1]]


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
    scores = evaluate_skills(vlm, [sets[0], (caption, sets[1][1])], batch_size=3, progress=False)
    assert [(s.skill, s.questions, s.metric) for s in scores] == [
        ("count", 4, "accuracy"),
        ("caption", 4, "cider"),
    ]
    assert scores[0].score == pytest.approx(0.75)
    assert scores[1].score > 0  # every caption is its own reference


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


def test_vlm_eval_suite_refuses_options_it_would_ignore(tmp_path, capsys) -> None:
    assert main(["eval", "--suite", "skills", "--data", "scenes"]) == 2
    assert "--suite runs its own test sets; drop --data" in capsys.readouterr().err
    assert main(["eval", "--suite", "skills", "--capitalise", "1"]) == 2
    assert "drop --capitalise" in capsys.readouterr().err
    assert main(["eval", "--summary", str(tmp_path / "s.json")]) == 2
    assert "--summary goes with --suite" in capsys.readouterr().err
