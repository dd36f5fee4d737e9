"""Fine-tuning and evaluation on data in the shapes users bring it (vlm.data.named), end to end on a tiny model:
VQA rows in Parquet (VQAv2 answer dicts, renamed columns) and CSV, captions with several references in JSONL
and in an imagefolder, LLaVA-Instruct JSON, the chat format with several images a row, the Cauldron, and a
streamed Parquet set mixed by weight with map-style ones. Every set holds bad rows, which are counted and
skipped. Also: a streamed run killed with SIGKILL resumes to the uninterrupted run's losses, the data section
is checked before any model loads (one line per bad entry), and `vlm eval --data` scores each kind."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import datasets
import pytest
from needs import cpu_env, pin_cpu
from PIL import Image
from scripts import ROOT, load_script

from vlm.cli import main as vlm_main
from vlm.config import dump, load_config
from vlm.conversation import IGNORE_INDEX
from vlm.data.named import DataSpec, open_data
from vlm.model import VisionLanguageModel
from vlm.pipeline import StepBatches

ft = load_script("finetune")
datasets.disable_progress_bars()

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 20)}


@pytest.fixture(autouse=True)
def _cpu(monkeypatch) -> None:
    pin_cpu(monkeypatch)


@pytest.fixture(scope="module")
def saved_model(parts, tiny_lm_folder, tmp_path_factory) -> Path:
    """A tiny VLM saved to a folder, its LM the tiny one's folder."""
    from tiny import build, save_vlm

    return save_vlm(build(parts), tmp_path_factory.mktemp("vlm") / "m", tiny_lm_folder)


def write_images(folder: Path) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    for name, rgb in COLOURS.items():
        Image.new("RGB", (16, 16), rgb).save(folder / f"{name}.png")
    (folder / "empty.png").write_bytes(b"")  # unreadable
    return list(COLOURS)


@pytest.fixture(scope="module")
def user_data(tmp_path_factory) -> dict[str, dict]:
    """One small set per format, each with bad rows; name -> the `data.train` entry that reads it."""
    root = tmp_path_factory.mktemp("user-data")
    names = write_images(root / "img")
    entries: dict[str, dict] = {}

    # VQA, Parquet with an Image feature, VQAv2-style answers and its own column names (lmms-lab/VQAv2 shape)
    vqa = {
        "image": [str(root / "img" / f"{n}.png") for n in names] + [str(root / "img" / "empty.png")],
        "q": [f"What colour is it? ({i})" for i in range(len(names))] + ["What colour?"],
        "answers": [[{"answer": n, "answer_id": 1}, {"answer": n, "answer_id": 2}] for n in names] + [[]],
        "answer_type": ["other"] * (len(names) + 1),
    }
    datasets.Dataset.from_dict(vqa).cast_column("image", datasets.Image()).to_parquet(root / "vqa.parquet")
    entries["vqa_parquet"] = {"kind": "vqa", "name": str(root / "vqa.parquet"), "columns": {"question": "q"}}

    # VQA, CSV with relative paths and one answer; a row whose question is empty
    lines = ["image,question,answer"] + [f"img/{n}.png,Is it {n}?,yes" for n in names] + ["img/red.png,,yes"]
    (root / "vqa.csv").write_text("\n".join(lines) + "\n")
    entries["vqa_csv"] = {"kind": "vqa", "name": str(root / "vqa.csv")}

    # captions, JSONL with several references a row, a malformed line and a missing image
    rows = [{"image": f"img/{n}.png", "text": [f"a {n} square", f"{n}"]} for n in names]
    rows.append({"image": "img/gone.png", "text": "lost"})
    text = "".join(json.dumps(r) + "\n" for r in rows) + "{not json\n"
    (root / "captions.jsonl").write_text(text)
    entries["caption_jsonl"] = {"kind": "caption", "name": str(root / "captions.jsonl")}

    # captions, an imagefolder with metadata.jsonl; one image unreadable
    folder = root / "folder"
    write_images(folder)
    meta = [{"file_name": f"{n}.png", "text": f"a picture in {n}"} for n in [*names, "empty"]]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(m) + "\n" for m in meta))
    entries["caption_folder"] = {"kind": "caption", "name": str(folder)}

    # LLaVA-Instruct JSON (an array), images under an image_root, multi-turn; a row with two tags, one image
    llava = [
        {
            "id": str(i),
            "image": f"{n}.png",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat colour is this?"},
                {"from": "gpt", "value": n},
                {"from": "human", "value": "Is it a square?"},
                {"from": "gpt", "value": "yes"},
            ],
        }
        for i, n in enumerate(names)
    ]
    llava.append(
        {"id": "x", "image": "red.png", "conversations": [{"from": "human", "value": "<image><image>"}]}
    )
    (root / "llava.json").write_text(json.dumps(llava))
    entries["llava"] = {"kind": "chat", "name": str(root / "llava.json"), "image_root": str(root / "img")}

    # transformers' chat format, Parquet, two images a row; a row with more image parts than images
    pairs = [(names[i], names[(i + 1) % len(names)]) for i in range(len(names))]
    image_part, text_part = {"type": "image", "text": None}, lambda t: {"type": "text", "text": t}
    chat = {
        "images": [[str(root / "img" / f"{a}.png"), str(root / "img" / f"{b}.png")] for a, b in pairs]
        + [[str(root / "img" / "red.png")]],
        "messages": [
            [
                {"role": "user", "content": [image_part, image_part, text_part("Name both colours.")]},
                {"role": "assistant", "content": [text_part(f"{a} and {b}")]},
            ]
            for a, b in pairs
        ]
        + [
            [
                {"role": "user", "content": [image_part, image_part, text_part("Both?")]},
                {"role": "assistant", "content": [text_part("red")]},
            ]
        ],
    }
    chat_set = datasets.Dataset.from_dict(chat).cast_column("images", datasets.List(datasets.Image()))
    chat_set.to_parquet(root / "chat.parquet")
    entries["chat_messages"] = {"kind": "chat", "name": str(root / "chat.parquet")}

    # the Cauldron, JSONL; a row without an assistant answer
    cauldron = [
        {"images": [f"img/{n}.png"], "texts": [{"user": "Colour?", "assistant": n, "source": "mine"}]}
        for n in names
    ] + [{"images": ["img/red.png"], "texts": [{"user": "Colour?"}]}]
    (root / "cauldron.jsonl").write_text("".join(json.dumps(r) + "\n" for r in cauldron))
    entries["cauldron"] = {"kind": "chat", "name": str(root / "cauldron.jsonl")}

    # a streamed Parquet set (VQA rows), read in order
    streamed = {
        "image": [str(root / "img" / f"{n}.png") for n in names * 2],
        "question": [f"Colour {i}?" for i in range(2 * len(names))],
        "multiple_choice_answer": names * 2,
    }
    datasets.Dataset.from_dict(streamed).cast_column("image", datasets.Image()).to_parquet(
        root / "stream.parquet"
    )
    entries["streamed"] = {"kind": "vqa", "name": str(root / "stream.parquet"), "streaming": True, "limit": 6}
    return entries


# bad rows per set, as the run counts them when their batches are built
BAD = {"vqa_parquet": 1, "vqa_csv": 1, "caption_jsonl": 1, "caption_folder": 1, "llava": 1, "chat_messages": 1,
       "cauldron": 1, "streamed": 0}  # fmt: skip


def finetune_config(
    out: Path, lm: Path, train: list[dict], eval_source: dict | None, **settings
) -> ft.FinetuneConfig:
    overrides = [
        f"--model.lm={lm}", "--model.image_size=32", "--model.hidden_size=32", "--model.intermediate_size=64",
        "--model.num_hidden_layers=2", "--model.num_attention_heads=2", "--lora.r=4", "--lora.alpha=8",
        f"--data.train={json.dumps(train)}", f"--data.eval={json.dumps(eval_source)}",
        f"--train.out_dir={out / 'run'}", "--train.batch_size=4", "--train.warmup_steps=1", "--train.log_every=1",
        "--train.checkpoint_every=100", "--train.bf16=false", "--train.eval_batch_size=8",
    ] + [f"--train.{k}={v}" for k, v in settings.items()]  # fmt: skip
    return load_config(ft.FinetuneConfig, None, overrides)


def test_a_run_over_every_format_trains_on_each_and_counts_its_bad_rows(
    user_data, tiny_lm_folder, tmp_path, capsys, monkeypatch
) -> None:
    train = list(user_data.values())
    drawn: dict[int, set[int]] = {}
    conversation = StepBatches.conversation

    def recording(self, step, key):  # noqa: ANN001, ANN202
        drawn.setdefault(key[0], set()).add(key[1])
        return conversation(self, step, key)

    monkeypatch.setattr(StepBatches, "conversation", recording)  # batches are built in this process on a CPU
    sizes = [len(open_data(ft.Source(**entry).spec())) for entry in train]
    steps = -(-sum(sizes) // 4)  # one epoch: every row of every set drawn once
    cfg = finetune_config(tmp_path, tiny_lm_folder, train, user_data["llava"], steps=steps)
    ft.train(cfg)
    log = capsys.readouterr().out
    assert {s: len(rows) for s, rows in drawn.items()} == dict(enumerate(sizes))  # every row of every format
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert len(losses) == steps and all(0 < x < 50 for x in losses)
    # the bad rows: counted once each, by reason, when their batch was built (the JSONL's malformed line when read)
    assert "captions.jsonl: kept" not in log and "captions.jsonl: skipped 1 of" in log
    total = sum(sizes)
    assert f"training rows: skipped {sum(BAD.values())} of {total} rows" in log, log
    for reason in ("unreadable image", "no answer", "empty question", "images do not match", "bad message"):
        assert reason in log, reason
    # the LLaVA set as data.eval: the last answer of each of its good rows, scored at the end
    [final] = [m for m in metrics if "eval_accuracy" in m]
    assert final["step"] == steps and final["eval_examples"] == len(COLOURS) and "eval_cider" in final


def test_every_assistant_turn_of_a_conversation_is_learned(user_data, parts) -> None:
    from tiny import build

    model: VisionLanguageModel = build(parts)
    rows = open_data(ft.Source(**user_data["llava"]).spec())
    batch = model.prepare([rows.conversation(0)])
    learned = batch.labels[0][batch.labels[0] != IGNORE_INDEX].tolist()
    text = model.tokenizer.decode(learned)
    assert text.count("<|im_end|>") == 2 and "red" in text and "yes" in text, text  # both answers, each ended


def test_a_streamed_run_killed_with_sigkill_resumes_to_the_same_losses(
    user_data, tiny_lm_folder, tmp_path, capsys
) -> None:
    train = [{**user_data["streamed"], "weight": 2.0}, {**user_data["vqa_csv"], "weight": 0.5}]
    straight = finetune_config(tmp_path / "a", tiny_lm_folder, train, None, steps=5, checkpoint_every=1,
                               batch_size=2)  # fmt: skip
    ft.train(straight)
    killed = replace(straight, train=replace(straight.train, out_dir=str(tmp_path / "b" / "run")))
    cfg_file = tmp_path / "b" / "cfg.yaml"
    cfg_file.parent.mkdir(parents=True)
    dump(killed, cfg_file)
    done = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "killed_run.py"), "3", str(cfg_file)],
        env=cpu_env(), cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == -signal.SIGKILL, done.stdout[-2000:] + done.stderr[-3000:]
    assert ft.main([str(cfg_file), "--resume"]) == 0
    assert "at step 2" in capsys.readouterr().out

    def losses(run: Path) -> dict[int, float]:
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}

    a, b = losses(tmp_path / "a" / "run"), losses(tmp_path / "b" / "run")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5]
    assert [b[k] for k in sorted(b)] == pytest.approx([a[k] for k in sorted(a)], rel=1e-5, abs=1e-6)


def test_the_data_section_is_checked_before_any_model_loads(user_data, tmp_path, capsys, monkeypatch) -> None:
    def no_model(cfg):  # noqa: ANN001, ANN202
        raise AssertionError("a model was built before the data was checked")

    monkeypatch.setattr(ft, "build_model", no_model)
    vqa = user_data["vqa_parquet"]
    train = [
        vqa,  # fine
        {**vqa, "columns": {"question": "the_question"}},  # no such column
        {"kind": "caption", "name": vqa["name"], "columns": {"question": "q"}},  # not a caption field
        {"kind": "vqa", "name": str(tmp_path / "absent.parquet")},  # no such file
        {"kind": "caption", "name": vqa["name"]},  # VQA rows, read as captions
    ]
    code = ft.main(
        [f"--train.out_dir={tmp_path / 'run'}", f"--data.train={json.dumps(train)}", "--data.eval=null"]
    )
    err = capsys.readouterr().err
    assert code == 2, err
    # the config's own rule (a field the kind lacks) stops it first, alone
    assert "data.train[2].columns.question: not a field of kind 'caption'" in err
    del train[2]
    code = ft.main(
        [f"--train.out_dir={tmp_path / 'run'}", f"--data.train={json.dumps(train)}", "--data.eval=null"]
    )
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 3, lines  # one line per bad entry, all of them at once
    assert "data.train[1]" in lines[0] and "columns.question = 'the_question'" in lines[0]
    assert "data.train[2]" in lines[1] and "no such file" in lines[1]
    assert "data.train[3]" in lines[2] and "needs the field(s) text" in lines[2] and "q, answers" in lines[2]


def test_a_sources_capitalise_reaches_its_rows_and_is_checked(user_data, tmp_path, capsys) -> None:
    vqa = user_data["vqa_parquet"]
    assert ft.Source(**{**vqa, "capitalise": 0.5}).spec().capitalise == 0.5
    assert ft.Source(**vqa).spec().capitalise == 0.0
    train = [{**vqa, "capitalise": 2}]
    code = ft.main(
        [f"--train.out_dir={tmp_path / 'run'}", f"--data.train={json.dumps(train)}", "--data.eval=null"]
    )
    assert code == 2 and "data.train[0].capitalise = 2" in capsys.readouterr().err


def test_a_run_validates_on_a_slice_held_out_of_its_training_split(
    user_data, tiny_lm_folder, tmp_path, capsys, monkeypatch
) -> None:
    """Data with no validation split: `data.eval` reads `train[:40%]`, `data.train` the rest, and no training
    step sees a held-out row. A slice that does not parse stops the run before any model loads."""
    vqa = user_data["vqa_parquet"]  # 5 rows: red, green, blue, yellow, and one unreadable
    seen: set[str] = set()
    conversation = StepBatches.conversation

    def recording(self, step, key):  # noqa: ANN001, ANN202
        turns = conversation(self, step, key)
        seen.add(next(part["text"] for part in turns[0]["content"] if part["type"] == "text"))
        return turns

    monkeypatch.setattr(StepBatches, "conversation", recording)
    train, held = {**vqa, "split": "train[40%:]"}, {**vqa, "split": "train[:40%]"}
    ft.train(finetune_config(tmp_path, tiny_lm_folder, [train], held, steps=3))
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    [final] = [m for m in metrics if "eval_accuracy" in m]
    assert final["eval_examples"] == 2  # red and green
    assert seen and not seen & {"What colour is it? (0)", "What colour is it? (1)"}, seen
    assert "warning: data.eval reads rows" not in capsys.readouterr().out
    # evaluating on rows the run trains on is allowed, and said
    ft.train(finetune_config(tmp_path / "same", tiny_lm_folder, [vqa], held, steps=1))
    assert "warning: data.eval reads rows data.train[0] trains on" in capsys.readouterr().out
    code = ft.main(
        [
            f"--train.out_dir={tmp_path / 'bad'}",
            f"--data.train={json.dumps([{**vqa, 'split': 'train[:x%]'}])}",
        ]
    )
    assert code == 2 and "a slice reads like" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("entry", "task", "metric"),
    [
        ("vqa_parquet", "vqa", "accuracy"),
        ("caption_jsonl", "caption", "cider"),
        ("chat_messages", "chat", "bleu4"),
    ],
)
def test_vlm_eval_reads_the_same_names_and_kinds(
    entry, task, metric, user_data, saved_model, tmp_path, capsys
) -> None:
    source = user_data[entry]
    argv = ["eval", str(saved_model), "--task", task, "--data", source["name"], "--split", "train"]
    argv += [f"--column={k}={v}" for k, v in source.get("columns", {}).items()]
    assert vlm_main([*argv, "--out", str(tmp_path / "p.jsonl")]) == 0
    report = capsys.readouterr().out
    good = len(open_data(DataSpec(task, source["name"], columns=source.get("columns", {})))) - BAD[entry]
    assert report.startswith(f"{task}: ") and f"{metric} " in report and f"on {good} examples" in report, (
        report
    )
    records = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert len(records) == good
    if task == "caption":  # scored against every reference of its image
        assert all(len(r["captions"]) == 2 for r in records)
