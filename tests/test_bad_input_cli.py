"""Careless and hostile input on the `vlm` command and the library API under it (issue 14, part 1).

Each bad value is refused where it enters, by one checker per kind of value (`vlm.checks`, and the output-path
checks of `vlm.weights`): the command exits 2 with one line `vlm <cmd>: error: ...` naming it, before any model
loads, and nothing is left half-written. Each regression test here failed on the code before the fix; the
rest hold the good paths (a merge into a new folder, Hugging Face configs) and the checkers themselves."""

from __future__ import annotations

import io
import json
import math
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hf_models import hf_vision, save
from PIL import Image
from tiny import build, save_vlm

import vlm.model
from vlm.checks import (
    CheckpointError,
    InvalidValue,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    probability,
    utf8_text,
)
from vlm.cli import main
from vlm.embeddings import Embeddings, embed_files, embed_images, save_embeddings
from vlm.evaluate import evaluate_vqa, write_jsonl
from vlm.lora import LoraSettings, add_lora, save_merged
from vlm.model import ContextTooLong, VisionLanguageModel, VLMConfig
from vlm.projector import ProjectorConfig
from vlm.siglip import SiglipVisionConfig
from vlm.siglip_model import SiglipConfig
from vlm.siglip_text import SiglipTextConfig
from vlm.weights import load_vision_encoder, read_config, safetensors_files


@pytest.fixture(scope="module")
def saved(parts, tmp_path_factory) -> SimpleNamespace:
    """A tiny VLM folder with a LoRA adapter/ (its LM in a folder beside it), a tiny SigLIP tower, an image."""
    root = tmp_path_factory.mktemp("bad_input")
    lm_dir = root / "lm"
    parts[0].save_pretrained(lm_dir)
    parts[1].save_pretrained(lm_dir)
    model = build(parts)
    settings = LoraSettings(r=2, alpha=4, dropout=0.0)
    add_lora(model, settings)
    torch.manual_seed(3)
    with torch.no_grad():  # a real update: peft starts B at zero, which would make a double merge invisible
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5)
    save_vlm(model, root / "vlm", lm_dir, settings)
    image = root / "red.png"
    Image.new("RGB", (40, 30), (200, 10, 10)).save(image)
    return SimpleNamespace(root=root, vlm=root / "vlm", tower=save(hf_vision(), root / "tower"), image=image)


@pytest.fixture(autouse=True, scope="module")
def _no_loading_bars() -> Iterator[None]:
    """transformers draws a bar while it loads an LM (on stderr, before our one line); not what is tested here."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    yield
    logging.enable_progress_bar()


@pytest.fixture(scope="module")
def tiny_model(parts) -> VisionLanguageModel:
    return build(parts)


@pytest.fixture
def no_model_load(monkeypatch) -> None:
    """Loading any model fails the test: the bad input must be refused before."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(VisionLanguageModel, "from_pretrained", refuse)
    monkeypatch.setattr("vlm.model.load_default_model", refuse)
    monkeypatch.setattr("vlm.weights.load_vision_encoder", refuse)
    monkeypatch.setattr("vlm.zeroshot.load_dual_encoder", refuse)


def one_line_error(capsys: pytest.CaptureFixture, command: str) -> str:
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert "Traceback" not in captured.err and len(lines) == 1, captured.err
    assert lines[0].startswith(f"vlm {command}: error: "), lines[0]
    return lines[0]


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def copy_model(saved: SimpleNamespace, tmp_path: Path) -> Path:
    return Path(shutil.copytree(saved.vlm, tmp_path / "m"))


# -- 1. vlm merge never writes into (or around) the model it reads ------------------------------------------------


@pytest.mark.parametrize("where", ["itself", "alias", "inside", "holding"])
def test_merge_refuses_the_model_folder_inside_or_around_it(
    saved, tmp_path, capsys, no_model_load, where
) -> None:
    model = copy_model(saved, tmp_path)
    (tmp_path / "alias").symlink_to(model)
    out = {"itself": model, "alias": tmp_path / "alias", "inside": model / "merged", "holding": tmp_path}[
        where
    ]
    before = snapshot(tmp_path)
    assert main(["merge", str(model), str(out)]) == 2
    line = one_line_error(capsys, "merge")
    assert any(
        word in line for word in ("input folder itself", "inside the input folder", "holds the input")
    ), line
    assert snapshot(tmp_path) == before  # the model is untouched: no merged LM beside its adapter/


def test_merge_into_a_folder_that_is_not_empty_is_refused(saved, tmp_path, capsys, no_model_load) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    assert main(["merge", str(saved.vlm), str(tmp_path / "out")]) == 2
    assert "not empty" in one_line_error(capsys, "merge")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["notes.txt"]


def test_save_merged_refuses_a_model_folder_and_leaves_nothing_when_it_fails(
    saved, tmp_path, monkeypatch
) -> None:
    model = VisionLanguageModel.from_pretrained(copy_model(saved, tmp_path))
    before = snapshot(tmp_path / "m")
    with pytest.raises(ValueError, match="not empty"):
        save_merged(model, tmp_path / "m")  # in place: the merged LM would sit beside adapter/
    assert snapshot(tmp_path / "m") == before

    def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError("No space left on device")

    monkeypatch.setattr(model.tokenizer, "save_pretrained", disk_full)  # after the merged LM's weights
    with pytest.raises(OSError, match="No space"):
        save_merged(model, tmp_path / "out" / "merged")
    assert list((tmp_path / "out").iterdir()) == []  # neither the folder nor its temporary twin


def test_a_merged_model_applies_its_lora_once(saved, tmp_path, capsys) -> None:
    assert main(["merge", str(saved.vlm), str(tmp_path / "merged")]) == 0
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        want = VisionLanguageModel.from_pretrained(saved.vlm)(ids).logits
        got = VisionLanguageModel.from_pretrained(tmp_path / "merged")(ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert not (tmp_path / "merged" / "adapter").exists()


# -- 2. questions: too long for the context, not UTF-8, empty; chat keeps going ------------------------------------


def test_a_question_longer_than_the_context_is_refused_before_generation(saved, capsys, monkeypatch) -> None:
    def no_generation(*args: object, **kwargs: object) -> None:
        raise AssertionError("generation ran")

    monkeypatch.setattr(VisionLanguageModel, "_generate", no_generation)
    assert main(["ask", "--model", str(saved.vlm), "why " * 600]) == 2  # the tiny LM reads 512 tokens
    assert "tokens" in one_line_error(capsys, "ask")
    monkeypatch.undo()
    model = VisionLanguageModel.from_pretrained(saved.vlm)
    monkeypatch.setattr(model.lm, "generate", no_generation)  # under every path: generate, stream, answers
    for call in (
        lambda: model.ask(None, "why " * 600),
        lambda: model.generate([[{"role": "user", "content": "why " * 600}]]),
        lambda: next(model.stream(None, "why " * 600)),
        lambda: model.generate_answers(["why " * 600], [None], progress=False),
        lambda: model.ask(None, "hi", max_new_tokens=600),  # a short question, but no room for the answer
    ):
        with pytest.raises(ContextTooLong):
            call()


def test_a_question_that_is_not_utf8_is_refused_before_the_model_loads(saved, capsys, no_model_load) -> None:
    # Python hands undecodable argv bytes over as lone surrogates ("caf\xe9" in a UTF-8 locale).
    assert main(["ask", "--model", str(saved.vlm), "caf\udce9?"]) == 2
    assert "UTF-8" in one_line_error(capsys, "ask")
    assert main(["zeroshot", str(saved.image), "--labels", "a cat,caf\udce9"]) == 2
    assert "UTF-8" in one_line_error(capsys, "zeroshot")


@pytest.mark.parametrize(
    "argv,words",
    [
        (["ask", "   "], ["empty"]),
        (["ask", "--image", "{root}/missing.png", "what?"], ["missing.png"]),
        (["ask", "--image", "{root}", "what?"], ["folder", "directory"]),
        (["chat", "--image", "{root}/missing.png"], ["missing.png"]),
    ],
    ids=["empty", "missing-image", "folder-image", "chat-missing-image"],
)
def test_questions_and_images_are_checked_before_the_model_loads(
    saved, capsys, no_model_load, argv, words
) -> None:
    argv = [word.replace("{root}", str(saved.root)) for word in argv]
    assert main([*argv, "--model", str(saved.vlm)]) == 2
    line = one_line_error(capsys, argv[0])
    assert any(word in line for word in words), line


@pytest.mark.parametrize(
    "template,words",
    [("{} {}", "has 2 places"), ("{} {x}", "names {x}"), ("{} {", "Single '{'"), ("a photo", "needs {}")],
)
def test_a_template_that_does_not_take_one_label_is_refused_before_the_model_loads(
    saved, capsys, no_model_load, template, words
) -> None:
    argv = ["zeroshot", str(saved.image), "--labels", "a cat", "--template", "a photo of {}."]
    assert main([*argv, "--template", template]) == 2
    line = one_line_error(capsys, "zeroshot")
    assert f"--template {template!r}" in line and words in line, line


def test_chat_reports_bad_bytes_on_stdin_and_keeps_the_conversation(saved, capsys, monkeypatch) -> None:
    chats = []

    class Recorded(vlm.model.Chat):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)
            chats.append(self)

    monkeypatch.setattr(vlm.model, "Chat", Recorded)
    stdin = b"hello\ncaf\xe9 ?\n/image " + str(saved.root / "none.png").encode() + b"\n\nagain\n/quit\n"
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8"))
    assert main(["chat", "--model", str(saved.vlm), "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "UTF-8" in out and "none.png" in out
    assert out.count("vlm> ") == 2  # both good lines answered, around the bad ones
    assert [m["role"] for m in chats[0].messages] == ["user", "assistant", "user", "assistant"]


# -- 3. output paths: checked before the work, written whole or not at all ------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["embed", "{image}", "--model", "{tower}", "--out", "{root}"],
        ["embed", "{image}", "--model", "{tower}", "--out", "{image}/emb.safetensors"],
        ["eval", "{vlm}", "--data", "easy-vqa", "--limit", "2", "--out", "{root}"],
        ["viz", "--out", "{image}"],
        ["merge", "{vlm}", "{image}"],
    ],
    ids=["embed-folder", "embed-under-a-file", "eval-folder", "viz-file", "merge-file"],
)
def test_output_paths_are_checked_before_any_model_loads(saved, capsys, no_model_load, argv) -> None:
    values = {"{image}": saved.image, "{tower}": saved.tower, "{vlm}": saved.vlm, "{root}": saved.root}
    for key, value in values.items():
        argv = [word.replace(key, str(value)) for word in argv]
    before = snapshot(saved.root)
    assert main(argv) == 2
    line = one_line_error(capsys, argv[0])
    assert "folder" in line or "file" in line, line
    assert snapshot(saved.root) == before


@pytest.mark.parametrize("spelling", ["same", "link", "dotdot"])
@pytest.mark.parametrize("command", ["eval", "embed"])
def test_an_output_file_is_never_one_the_command_reads(
    saved, tmp_path, capsys, no_model_load, command, spelling
) -> None:
    """`vlm eval --out` over its --data file, `vlm embed --out` over one of its images (named, or found in a
    folder it searches): refused before the model loads, the input left as it was."""
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"image": str(saved.image), "question": "colour?", "answers": "red"}) + "\n")
    image = Path(shutil.copy(saved.image, tmp_path / "red.png"))
    target = data if command == "eval" else image
    (tmp_path / "link").symlink_to(target)
    spellings = {"same": target, "link": tmp_path / "link", "dotdot": tmp_path / "new" / ".." / target.name}
    out = spellings[spelling]
    argv = {
        "eval": ["eval", str(saved.vlm), "--data", str(data), "--out", str(out)],
        "embed": ["embed", str(tmp_path), "--model", str(saved.tower), "--out", str(out)],
    }[command]
    before = snapshot(tmp_path)
    assert main(argv) == 2
    assert f"--out {out} is the input file" in one_line_error(capsys, command)
    assert snapshot(tmp_path) == before


def test_files_are_written_whole_or_not_at_all(tmp_path, monkeypatch) -> None:
    def torn(tensors: object, path: str, metadata: object = None) -> None:
        Path(path).write_bytes(b"half a safetensors file")
        raise OSError("No space left on device")

    monkeypatch.setattr("vlm.embeddings.save_file", torn)
    with pytest.raises(OSError):
        save_embeddings(Embeddings(torch.zeros(2, 4), ["a", "b"]), tmp_path / "emb.safetensors")
    with pytest.raises(TypeError):  # the third record cannot be written
        write_jsonl(tmp_path / "pred.jsonl", [{"a": 1}, {"b": 2}, {"c": object()}])
    assert list(tmp_path.iterdir()) == []


def test_evaluation_checks_its_predictions_path_before_generating(tmp_path) -> None:
    rows = [{"image": "x.png", "question": "q?", "answers": ["a"]}]
    with pytest.raises(ValueError, match="is a folder"):
        evaluate_vqa(object(), rows, predictions_path=tmp_path)  # the model is never reached


# -- 4. generation settings and batch sizes: one rule each, in the library and on the command line ------------------

BAD_FLAGS = [
    ("ask", "--temperature", "inf"),
    ("ask", "--temperature", "nan"),
    ("ask", "--temperature", "-1"),
    ("ask", "--temperature", "warm"),
    ("ask", "--top-p", "2"),
    ("ask", "--top-p", "0"),
    ("ask", "--top-k", "-1"),
    ("ask", "--top-k", "1.5"),
    ("ask", "--max-new-tokens", "0"),
    ("ask", "--repetition-penalty", "0"),
    ("chat", "--temperature", "inf"),
    ("embed", "--batch-size", "0"),
    ("embed", "--batch-size", "-3"),
    ("eval", "--batch-size", "0"),
    ("eval", "--limit", "-2"),
    ("eval", "--capitalise", "1.5"),
    ("eval", "--capitalise", "-0.1"),
]


@pytest.mark.parametrize("command,flag,value", BAD_FLAGS, ids=[" ".join(case[1:]) for case in BAD_FLAGS])
def test_bad_settings_are_refused_while_parsing(saved, capsys, no_model_load, command, flag, value) -> None:
    rest = {"ask": ["hi"], "chat": [], "embed": [str(saved.image), "--model", str(saved.tower)], "eval": []}
    assert main([command, flag, value, *rest[command]]) == 2
    line = one_line_error(capsys, command)
    assert flag in line and repr(value) in line, line


@pytest.mark.parametrize(
    "settings",
    [
        dict(temperature=math.inf),
        dict(temperature=math.nan),
        dict(temperature=-1.0),
        dict(top_p=0.0),
        dict(top_p=1.5),
        dict(top_k=-1),
        dict(top_k=2.5),
        dict(max_new_tokens=0),
        dict(max_new_tokens=True),
        dict(repetition_penalty=0.0),
        dict(repetition_penalty=math.inf),
    ],
    ids=lambda s: f"{next(iter(s))}={next(iter(s.values()))}",
)
def test_generation_settings_are_checked_by_the_library(tiny_model, settings) -> None:
    model = tiny_model
    with pytest.raises(InvalidValue, match=next(iter(settings))):
        model.generation_kwargs(**settings)
    kwargs = model.generation_kwargs(temperature=0.7, top_p=0.9, top_k=50, repetition_penalty=1.1)
    assert kwargs["do_sample"] and kwargs["temperature"] == 0.7


@pytest.mark.parametrize("batch_size", [0, -3])
def test_embedding_batch_size_is_checked(saved, batch_size) -> None:
    encoder = load_vision_encoder(saved.tower)
    with pytest.raises(InvalidValue, match="batch_size"):
        embed_files(encoder, [saved.image], batch_size=batch_size, progress=False)
    with pytest.raises(InvalidValue, match="batch_size"):
        embed_images(encoder, [saved.image], batch_size=batch_size)


# -- 5. config.json of the wrong shape: CheckpointError naming the file and the key --------------------------------


@pytest.mark.parametrize("text", ["[1, 2, 3]", '"a string"', "42", "null"])
def test_a_config_that_is_not_a_json_object(tmp_path, text) -> None:
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(CheckpointError, match="config.json must be a JSON object"):
        read_config(tmp_path)
    (tmp_path / "config.json").write_bytes(b'{"a": "caf\xe9"}')  # Latin-1, not UTF-8
    with pytest.raises(CheckpointError, match="config.json is not valid JSON"):
        read_config(tmp_path)


def vlm_config(**changes: object) -> dict:
    d = VLMConfig(SiglipVisionConfig(), ProjectorConfig(768, 576)).to_dict()
    for key, value in changes.items():
        section, _, name = key.partition("__")
        if name:
            d[section] = {**d[section], name: value}
        else:
            d[section] = value
    return d


@pytest.mark.parametrize(
    "changes,key",
    [
        (dict(vision="a string"), "vision must be a JSON object"),
        (dict(vision__hidden_size="768"), "vision.hidden_size must be an integer"),
        (dict(vision__num_attention_heads=0), "num_attention_heads must be an integer >= 1"),
        (dict(vision__layer_norm_eps=math.nan), "vision.layer_norm_eps must be a number"),
        (dict(vision__vision_use_head="yes"), "vision.vision_use_head must be true or false"),
        (dict(vision__hidden_act="relu"), "hidden_act 'relu' is not one of"),
        (dict(projector=[1, 2]), "projector must be a JSON object"),
        (dict(projector__kind=3), "projector.kind must be one of"),
        (dict(projector__bogus=1), "projector has unknown keys: bogus"),
        (dict(vision_feature_layer="-1"), "vision_feature_layer must be an integer"),
        (dict(freeze="vision"), "freeze must be a list of strings"),
        (dict(adapter_on_text="false"), "adapter_on_text must be true or false"),
        (dict(system_prompt=3), "system_prompt must be a string or null"),
        (dict(lm_source=None), "lm_source must be a string"),
    ],
    ids=lambda v: "-".join(v) if isinstance(v, dict) else None,
)
def test_vlm_config_of_the_wrong_shape_names_the_key(changes, key) -> None:
    with pytest.raises(CheckpointError, match=key):
        VLMConfig.from_dict(vlm_config(**changes))


def test_vlm_config_still_reads_what_it_wrote() -> None:
    config = VLMConfig(
        SiglipVisionConfig(), ProjectorConfig(768, 576), freeze=("vision",), system_prompt=None
    )
    assert VLMConfig.from_dict(config.to_dict()) == config
    missing = config.to_dict()
    del missing["projector"]["text_hidden_size"], missing["freeze"]
    with pytest.raises(CheckpointError, match="projector lacks text_hidden_size"):
        VLMConfig.from_dict(missing)
    with pytest.raises(CheckpointError, match="must be a JSON object"):
        VLMConfig.from_dict([1, 2])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "build,d,key",
    [
        (SiglipVisionConfig.from_dict, {"vision_config": [1]}, "vision_config must be a JSON object"),
        (SiglipVisionConfig.from_dict, {"hidden_size": "768"}, "hidden_size must be an integer"),
        (SiglipVisionConfig.from_dict, {"patch_size": 0}, "patch_size must be an integer >= 1"),
        (SiglipVisionConfig.from_dict, [], "must be a JSON object"),
        (
            SiglipTextConfig.from_dict,
            {"text_config": {"eos_token_id": "2"}},
            "text_config.eos_token_id must be",
        ),
        (SiglipTextConfig.from_dict, {"vocab_size": -1}, "vocab_size must be an integer >= 1"),
        (SiglipConfig.from_dict, [], "must be a JSON object"),
        (SiglipConfig.from_dict, {"text_config": "x"}, "text_config must be a JSON object"),
        (SiglipConfig.from_dict, {"text_config": {"projection_size": 5}}, "projection_size 5 must equal"),
        (ProjectorConfig.from_dict, {"vision_hidden_size": 4}, "lacks text_hidden_size"),
        (
            ProjectorConfig.from_dict,
            {"vision_hidden_size": 4, "text_hidden_size": 4.5},
            "text_hidden_size must",
        ),
    ],
)
def test_tower_configs_of_the_wrong_shape_name_the_key(build, d, key) -> None:
    with pytest.raises(CheckpointError, match=key):
        build(d)


def test_hugging_face_configs_still_load() -> None:
    assert (
        SiglipVisionConfig.from_dict({"vision_config": None, "torch_dtype": "float32"})
        == SiglipVisionConfig()
    )
    text = SiglipTextConfig.from_dict({"text_config": {"eos_token_id": [1, 2], "pad_token_id": None}})
    assert text.eos_token_id == [1, 2] and text.pad_token_id is None
    assert SiglipConfig.from_dict({}) == SiglipConfig()


def test_bad_config_files_name_the_file_through_every_loader(saved, tmp_path, capsys) -> None:
    model = copy_model(saved, tmp_path)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(
        json.dumps({**config, "vision": {**config["vision"], "hidden_size": "big"}})
    )
    with pytest.raises(
        CheckpointError, match=r"m/config.json: vision.hidden_size must be an integer, got 'big'"
    ):
        VisionLanguageModel.from_pretrained(model)
    assert main(["merge", str(model), str(tmp_path / "out")]) == 2
    assert "vision.hidden_size" in one_line_error(capsys, "merge")
    tower = Path(shutil.copytree(saved.tower, tmp_path / "tower"))
    (tower / "config.json").write_text("[1, 2, 3]")
    assert (
        main(["embed", str(saved.image), "--model", str(tower), "--out", str(tmp_path / "e.safetensors")])
        == 2
    )
    assert "tower/config.json must be a JSON object" in one_line_error(capsys, "embed")
    assert not (tmp_path / "out").exists() and not (tmp_path / "e.safetensors").exists()


@pytest.mark.parametrize("weight_map", [[1, 2], {"a": 3}, {"a": "../elsewhere.safetensors"}, None])
def test_a_shard_index_of_the_wrong_shape(tmp_path, weight_map) -> None:
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match="weight_map"):
        safetensors_files(tmp_path)


# -- the command's last line of defence ----------------------------------------------------------------------------


def test_ctrl_c_ends_a_command_quietly(saved, tmp_path, capsys, monkeypatch) -> None:
    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("vlm.weights.load_vision_encoder", interrupted)
    assert main(["embed", str(saved.image), "--model", str(saved.tower), "--out", str(tmp_path / "e")]) == 130
    assert "Traceback" not in capsys.readouterr().err


# -- the checkers themselves ---------------------------------------------------------------------------------------

CHECKERS = [
    (positive_int, [1, 7], [0, -3, 1.0, True, "1", None]),
    (non_negative_int, [0, 5], [-1, 2.5, False, "0"]),
    (non_negative_float, [0, 0.0, 1.5, 3], [-0.1, math.inf, math.nan, "1", True]),
    (positive_float, [0.5, 2], [0, -1.0, math.inf, math.nan]),
    (probability, [1, 1.0, 0.05], [0, 0.0, 1.01, -0.5, math.nan]),
    (utf8_text, ["", "hello", "café ☕"], ["caf\udce9", b"bytes", 3]),
]


@pytest.mark.parametrize("check,good,bad", CHECKERS, ids=[c[0].__name__ for c in CHECKERS])
def test_each_checker_keeps_good_values_and_names_bad_ones(check, good, bad) -> None:
    for value in good:
        assert check(value, "x") == value
    for value in bad:
        with pytest.raises(InvalidValue, match=r"^setting must be .*, got ") as err:
            check(value, "setting")
        assert err.value.name == "setting" and err.value.value is value and "\n" not in str(err.value)
    long = InvalidValue("question", "short", "why " * 10_000)
    assert len(str(long)) < 120 and "40,000 chars" in str(long)


def test_max_new_tokens_beyond_the_context_is_named_in_one_line(saved, capsys) -> None:
    # Not "the message is 2 tokens, more than the -99,488 this model can read": the message is not the problem.
    assert main(["ask", "--model", str(saved.vlm), "--max-new-tokens", "100000", "hi"]) == 2
    line = one_line_error(capsys, "ask")
    assert "max new tokens (100,000) is larger than this model's whole context (512 tokens" in line, line


@pytest.mark.parametrize("command", ["embed", "viz", "zeroshot"])
def test_a_vlm_folder_given_for_a_siglip_one_is_named_as_such(saved, tmp_path, capsys, command) -> None:
    argv = {
        "embed": ["embed", str(saved.image), "--model", str(saved.vlm), "--out", str(tmp_path / "e")],
        "viz": ["viz", "--model", str(saved.vlm), "--out", str(tmp_path / "viz")],
        "zeroshot": ["zeroshot", str(saved.image), "--labels", "red,blue", "--model", str(saved.vlm)],
    }[command]
    assert main(argv) == 2
    line = one_line_error(capsys, command)
    assert f"{saved.vlm} is a vlm model folder" in line and "vlm/default_siglip" in line, line
    assert "None" not in line
