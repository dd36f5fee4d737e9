"""Careless and hostile input where training starts: config values and shapes (every numeric field has a rule,
checked before anything loads; a seeded fuzz of the YAML parser), data rows whose image is not an image (counted
and skipped, never a crash hours into a run), and the temporary folders a killed GGUF conversion leaves."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import subprocess
import sys
import time
import types
import typing
from pathlib import Path

import pytest
import yaml
from bad_files import bomb_png
from scripts import load_script

from vlm import lm
from vlm.config import (
    AT_LEAST_ONE,
    NON_EMPTY,
    NON_NEGATIVE,
    NON_NEGATIVE_INT,
    POSITIVE,
    PROBABILITY,
    REGEX,
    SEED,
    ConfigError,
    Rule,
    load_config,
)
from vlm.data import BadRow, DataSpec, open_data

ft = load_script("finetune")
pt = load_script("pretrain_siglip")
SCHEMAS = {"finetune": ft.FinetuneConfig, "pretrain": pt.PretrainConfig}


# -- config values: one rule per kind of value, for every field ------------------------------------------------


def sections(cls: type, where: str = "") -> typing.Iterator[tuple[str, type]]:
    """(dotted prefix, dataclass) for `cls` and every dataclass it holds, a tuple's items included."""
    yield where, cls
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        inner = [hint, *typing.get_args(hint)]
        for h in inner:
            if dataclasses.is_dataclass(h):
                yield from sections(h, f"{where}{f.name}.")


def checked_fields(cls: type) -> list[tuple[str, dataclasses.Field, Rule]]:
    return [
        (prefix + f.name, f, f.metadata["rule"])
        for prefix, section in sections(cls)
        for f in dataclasses.fields(section)
        if "rule" in f.metadata
    ]


# Fields with no single-value rule, and why: anything else of type int, float or str must carry one.
NO_RULE = {
    "model.vision_feature_layer",  # negative counts from the end; its range is a cross-field rule of ModelSection
    "model.init", "model.vision", "model.init_vision", "model.system_prompt",  # optional; folders: before loading
    "data.train.columns", "data.eval.columns",  # a mapping, checked against the kind's fields by Source
}  # fmt: skip
# A value that breaks each rule (a float for float fields, an int for int fields).
BREAKS = {
    id(AT_LEAST_ONE): 0, id(NON_NEGATIVE_INT): -1, id(POSITIVE): 0.0, id(NON_NEGATIVE): -0.5, id(PROBABILITY): 1.0,
    id(SEED): -1, id(NON_EMPTY): "  ", id(REGEX): "(unclosed",
}  # fmt: skip


@pytest.mark.parametrize("script", SCHEMAS)
def test_every_number_and_name_of_both_configs_has_a_rule(script) -> None:
    cls = SCHEMAS[script]
    for prefix, section in sections(cls):
        hints = typing.get_type_hints(section)
        for f in dataclasses.fields(section):
            scalar = {hints[f.name], *typing.get_args(hints[f.name])} & {int, float, str}
            if scalar and prefix + f.name not in NO_RULE:
                assert "rule" in f.metadata, f"{script}: {prefix}{f.name} has no rule"


def bad_value_cases() -> list[tuple[str, str, object, Rule]]:
    cases = []
    for script, cls in SCHEMAS.items():
        for key, f, rule in checked_fields(cls):
            if id(rule) in BREAKS:
                cases.append((script, key, BREAKS[id(rule)], rule))
            elif isinstance(f.default, int):  # every(...) and at_least(n): below what they take
                cases.append((script, key, -1, rule))
    return cases


@pytest.mark.parametrize(
    ("script", "key", "value", "rule"),
    bad_value_cases(),
    # stable ids (a Rule's repr holds its function's address), so every pytest-xdist worker collects the same
    ids=lambda x: x.text if isinstance(x, Rule) else str(x)[:40],
)
def test_a_value_that_breaks_its_rule_is_named_with_the_rule(script, key, value, rule) -> None:
    head, _, leaf = key.rpartition(".")
    source = {"kind": "vqa", "name": "easy-vqa"} if script == "finetune" else {"name": "emoji"}
    if head in ("data.train", "eval.retrieval"):  # a list of sources: the first one breaks the rule
        arg = f"--{head}=" + json.dumps([{**source, leaf: value}])
        key = f"{head}[0].{leaf}"
    elif head == "data.eval":
        arg = f"--{head}=" + json.dumps({**source, leaf: value})
    else:
        arg = f"--{key}=" + json.dumps(value)
    with pytest.raises(ConfigError) as err:
        load_config(SCHEMAS[script], None, [arg])
    message = str(err.value)
    assert message.startswith(f"{key} = ") and rule.text in message and "\n" not in message, message


def test_cross_field_rules_are_checked_when_the_config_is_read() -> None:
    cases = {
        ("finetune", "--model.hidden_size=100"): "model.hidden_size 100 is not divisible by num_attention_heads",
        ("finetune", "--model.scale_factor=3"): "model.scale_factor: pixel_shuffle with scale_factor 3",
        ("finetune", "--model.vision_feature_layer=7"): "model.vision_feature_layer = 7: must be in [-7, 6]",
        ("finetune", "--data.train=[]"): "data.train = []: must name at least one source",
        ("finetune", "--data.eval={kind: caption, name: emoji, columns: {question: q}}"):
            "data.eval.columns.question: not a field of kind 'caption'",
        ("finetune", "--data.train=[{kind: vqa, name: x.jsonl, columns: {question: ''}}]"):
            "data.train[0].columns.question = '': must be a column name",
        ("pretrain", "--model.vision={image_size: 30}"): "model.vision.image_size 30 is not divisible by patch_size",
        ("pretrain", "--model.text={hidden_size: 100}"): "model.text.hidden_size 100 is not divisible",
        ("pretrain", "--data.train=[]"): "data.train = []: must name at least one source",
        ("finetune", "--train.lr=.inf"): "train.lr = inf: must be a finite number",
        ("pretrain", "--train.lr=nan"): "train.lr = nan: must be a finite number",
    }  # fmt: skip
    for (script, arg), message in cases.items():
        with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
            load_config(SCHEMAS[script], None, [arg])
    # a loaded tower brings its own shape: the fresh-tower fields are not judged then
    assert load_config(ft.FinetuneConfig, None, ["--model.vision=some/tower", "--model.hidden_size=33"])
    # and building a section directly (dataclasses.replace included) checks the same rules
    with pytest.raises(ConfigError, match="grad_accum = 0"):
        dataclasses.replace(ft.TrainSection(), grad_accum=0)
    with pytest.raises(ConfigError, match="weight = 0.0"):
        pt.Source("emoji", weight=0.0)


SCRIPT_CASES = [
    ("--train.grad_accum=0", "train.grad_accum"),
    ("--train.checkpoint_every=0", "train.checkpoint_every"),
    ("--train.lr=0", "train.lr"),
    ("--train.batch_size=0", "train.batch_size"),
    ("--train.steps=-5", "train.steps"),
    ("--data.train=[{kind: vqa, name: /no/such/rows.jsonl}]", "data.train[0].name"),
]


@pytest.mark.parametrize("script", SCHEMAS)
@pytest.mark.parametrize(("arg", "key"), SCRIPT_CASES, ids=[c[1] for c in SCRIPT_CASES])
def test_the_scripts_exit_2_with_one_line_before_any_work(script, arg, key, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    main = ft.main if script == "finetune" else pt.main
    code = main([f"--train.out_dir={out}", arg if script == "finetune" else arg.replace("kind: vqa, ", "")])
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"error: {key} = "), captured.err
    assert captured.out == "" and not out.exists()  # refused before the run printed or made anything


@pytest.mark.parametrize("key", ["init", "init_vision"])
def test_pretraining_from_a_missing_folder_is_refused_before_any_work(key, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    assert pt.main([f"--train.out_dir={out}", f"--model.{key}={tmp_path / 'no-such-model'}"]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip().startswith(f"error: model.{key} = ") and "no such folder" in captured.err
    assert captured.out == "" and not out.exists()


@pytest.mark.parametrize("script", [ft, pt], ids=["finetune", "pretrain"])
def test_as_a_command_a_bad_value_is_one_line_and_exit_2(script, tmp_path) -> None:
    """As a user runs it: a fresh process, which loads no model or data before refusing."""
    config = tmp_path / "c.yaml"
    config.write_text("train:\n  grad_accum: 0\n")
    done = subprocess.run(
        [sys.executable, script.__file__, str(config), f"--train.out_dir={tmp_path / 'run'}"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert done.returncode == 2 and done.stdout == "", done.stderr
    assert done.stderr.strip() == "error: train.grad_accum = 0: must be an integer >= 1"
    assert not (tmp_path / "run").exists()


# -- the YAML parser, fuzzed: only ConfigError may come out -------------------------------------------------------


SCALARS = {
    int: [0, -1, 1, 2, 7, 64, 2**40, -(2**70)],
    float: [0.0, -0.0, 1e-4, 0.5, 1.0, -3.5, 1e308, float("inf"), float("nan")],
    str: ["", " ", "adamw", "vqa", "easy-vqa", "emoji", "2e-4", "nan", "(", "\u00e9\n\t", "x" * 500, "[1"],
    bool: [True, False],
}


def random_value(rng: random.Random, depth: int) -> object:
    """Any YAML structure: dicts (keys of any scalar type), lists, strings, numbers, nulls and bools."""
    kind = rng.choice(["dict", "list", "scalar", "scalar", "null"] if depth < 4 else ["scalar"])
    if kind == "dict":
        keys = [rng.choice(SCALARS[str]), rng.choice(SCALARS[int]), None, True, 1.5]
        return {rng.choice(keys): random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))}
    if kind == "list":
        return [random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return rng.choice(SCALARS[rng.choice(list(SCALARS))]) if kind == "scalar" else None


def shaped_value(rng: random.Random, hint: object, depth: int = 0) -> object:
    """A value shaped by the config's own type `hint` most of the time (real keys, the right kinds of
    values, edge cases of each), so the fuzz reaches every section's types and rules; else any structure."""
    if rng.random() < 0.15 or depth > 6:
        return random_value(rng, depth)
    if dataclasses.is_dataclass(hint):
        hints = typing.get_type_hints(hint)
        chosen = rng.sample(sorted(hints), rng.randint(0, len(hints)))
        tree = {name: shaped_value(rng, hints[name], depth + 1) for name in chosen}
        if rng.random() < 0.1:
            tree[rng.choice(SCALARS[str])] = random_value(rng, depth + 1)  # a key that is not there
        return tree
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (tuple, list):
        return [shaped_value(rng, args[0], depth + 1) for _ in range(rng.randint(0, 3))]
    if origin in (typing.Union, types.UnionType):
        return shaped_value(rng, rng.choice(args), depth + 1)
    if origin is typing.Literal:
        return rng.choice([*args, rng.choice(SCALARS[str])])
    return rng.choice(SCALARS.get(hint, [None]))


@pytest.mark.parametrize("script", SCHEMAS)
def test_random_yaml_structures_give_a_config_or_a_config_error(script, tmp_path) -> None:
    """Seeded: 1,000 YAML files per script, shaped by its config or not at all, and now and then an override;
    `load_config` must build a config or raise one `ConfigError` of one line, and nothing else."""
    rng, cls, path = random.Random(f"fuzz-{script}"), SCHEMAS[script], tmp_path / "fuzz.yaml"
    keys = [prefix + f.name for prefix, section in sections(cls) for f in dataclasses.fields(section)]
    started, errors, built = time.perf_counter(), set(), 0
    for case in range(1000):
        tree = shaped_value(rng, cls) if case % 4 else random_value(rng, 0)
        path.write_text(yaml.safe_dump(tree, allow_unicode=True))
        value = yaml.safe_dump(shaped_value(rng, object), default_flow_style=True).strip().removesuffix("...")
        overrides = [f"--{rng.choice(keys)}={value.strip()}"] if case % 7 == 0 else []
        try:
            load_config(cls, path, overrides)
            built += 1
        except ConfigError as err:
            message = str(err)
            assert "\n" not in message and len(message) < 600, message
            errors.add(message.split(" = ")[0].split(":")[0])
    assert built > 10 and len(errors) > 40  # configs came out, and errors from all over the schema
    assert time.perf_counter() - started < 10
    for text in (b"\x00\xff\xfe binary", b"a: [1, 2", b"- just\n- a list", b"42", b"&a [*a]", b"{? [a]: 1}"):
        path.write_bytes(text)
        with pytest.raises(ConfigError):
            load_config(cls, path)


# -- data rows whose image is not an image ------------------------------------------------------------------------


@pytest.fixture
def hostile_rows(tmp_path) -> Path:
    """A VQA JSONL: 3 good rows, a 0-byte image, a decompression bomb, `"image": 123` and a missing file."""
    from PIL import Image

    Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "red.png")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "bomb.png").write_bytes(bomb_png())
    rows = [{"image": "red.png", "question": f"colour {i}?", "answers": ["red"]} for i in range(3)]
    rows[1:1] = [
        {"image": "empty.png", "question": "q", "answers": ["a"]},
        {"image": "bomb.png", "question": "q", "answers": ["a"]},
        {"image": 123, "question": "q", "answers": ["a"]},
        {"image": "gone.png", "question": "q", "answers": ["a"]},
    ]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_reading_refuses_an_image_field_that_is_no_path(hostile_rows) -> None:
    rows = open_data(DataSpec("vqa", str(hostile_rows)))
    with pytest.raises(BadRow, match="no image: 123"):
        rows.conversation(3)
    # an unreadable file is found when it is read: for training when its batch is built, here for evaluation
    assert [r["question"] for r in rows.eval_rows()] == ["colour 0?", "colour 1?", "colour 2?"]
    assert dict(rows.eval_report.reasons) == {"unreadable image": 3, "no image": 1}


@pytest.mark.parametrize("batch_size", [4, 1])  # 1: a micro-batch of only a bad row borrows the next good one
def test_finetune_skips_and_counts_unreadable_images_and_finishes(
    batch_size, hostile_rows, tiny_lm_folder, tmp_path, capsys
) -> None:
    out = tmp_path / "run"
    code = ft.main([
        f"--model.lm={tiny_lm_folder}", "--model.image_size=32", "--model.hidden_size=32", "--model.intermediate_size=64",
        "--model.num_hidden_layers=2", "--model.num_attention_heads=2", "--lora.r=2", "--lora.alpha=4",
        f"--data.train=[{{kind: vqa, name: {hostile_rows}}}]", "--data.eval=null", f"--train.out_dir={out}",
        f"--train.batch_size={batch_size}", f"--train.steps={12 // batch_size}", "--train.warmup_steps=1",
        "--train.bf16=false", "--train.log_every=1", "--train.checkpoint_every=100",
    ])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert (out / "final" / "config.json").is_file()
    log = captured.out
    # counted when their batches were built: each bad row once however often it was drawn (12 draws of 7 rows)
    assert "training rows: skipped 4 of 7 rows: 3 unreadable image, 1 no image" in log, log
    assert "empty.png: file is empty (0 bytes)" in log and "bomb.png: image is larger than" in log
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 12 // batch_size and all(0 < x < 100 for x in losses)


# -- the GGUF conversion's cache and its temporary folders --------------------------------------------------------


def test_the_same_gguf_in_another_environment_reuses_its_conversion(tmp_path, monkeypatch) -> None:
    """Each fresh virtual environment installs the GGUF file at a new path with a new modification time; a key
    over those made every one of them convert (517 MB each) again."""
    monkeypatch.setenv("VLM_CACHE", str(tmp_path / "cache"))
    first = tmp_path / "env1" / "model.gguf"
    again = tmp_path / "env2" / "model.gguf"
    other = tmp_path / "env3" / "model.gguf"
    for path, content in ((first, b"GGUF weights"), (again, b"GGUF weights"), (other, b"GGUF other weights")):
        path.parent.mkdir()
        path.write_bytes(content)
    os.utime(again, (time.time() + 60, time.time() + 60))

    converted = lm.converted_folder(first)
    assert lm.converted_folder(again) == converted and lm.converted_folder(other) != converted
    converted.mkdir(parents=True)
    (converted / "config.json").write_text("{}")
    assert lm.gguf_to_folder(again) == converted  # found, not converted again (this file is no real GGUF)


def test_orphaned_conversion_folders_are_removed_and_live_ones_kept(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("VLM_CACHE", str(tmp_path))
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    root = tmp_path / "lm"
    root.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its PID is now free
    host = lm._owner().rsplit("-", 1)[0]
    name = ".model-0123456789ab"
    folders = {
        "dead": root / f"{name}.{host}-{dead.pid}.k3j4h5",  # kill -9 during a conversion here
        "alive": root / f"{name}.{lm._owner()}.a1b2c3",  # a conversion still running (this process)
        "other_host": root / f"{name}.elsewhere-{dead.pid}.zz99",  # can't tell: kept until a day old
        "old_other_host": root / f"{name}.elsewhere-1.old1",
        "old_unowned": root / f"{name}.x7y8z9",  # written before folders carried their owner
        "young_unowned": root / f"{name}.young1",
        "not_ours": root / ".keep-me",
    }
    for folder in folders.values():
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"\0" * 1000)
    two_days_ago = time.time() - 2 * 24 * 3600
    for key in ("old_other_host", "old_unowned", "not_ours"):
        os.utime(folders[key], (two_days_ago, two_days_ago))

    removed = lm.remove_orphans(root)
    assert sorted(removed) == sorted(folders[k] for k in ("dead", "old_other_host", "old_unowned"))
    assert {p.name for p in root.iterdir()} == {
        folders[k].name for k in ("alive", "other_host", "young_unowned", "not_ours")
    }

    # a conversion's own folder carries this process: what the next call judges it by
    owner = lm._TEMP_NAME.fullmatch(f".model-0123456789ab.{lm._owner()}.x1y2z3")
    assert owner is not None and (owner["host"], owner["pid"]) == (host, str(os.getpid()))

    # the next conversion (here: a cache hit) cleans up first
    final = lm.converted_folder(gguf)
    final.mkdir()
    (final / "config.json").write_text("{}")
    orphan = root / f".{final.name}.{host}-{dead.pid}.q1w2e3"
    orphan.mkdir()
    assert lm.gguf_to_folder(gguf) == final and not orphan.exists()
