"""The `vlm` command end to end on real files: embed, viz, ask (--dtype, --quantize), chat (through stdin),
eval (VQA and captions), merge, and `vlm demo` serving over HTTP; and the `embed_images` one-liner."""

from __future__ import annotations

import io
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest
import torch
from hf_models import hf_vision, save
from PIL import Image

import vlm.model
from vlm.cli import main
from vlm.embeddings import embed_images, load_embeddings
from vlm.processing import SiglipImageProcessor
from vlm.weights import load_vision_encoder


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    Image.new("RGB", (40, 30), (200, 10, 10)).save(folder / "red.png")
    Image.new("L", (33, 50), 128).save(folder / "sub" / "grey.jpg")
    Image.new("RGBA", (20, 20), (0, 0, 255, 128)).save(folder / "sub" / "blue.webp")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return folder


@pytest.fixture
def checkpoint(tmp_path):
    return save(hf_vision(), tmp_path / "model")


def test_embed_one_liner_accepts_paths_images_and_tensors(images, checkpoint) -> None:
    encoder = load_vision_encoder(checkpoint)
    files = [images / "red.png", images / "sub" / "grey.jpg"]
    from_paths = embed_images(encoder, files)
    from_pil = embed_images(encoder, [Image.open(f) for f in files], batch_size=1)
    pixels = SiglipImageProcessor(32)([Image.open(f) for f in files])
    with torch.no_grad():
        want = encoder(pixels).pooler_output
    assert from_paths.shape == (2, 32)
    torch.testing.assert_close(from_paths, want)
    torch.testing.assert_close(from_pil, want)
    assert encoder.embed(pixels, pooled=False).shape == (2, 16, 32)
    torch.testing.assert_close(
        embed_images(encoder, pixels, pooled=False), encoder.embed(pixels, pooled=False)
    )
    assert embed_images(encoder, []).shape == (0, 32)
    # one image, given alone (a path as str or Path, a PIL image): a batch of one, not a string of letters
    for one in (str(files[0]), files[0], Image.open(files[0])):
        torch.testing.assert_close(embed_images(encoder, one), want[:1])


def test_embed_without_head_pools_by_mean(checkpoint, tmp_path) -> None:
    encoder = load_vision_encoder(save(hf_vision(vision_use_head=False), tmp_path / "nohead"))
    pixels = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(encoder.embed(pixels), encoder.embed(pixels, pooled=False).mean(1))


def test_vlm_embed_writes_vectors_with_their_file_names(images, checkpoint, tmp_path, capsys) -> None:
    out = tmp_path / "emb.safetensors"
    assert (
        main(["embed", str(images), "--model", str(checkpoint), "--out", str(out), "--batch-size", "2"]) == 0
    )
    vectors, files = load_embeddings(out)
    assert [f.split("images/")[1] for f in files] == ["red.png", "sub/blue.webp", "sub/grey.jpg"]
    torch.testing.assert_close(vectors, embed_images(load_vision_encoder(checkpoint), files))
    captured = capsys.readouterr()
    assert "broken.png" in captured.err and "(1 skipped)" in captured.out


def test_vlm_embed_patches_and_no_readable_image(images, checkpoint, tmp_path) -> None:
    out = tmp_path / "patches.safetensors"
    assert (
        main(["embed", str(images / "red.png"), "--model", str(checkpoint), "--out", str(out), "--patches"])
        == 0
    )
    assert load_embeddings(out)[0].shape == (1, 16, 32)
    assert main(["embed", str(images / "broken.png"), "--model", str(checkpoint), "--out", str(out)]) == 1


def test_vlm_embed_bad_model_is_a_one_line_error(images, tmp_path, capsys) -> None:
    assert main(["embed", str(images), "--model", str(tmp_path / "missing")]) == 2
    assert "no checkpoint folder at" in capsys.readouterr().err


def test_vlm_viz_draws_random_init_and_loaded_model(checkpoint, images, tmp_path) -> None:
    out = tmp_path / "viz"
    assert (
        main(["viz", "--model", str(checkpoint), "--image", str(images / "red.png"), "--out", str(out)]) == 0
    )
    names = sorted(p.name for p in out.glob("*.png"))
    assert any(n.startswith("random_init_") for n in names) and any(
        n.startswith("pretrained_") for n in names
    )
    assert len(names) == 6
    for path in out.glob("*.png"):
        with Image.open(path) as im:
            assert im.size[0] > 100 and im.size[1] > 100


def test_console_script_runs(checkpoint, images, tmp_path) -> None:
    out = tmp_path / "e.safetensors"
    cmd = [
        sys.executable,
        "-m",
        "vlm.cli",
        "embed",
        str(images / "red.png"),
        "--model",
        str(checkpoint),
        "--out",
        str(out),
    ]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert out.is_file()


# -- the VLM commands on a tiny saved model (tiny random LM in its own folder) -------------------------------


@pytest.fixture(scope="module")
def saved(parts, tmp_path_factory):
    """A tiny VLM saved with a (random) LoRA adapter, its LM in a folder named by its config, and a picture."""
    from tiny import build, images, save_vlm

    from vlm.lora import LoraSettings, add_lora

    root = tmp_path_factory.mktemp("saved")
    model = build(parts)
    settings = LoraSettings(r=2, alpha=4, dropout=0.0)
    add_lora(model, settings)
    save_vlm(model, root / "m", root / "lm", settings)
    parts[0].save_pretrained(root / "lm")
    parts[1].save_pretrained(root / "lm")
    for n, picture in enumerate(images(3)):
        picture.save(root / f"picture{n}.png")
    return root


def spy_on_loading(monkeypatch: pytest.MonkeyPatch) -> list:
    """The models the command loads (the real loader runs; each result is also kept here)."""
    loaded = []
    real = vlm.model.VisionLanguageModel.from_pretrained.__func__

    def from_pretrained(cls, *args, **kwargs):
        loaded.append(real(cls, *args, **kwargs))
        return loaded[-1]

    monkeypatch.setattr(vlm.model.VisionLanguageModel, "from_pretrained", classmethod(from_pretrained))
    return loaded


def test_vlm_ask_in_bfloat16_streams_the_models_answer(saved, capsys, monkeypatch) -> None:
    loaded = spy_on_loading(monkeypatch)
    picture, question = saved / "picture0.png", "What is in the picture?"
    argv = ["ask", question, "--model", str(saved / "m"), "--image", str(picture), "--max-new-tokens", "8"]
    assert main([*argv, "--dtype", "bfloat16"]) == 0
    (model,) = loaded
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert capsys.readouterr().out == model.ask(picture, question, max_new_tokens=8) + "\n"


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_vlm_ask_quantize_loads_the_lm_through_bitsandbytes(
    bits, saved, capsys, monkeypatch, cpu_only
) -> None:
    import bitsandbytes as bnb

    loaded = spy_on_loading(monkeypatch)
    picture, question = saved / "picture1.png", "What colour is it?"
    argv = ["ask", question, "--model", str(saved / "m"), "--image", str(picture), "--max-new-tokens", "8"]
    assert main([*argv, "--quantize", bits]) == 0
    (model,) = loaded
    layer = {"4bit": bnb.nn.Linear4bit, "8bit": bnb.nn.Linear8bitLt}[bits]
    linear = [m.base_layer for name, m in model.lm.named_modules() if name.endswith(("q_proj", "down_proj"))]
    assert len(linear) == 4 and all(isinstance(m, layer) for m in linear)  # under their LoRA
    answer = capsys.readouterr().out
    assert answer.strip() and answer == model.ask(picture, question, max_new_tokens=8) + "\n"


def test_quantize_applies_to_the_default_model_too(saved, capsys, monkeypatch, cpu_only) -> None:
    """Without --model the default model loads; --quantize must reach it (it used to be dropped)."""
    import bitsandbytes as bnb

    monkeypatch.setattr(
        vlm.model, "DEFAULT_MODEL_DIR", saved / "m"
    )  # the tiny model stands in for the shipped one
    loaded = spy_on_loading(monkeypatch)
    assert main(["ask", "What is it?", "--quantize", "4bit", "--max-new-tokens", "4"]) == 0
    (model,) = loaded
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.lm.modules())
    assert capsys.readouterr().out.strip()


def test_vlm_chat_through_stdin_turns_images_reset_and_quit(saved, capsys, monkeypatch) -> None:
    from vlm.model import Chat, VisionLanguageModel
    from vlm.processing import load_image

    picture = saved / "picture2.png"
    lines = ["What is it?", f"/image {picture}", "And this one?", "/image", "/help", "/reset", "What is it?"]
    lines += ["//reset", "/quit", "unread"]  # "//reset": the message "/reset", not the command
    stdin = io.TextIOWrapper(io.BytesIO("\n".join(lines).encode() + b"\n"), encoding="utf-8")
    monkeypatch.setattr(sys, "stdin", stdin)
    assert main(["chat", "--model", str(saved / "m"), "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr().out

    # The same turns through the library: the second turn carries the image and the first exchange; after
    # /reset the conversation starts again.
    model = VisionLanguageModel.from_pretrained(saved / "m")
    chat = Chat(model)
    first = "".join(chat.send("What is it?", max_new_tokens=6))
    second = "".join(chat.send("And this one?", [load_image(picture)], max_new_tokens=6))
    restarted = Chat(model)
    again = "".join(restarted.send("What is it?", max_new_tokens=6))
    escaped = "".join(restarted.send("/reset", max_new_tokens=6))
    # the answers tell the paths apart: without the image, or without the reset, they would differ
    assert second != "".join(Chat(model).send("And this one?", max_new_tokens=6))
    assert again == first
    assert out == (
        "Chat with the model. /image PATH adds an image to your next message; /reset; /quit.\n"
        f"you> vlm> {first}\n"
        f"you> (image {picture} goes with your next message)\n"
        f"you> vlm> {second}\n"
        "you> (error: /image needs the image's path: /image PATH)\n"
        "you> (error: no command /help: /image PATH, /reset, /quit; start with // to send a /)\n"
        "you> "  # /reset
        f"you> vlm> {again}\n"
        f"you> vlm> {escaped}\n"
        "you> "  # /quit: the line after it is never read
    )
    assert stdin.readline() == "unread\n"


def test_vlm_eval_captions_on_a_jsonl(saved, tmp_path, capsys) -> None:
    from vlm.conversation import user
    from vlm.evaluate import DEFAULT_CAPTION_PROMPT
    from vlm.metrics import caption_scores
    from vlm.model import VisionLanguageModel

    model = VisionLanguageModel.from_pretrained(saved / "m")
    pictures = [saved / f"picture{n}.png" for n in range(3)]
    asked = [[user(DEFAULT_CAPTION_PROMPT, [p])] for p in pictures]
    predictions = model.generate(asked, max_new_tokens=32)  # batched = one by one: tests/test_generation.py
    captions = [[predictions[0]], ["a red square", "a square"], ["a blue square on white"]]
    data = tmp_path / "captions.jsonl"
    data.write_text(
        "".join(
            json.dumps({"image": str(p), "captions": c}) + "\n"
            for p, c in zip(pictures, captions, strict=True)
        )
    )
    out = tmp_path / "pred.jsonl"
    argv = ["eval", str(saved / "m"), "--task", "caption", "--data", str(data), "--batch-size", "2"]
    assert main([*argv, "--out", str(out)]) == 0
    report = capsys.readouterr().out
    scores = caption_scores(predictions, captions)
    assert scores.cider > 0  # the first row's reference is its prediction: a score that reads the predictions
    assert report.startswith(f"caption: bleu4 {scores.bleu4:.4f}, cider {scores.cider:.4f} on 3 examples"), (
        report
    )
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prediction"] for r in records] == predictions
    assert [r["image"] for r in records] == [str(p) for p in pictures]
    assert main(["eval", str(saved / "m"), "--task", "chat", "--data", "easy-vqa"]) == 2  # no conversations
    assert "easy-vqa: a packaged source of kind vqa or caption, not chat" in capsys.readouterr().err


def test_vlm_eval_and_merge_on_a_saved_model(saved, tmp_path, capsys) -> None:
    from vlm.lora import lora_modules
    from vlm.model import VisionLanguageModel

    out = tmp_path / "pred.jsonl"
    assert main(["eval", str(saved / "m"), "--data", "easy-vqa", "--limit", "6", "--out", str(out)]) == 0
    assert "accuracy" in capsys.readouterr().out
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 6 and all({"question", "answers", "prediction"} <= r.keys() for r in records)

    assert main(["merge", str(saved / "m"), str(tmp_path / "merged")]) == 0
    merged = VisionLanguageModel.from_pretrained(tmp_path / "merged")
    assert lora_modules(merged) == [] and (tmp_path / "merged" / "lm" / "model.safetensors").is_file()
    assert main(["merge", str(tmp_path / "merged"), str(tmp_path / "again")]) == 2  # nothing left to merge


def test_vlm_eval_suite_prints_the_table_and_writes_its_summary(saved, tmp_path, capsys) -> None:
    from vlm.skills import SKILLS

    out = tmp_path / "eval.json"
    assert main(["eval", str(saved / "m"), "--suite", "skills", "--limit", "1", "--summary", str(out)]) == 0
    printed = capsys.readouterr().out
    rows = [line for line in printed.splitlines() if line.startswith("| ")]
    assert len(rows) == 1 + len(SKILLS)  # the header, then a row per skill
    summary = json.loads(out.read_text())
    assert [s["skill"] for s in summary["skills"]] == [s.name for s in SKILLS]
    assert all(s["questions"] == 1 for s in summary["skills"])
    # a blind guess beside every accuracy (from ten training questions a test question), none for captions
    assert all((s["guess"] is None) == (s["metric"] == "cider") for s in summary["skills"])
    assert all(0 <= s["guess"] <= 1 for s in summary["skills"] if s["guess"] is not None)
    assert summary["command"] == f"vlm eval {saved / 'm'} --suite skills --limit 1"


# -- vlm demo: the command serving the real app ---------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_lines(stream, into: queue.Queue) -> None:
    """Every line of `stream`, then None at its end (the process exited). Reading on keeps the pipe drained."""
    for line in stream:
        into.put(line)
    into.put(None)


def start_demo(model_dir: Path, attempts: int = 3) -> tuple[subprocess.Popen, str]:
    """`vlm demo --model M --port P` (the installed console script) until it says where it serves. A free
    port can be taken between the look-up and the bind: then another port is tried, up to `attempts`."""
    script = Path(sys.executable).with_name("vlm")
    assert script.is_file(), f"the console script is not installed beside {sys.executable}: run make setup"
    seen = []
    for _ in range(attempts):
        command = [str(script), "demo", "--model", str(model_dir), "--port", str(free_port())]
        env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        )
        lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=read_lines, args=(process.stdout, lines), daemon=True).start()
        while (line := lines.get(timeout=180)) is not None:  # the stream ends when the process exits
            seen.append(line)
            if line.startswith("vlm demo running at "):
                return process, line.removeprefix("vlm demo running at ").strip()
        process.wait()
        if "port" not in "".join(seen[-5:]).lower():
            break
    raise AssertionError("vlm demo did not start:\n" + "".join(seen))


def test_vlm_demo_serves_the_app_until_interrupted(saved) -> None:
    from gradio_client import Client, handle_file

    from vlm.model import VisionLanguageModel

    process, url = start_demo(saved / "m")
    try:
        assert httpx.get(url, timeout=60).status_code == 200
        picture, question = saved / "picture0.png", "What shape is in the image?"
        answer = Client(url, verbose=False).predict(
            handle_file(str(picture)), question, 8, 0.0, 1.0, api_name="/ask"
        )
        expected = VisionLanguageModel.from_pretrained(saved / "m").ask(picture, question, max_new_tokens=8)
        assert answer == expected
        process.send_signal(signal.SIGINT)  # Ctrl-C in the terminal
        assert process.wait(timeout=60) in (0, 130)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
