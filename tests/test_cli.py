"""`vlm embed` / `vlm viz` / `vlm demo` and the `embed_images` one-liner, end to end on real files."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from hf_models import hf_vision, save
from PIL import Image

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


def test_vlm_eval_and_merge_on_a_saved_model(parts, tmp_path, capsys) -> None:
    from tiny import build

    from vlm.lora import LoraSettings, add_lora, lora_modules, save_adapter
    from vlm.model import VisionLanguageModel

    model = build(parts)
    settings = LoraSettings(r=2, alpha=4, dropout=0.0)
    add_lora(model, settings)
    model.save_pretrained(tmp_path / "m")
    save_adapter(model, tmp_path / "m" / "adapter", settings)
    lm_dir = tmp_path / "lm"  # the tiny LM lives in a folder, named by the model's config
    parts[0].save_pretrained(lm_dir)
    parts[1].save_pretrained(lm_dir)
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "lm_source": str(lm_dir)}))

    out = tmp_path / "pred.jsonl"
    assert main(["eval", str(tmp_path / "m"), "--data", "easy-vqa", "--limit", "6", "--out", str(out)]) == 0
    assert "accuracy" in capsys.readouterr().out
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 6 and all({"question", "answers", "prediction"} <= r.keys() for r in records)

    assert main(["merge", str(tmp_path / "m"), str(tmp_path / "merged")]) == 0
    merged = VisionLanguageModel.from_pretrained(tmp_path / "merged")
    assert lora_modules(merged) == [] and (tmp_path / "merged" / "lm" / "model.safetensors").is_file()
    assert main(["merge", str(tmp_path / "merged"), str(tmp_path / "again")]) == 2  # nothing left to merge
