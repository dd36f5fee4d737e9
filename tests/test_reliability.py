"""Careless and hostile input across every public surface, as a table: each CLI command, both training scripts,
the Python API and the demo's API endpoints, fed bad paths, images, text, numbers, config files, checkpoints and
data rows. For each: exit code 2 (or a named exception in the API) with one line naming what is wrong, no
traceback, nothing half-written; the demo keeps answering afterwards. The README's reliability section is this
table in words."""

from __future__ import annotations

import json
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from bad_files import bomb_png
from hf_models import hf_vision, save
from PIL import Image
from scripts import load_script
from tiny import build, save_vlm

from vlm.cli import main
from vlm.conversation import user
from vlm.lora import LoraSettings, add_lora
from vlm.model import ContextTooLong, VisionLanguageModel
from vlm.processing import ImageLoadError, load_image
from vlm.serving import BatchedGenerator
from vlm.weights import CheckpointError, load_vision_encoder

ft = load_script("finetune")
pt = load_script("pretrain_siglip")


class _Payload:
    """Unpickling this writes a file: a loader that unpickles would leave the evidence."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self) -> tuple:
        return (Path.write_text, (self.target, "pwned"))


@dataclass
class World:
    """Files for the table: a tiny VLM (with adapter) and its LM, a tiny tower, good and bad images and folders."""

    root: Path
    vlm: Path
    tower: Path
    good: Path
    bad_images: dict[str, Path]
    bad_models: dict[str, Path]
    evidence: Path  # written by the pickle payload if anything ever unpickles it


@pytest.fixture(scope="module")
def world(parts, tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("reliability")
    lm_dir = root / "lm"
    parts[0].save_pretrained(lm_dir)
    parts[1].save_pretrained(lm_dir)
    model = build(parts)
    settings = LoraSettings(r=2, alpha=4, dropout=0.0)
    add_lora(model, settings)
    config = json.loads((save_vlm(model, root / "vlm", lm_dir, settings) / "config.json").read_text())
    tower = save(hf_vision(), root / "tower")

    good = root / "good.png"
    Image.new("RGB", (40, 30), (200, 10, 10)).save(good)
    bad_images = {
        "empty": root / "empty.png",
        "text": root / "notes.png",
        "bomb": root / "bomb.png",
        "truncated": root / "truncated.jpg",
        "folder": root / "a_folder.png",
        "missing": root / "missing.png",
    }
    bad_images["empty"].write_bytes(b"")
    bad_images["text"].write_text("not an image\n")
    bad_images["bomb"].write_bytes(bomb_png())
    Image.new("RGB", (64, 64), (1, 2, 3)).save(root / "whole.jpg")
    bad_images["truncated"].write_bytes((root / "whole.jpg").read_bytes()[:100])
    bad_images["folder"].mkdir()

    evidence = root / "evidence.txt"
    bad_models: dict[str, Path] = {}
    for name, content in {
        "config_list": "[1, 2, 3]",
        "config_not_json": "{format: nope",
        "config_wrong_types": json.dumps({**config, "vision": "a string", "lm_source": str(lm_dir)}),
        "config_wrong_number": json.dumps(
            {**config, "vision": {**config["vision"], "hidden_size": "big"}, "lm_source": str(lm_dir)}
        ),
    }.items():
        folder = root / name
        folder.mkdir()
        (folder / "config.json").write_text(content)
        (folder / "model.safetensors").write_bytes((root / "vlm" / "model.safetensors").read_bytes())
        bad_models[name] = folder
    pickled = root / "pickle_only"
    pickled.mkdir()
    (pickled / "config.json").write_text((root / "tower" / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(evidence)))
    bad_models["pickle_only"] = pickled
    garbage = root / "garbage_weights"
    garbage.mkdir()
    (garbage / "config.json").write_text(json.dumps({**config, "lm_source": str(lm_dir)}))
    (garbage / "model.safetensors").write_bytes(b"\x00" * 100)
    bad_models["garbage_weights"] = garbage
    bad_models["missing"] = root / "no_such_model"
    bad_models["a_file"] = good
    return World(root, root / "vlm", tower, good, bad_images, bad_models, evidence)


def run_cli(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    code = main(argv)
    err = capsys.readouterr().err
    return code, err


def messages(err: str) -> list[str]:
    """The lines of stderr a user reads as messages: progress bars (tqdm's "NN%|...|") are not messages."""
    return [line for line in re.split(r"[\r\n]+", err) if line.strip() and not re.search(r"\d+%\|", line)]


def assert_one_line_error(code: int, err: str, command: str, *names: str) -> None:
    lines = messages(err)
    assert code == 2, err
    assert "Traceback" not in err
    assert len(lines) == 1, err
    assert lines[0].startswith(f"vlm {command}: error:"), lines[0]
    assert any(name.lower() in lines[0].lower() for name in names), (lines[0], names)


# -- the CLI: (id, argv template, words one of which the message must name) -------------------------------------
# Templates: {vlm} the tiny VLM, {tower} a tiny SigLIP tower, {good} a good image, {img:NAME} a bad image,
# {model:NAME} a bad model folder, {out} a fresh output path, {dir} an existing folder.

CLI_CASES = [
    # paths
    ("ask-missing-model", "ask --model {model:missing} hello", ["no_such_model"]),
    ("ask-model-is-a-file", "ask --model {model:a_file} hello", ["good.png"]),
    ("eval-missing-data", "eval {vlm} --data {root}/none.jsonl", ["none.jsonl"]),
    ("merge-missing", "merge {model:missing} {out}", ["no_such_model"]),
    ("embed-missing-model", "embed {good} --model {model:missing} --out {out}", ["no_such_model"]),
    ("zeroshot-missing-image", "zeroshot {img:missing} --labels a,b", ["missing.png"]),
    # images
    ("ask-empty-image", "ask --model {vlm} --image {img:empty} what", ["empty.png"]),
    ("ask-text-image", "ask --model {vlm} --image {img:text} what", ["notes.png"]),
    ("ask-bomb", "ask --model {vlm} --image {img:bomb} what", ["bomb.png"]),
    ("ask-truncated", "ask --model {vlm} --image {img:truncated} what", ["truncated.jpg"]),
    ("ask-folder-image", "ask --model {vlm} --image {img:folder} what", ["a_folder.png"]),
    ("zeroshot-bomb", "zeroshot {img:bomb} --labels a,b", ["bomb.png"]),
    # text
    ("ask-empty-question", ["ask", "--model", "{vlm}", ""], ["empty", "question"]),
    ("ask-blank-question", ["ask", "--model", "{vlm}", "   \n "], ["empty", "question"]),
    ("ask-huge-question", ["ask", "--model", "{vlm}", "why " * 12_500], ["tokens", "context"]),
    ("ask-not-utf8", ["ask", "--model", "{vlm}", "caf\udce9?"], ["utf-8", "utf8"]),
    ("zeroshot-no-labels", ["zeroshot", "{good}", "--labels", " , ,"], ["label"]),
    ("zeroshot-bad-template", ["zeroshot", "{good}", "--labels", "a", "--template", "a photo"], ["{}"]),
    # numbers
    ("ask-temperature-inf", "ask --model {vlm} --temperature inf hi", ["temperature"]),
    ("ask-temperature-nan", "ask --model {vlm} --temperature nan hi", ["temperature"]),
    ("ask-temperature-negative", "ask --model {vlm} --temperature -1 hi", ["temperature"]),
    ("ask-top-p-2", "ask --model {vlm} --top-p 2 hi", ["top-p", "top_p"]),
    ("ask-top-p-0", "ask --model {vlm} --top-p 0 hi", ["top-p", "top_p"]),
    ("ask-top-k-negative", "ask --model {vlm} --top-k -3 hi", ["top-k", "top_k"]),
    ("ask-max-new-tokens-0", "ask --model {vlm} --max-new-tokens 0 hi", ["max-new-tokens", "max_new_tokens"]),
    ("ask-repetition-0", "ask --model {vlm} --repetition-penalty 0 hi", ["repetition"]),
    ("ask-temperature-word", "ask --model {vlm} --temperature warm hi", ["temperature", "warm"]),
    (
        "embed-batch-0",
        "embed {good} --model {tower} --batch-size 0 --out {out}",
        ["batch-size", "batch_size"],
    ),
    (
        "embed-batch-negative",
        "embed {good} --model {tower} --batch-size -3 --out {out}",
        ["batch-size", "batch_size"],
    ),
    ("eval-batch-0", "eval {vlm} --data easy-vqa --batch-size 0", ["batch-size", "batch_size"]),
    ("eval-limit-negative", "eval {vlm} --data easy-vqa --limit -2", ["limit"]),
    # checkpoints and config files
    ("ask-config-list", "ask --model {model:config_list} hi", ["config.json"]),
    ("ask-config-not-json", "ask --model {model:config_not_json} hi", ["config.json"]),
    ("ask-config-wrong-types", "ask --model {model:config_wrong_types} hi", ["vision"]),
    ("ask-config-wrong-number", "ask --model {model:config_wrong_number} hi", ["hidden_size"]),
    ("ask-garbage-weights", "ask --model {model:garbage_weights} hi", ["safetensors", "model.safetensors"]),
    ("merge-config-list", "merge {model:config_list} {out}", ["config.json"]),
    ("embed-config-list", "embed {good} --model {model:config_list} --out {out}", ["config.json"]),
    ("embed-pickle-only", "embed {good} --model {model:pickle_only} --out {out}", ["pickle", "safetensors"]),
    # output paths, checked before the work
    (
        "eval-out-is-a-folder",
        "eval {vlm} --data easy-vqa --limit 2 --out {dir}",
        ["out", "folder", "directory"],
    ),
    ("embed-out-is-a-folder", "embed {good} --model {tower} --out {dir}", ["out", "folder", "directory"]),
    ("merge-into-itself", "merge {vlm} {vlm}", ["itself", "same", "in place", "inside"]),
]


def expand(template: str | list[str], world: World, tmp_path: Path) -> list[str]:
    words = template.split() if isinstance(template, str) else list(template)
    out_dir = tmp_path / "existing_folder"
    out_dir.mkdir(exist_ok=True)
    values = {
        "{vlm}": str(world.vlm),
        "{tower}": str(world.tower),
        "{good}": str(world.good),
        "{out}": str(tmp_path / "out" / "result.safetensors"),
        "{dir}": str(out_dir),
        "{root}": str(world.root),
    }
    result = []
    for word in words:
        for key, value in values.items():
            word = word.replace(key, value)
        if word.startswith("{img:"):
            word = str(world.bad_images[word[5:-1]])
        elif word.startswith("{model:"):
            word = str(world.bad_models[word[7:-1]])
        result.append(word)
    return result


@pytest.mark.parametrize("case", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_bad_input_is_one_line_and_exit_2(case, world, tmp_path, capsys) -> None:
    _, template, names = case
    argv = expand(template, world, tmp_path)
    before = sorted(p.relative_to(world.root) for p in world.root.rglob("*"))
    code, err = run_cli(argv, capsys)
    assert_one_line_error(code, err, argv[0], *names)
    assert not (tmp_path / "out").exists()  # nothing half-written
    assert sorted(p.relative_to(world.root) for p in world.root.rglob("*")) == before  # inputs untouched
    assert not world.evidence.exists()  # no pickle was ever unpickled


def test_chat_survives_bad_lines_on_stdin(world, monkeypatch, capsys) -> None:
    """Bad input inside `vlm chat` is reported and the conversation goes on (and is kept)."""
    lines = iter(
        [
            "/image " + str(world.bad_images["bomb"]),
            "what is it?",  # the bomb is refused here; the chat goes on
            "caf\udce9 ?",  # not UTF-8
            "",  # empty
            "hello",
            "/quit",
        ]
    )
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert main(["chat", "--model", str(world.vlm), "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr()
    assert "Traceback" not in out.err + out.out
    assert "bomb.png" in out.out + out.err
    assert out.out.count("vlm> ") >= 1  # "hello" was answered after the bad lines


# -- the Python API: named exceptions, raised before any work ---------------------------------------------------


def test_api_bad_input_raises_named_errors(world) -> None:
    for name in (
        "config_list",
        "config_not_json",
        "config_wrong_types",
        "config_wrong_number",
        "garbage_weights",
    ):
        with pytest.raises(CheckpointError):
            VisionLanguageModel.from_pretrained(world.bad_models[name])
    with pytest.raises(CheckpointError):
        VisionLanguageModel.from_pretrained(world.bad_models["missing"])
    for name in ("pickle_only", "config_list", "missing"):
        with pytest.raises(CheckpointError):
            load_vision_encoder(world.bad_models[name])
    assert not world.evidence.exists()
    for path in world.bad_images.values():
        with pytest.raises(ImageLoadError):
            load_image(path)
    model = VisionLanguageModel.from_pretrained(world.vlm)
    for settings in (
        dict(temperature=float("inf")),
        dict(temperature=float("nan")),
        dict(temperature=-1.0),
        dict(top_p=0.0),
        dict(top_p=1.5),
        dict(top_k=-1),
        dict(max_new_tokens=0),
        dict(repetition_penalty=0.0),
    ):
        with pytest.raises(ValueError, match=next(iter(settings))):
            model.ask(None, "hi", **settings)
    with pytest.raises(ValueError, match="empty"):
        model.ask(None, "   ")
    with pytest.raises(ImageLoadError):
        model.ask(world.bad_images["bomb"], "what?")
    with pytest.raises(ContextTooLong):
        model.fit_context([{"role": "user", "content": "why " * 12_500}], max_new_tokens=16)
    with pytest.raises(ContextTooLong):
        model.ask(None, "why " * 12_500)
    with pytest.raises(ValueError, match="UTF-8"):
        model.ask(None, "caf\udce9?")
    engine = BatchedGenerator(model)
    with pytest.raises(ContextTooLong):
        next(engine.stream([user("why " * 12_500)]))
    with pytest.raises(ValueError, match="UTF-8"):
        next(engine.stream([user("caf\udce9?")]))
    engine.close()


def test_a_malformed_adapter_config_is_a_checkpoint_error(world, tmp_path) -> None:
    import shutil

    for name, content in {
        "list": "[]",
        "no_settings": "{}",
        "wrong_type": json.dumps({"vlm_lora": {"r": "sixteen", "alpha": 4, "dropout": 0.0, "target": "x"}}),
        "unknown_key": json.dumps(
            {"vlm_lora": {"r": 2, "alpha": 4, "dropout": 0.0, "target": "x", "rank": 3}}
        ),
    }.items():
        folder = tmp_path / name
        shutil.copytree(world.vlm, folder)
        (folder / "adapter" / "adapter_config.json").write_text(content)
        with pytest.raises(CheckpointError, match="adapter_config.json"):
            VisionLanguageModel.from_pretrained(folder)


# -- the training scripts: bad configs and bad data rows --------------------------------------------------------

TRAIN_CASES = [
    ("grad-accum-0", "--train.grad_accum=0", "grad_accum"),
    ("checkpoint-every-0", "--train.checkpoint_every=0", "checkpoint_every"),
    ("lr-0", "--train.lr=0", "lr"),
    ("lr-negative", "--train.lr=-1e-3", "lr"),
    ("steps-0", "--train.steps=0", "steps"),
    ("batch-0", "--train.batch_size=0", "batch_size"),
    ("batch-word", "--train.batch_size=many", "batch_size"),
    ("unknown-key", "--train.learning_rate=1e-3", "learning_rate"),
    ("missing-data-file", "--data.train=[{kind: vqa, name: /no/such/file.jsonl}]", "file.jsonl"),
]


@pytest.mark.parametrize("case", TRAIN_CASES, ids=[c[0] for c in TRAIN_CASES])
def test_finetune_refuses_bad_settings_before_any_work(case, world, tmp_path, capsys) -> None:
    _, override, name = case
    out = tmp_path / "run"
    code = ft.main([f"--model.lm={world.root / 'lm'}", f"--train.out_dir={out}", override])
    err = capsys.readouterr().err
    lines = messages(err)
    assert code == 2 and "Traceback" not in err and len(lines) == 1, err
    assert name in lines[0], lines[0]
    assert not out.exists()  # refused before a run folder was made


@pytest.mark.parametrize(
    "override,name",
    [("--train.batch_size=0", "batch_size"), ("--train.steps=-1", "steps"), ("--train.lr=0", "lr")],
)
def test_pretrain_refuses_bad_settings_before_any_work(override, name, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    code = pt.main([f"--train.out_dir={out}", override])
    err = capsys.readouterr().err
    lines = messages(err)
    assert code == 2 and "Traceback" not in err and len(lines) == 1, err
    assert name in lines[0] and not out.exists()


def test_bad_data_rows_are_counted_and_skipped_never_a_crash(world, tmp_path, capsys) -> None:
    """A VQA JSONL with a 0-byte image, a decompression bomb, a non-path image and a missing file among good rows:
    fine-tuning finishes and says how many rows were skipped."""
    data = tmp_path / "data.jsonl"
    good = {"image": str(world.good), "question": "What colour?", "answers": ["red"]}
    bad = [
        {"image": str(world.bad_images["empty"]), "question": "q", "answers": ["a"]},
        {"image": str(world.bad_images["bomb"]), "question": "q", "answers": ["a"]},
        {"image": 123, "question": "q", "answers": ["a"]},
        {"image": str(world.bad_images["missing"]), "question": "q", "answers": ["a"]},
        {"question": "no image", "answers": ["a"]},
        {"image": str(world.good), "question": "", "answers": ["a"]},
    ]
    data.write_text("\n".join(json.dumps(r) for r in [good, *bad, good, good, good]) + "\nnot json\n")
    out = tmp_path / "run"
    code = ft.main(
        [
            f"--model.lm={world.root / 'lm'}", "--model.image_size=32", "--model.hidden_size=32",
            "--model.intermediate_size=64", "--model.num_hidden_layers=2", "--model.num_attention_heads=2",
            "--lora.r=2", "--lora.alpha=4", f"--data.train=[{{kind: vqa, name: {data}}}]", "--data.eval=null",
            f"--train.out_dir={out}", "--train.batch_size=4", "--train.steps=3", "--train.warmup_steps=1",
            "--train.bf16=false", "--train.log_every=1",
        ]
    )  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert (out / "final" / "config.json").is_file()
    assert "Traceback" not in captured.err
    assert "skipped" in (captured.out + captured.err).lower()


# -- the demo's API endpoints: an error message, and the server still answers -----------------------------------


def test_demo_endpoints_refuse_bad_input_and_keep_serving(world) -> None:
    gradio_client = pytest.importorskip("gradio_client")
    from demo.app import launch

    model = VisionLanguageModel.from_pretrained(world.vlm)
    app, url = launch(model=model, block=False, port=_free_port())
    try:
        client = gradio_client.Client(url, verbose=False)
        file = gradio_client.handle_file
        bad_calls = [
            ("/ask", (file(str(world.good)), "", 8, 0.0, 1.0)),
            ("/ask", (file(str(world.bad_images["bomb"])), "What?", 8, 0.0, 1.0)),
            ("/ask", (file(str(world.bad_images["text"])), "What?", 8, 0.0, 1.0)),
            ("/ask", (None, "why " * 12_500, 8, 0.0, 1.0)),
            ("/attention", (file(str(world.bad_images["truncated"])),)),
            ("/similarity", (file(str(world.bad_images["empty"])), 0, 0)),
        ]
        for endpoint, args in bad_calls:
            with pytest.raises(Exception) as caught:  # gradio_client's AppError carries our message
                client.predict(*args, api_name=endpoint)
            message = str(caught.value)
            assert "Traceback" not in message and message.strip(), (endpoint, message)
        answer = client.predict(file(str(world.good)), "What colour?", 4, 0.0, 1.0, api_name="/ask")
        assert isinstance(answer, str)
    finally:
        app.close()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tower_keeps_loading_good_checkpoints(world) -> None:
    """The table's refusals are not a loader that refuses everything."""
    encoder = load_vision_encoder(world.tower)
    assert encoder(torch.zeros(1, 3, 32, 32)).pooler_output.shape == (1, 32)
