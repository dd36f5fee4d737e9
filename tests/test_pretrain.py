"""train/pretrain_siglip.py on a tiny tower and 8 coloured-shape pairs: learning, resume, the saved folders,
the tokenizer, the evaluation baselines, two processes against one, and the shipped YAML."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from needs import cpu_env, missing, pin_cpu
from PIL import Image, ImageDraw
from safetensors.torch import load_file
from scripts import ROOT, load_script

from vlm.config import dump, load_config
from vlm.data import SOURCES, SourceUnavailable
from vlm.processing import SiglipImageProcessor
from vlm.siglip_eval import caption_transfer_recall, pixel_nearest, raw_pixels
from vlm.siglip_model import retrieval_recall
from vlm.weights import load_siglip_model, load_vision_encoder
from vlm.zeroshot import tokenize

SCRIPT = ROOT / "train" / "pretrain_siglip.py"
pt = load_script("pretrain_siglip")

COLOURS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 180, 60), "yellow": (240, 220, 20)}


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> Path:
    """8 pairs: a red/blue/green/yellow square or circle on white, captioned "a red square", ..."""
    folder = tmp_path_factory.mktemp("shapes")
    rows = []
    for name, rgb in COLOURS.items():
        for shape in ("square", "circle"):
            image = Image.new("RGB", (32, 32), "white")
            draw = ImageDraw.Draw(image)
            (draw.rectangle if shape == "square" else draw.ellipse)((4, 4, 27, 27), fill=rgb)
            image.save(folder / f"{name}_{shape}.png")
            rows.append({"image": f"{name}_{shape}.png", "text": f"a {name} {shape}"})
    path = folder / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(autouse=True)
def _cpu(monkeypatch) -> None:
    """These tests compare the trained model with CPU computations: training runs on the CPU everywhere."""
    pin_cpu(monkeypatch)


@pytest.fixture(autouse=True)
def _data_cache(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("VLM_CACHE", str(tmp_path / "cache"))  # built datasets stay out of ~/.cache


def config(run: Path, pairs: Path, **train) -> pt.PretrainConfig:
    overrides = [
        "--model.vision={image_size: 32, patch_size: 8, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, num_attention_heads: 2}",
        "--model.text={hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 2, max_position_embeddings: 8, vocab_size: 300}",
        f"--data.train=[{{name: {pairs}}}]", "--eval.zero_shot_limit=0", "--eval.retrieval=[]",
        f"--train.out_dir={run}", "--train.batch_size=8", "--train.warmup_steps=1", "--train.log_every=1",
        "--train.lr=5e-3", "--train.bf16=false", "--train.checkpoint_every=100",
    ] + [f"--train.{k}={v}" for k, v in train.items()]  # fmt: skip
    return load_config(pt.PretrainConfig, None, overrides)


def losses(run: Path) -> list[float]:
    return [
        r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r
    ]


def pixels_and_ids(pairs: Path, tokenizer, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    pixels = SiglipImageProcessor(32)([pairs.parent / r["image"] for r in rows])
    return pixels, tokenize(tokenizer, [r["text"] for r in rows], length)


def test_training_learns_the_pairs_and_the_final_folders_load(tmp_path, pairs_file) -> None:
    from transformers import AutoTokenizer
    from transformers import SiglipModel as HFSiglipModel

    run = tmp_path / "run"
    model, tokenizer = pt.train(config(run, pairs_file, steps=100, lr=3e-3))
    trace = losses(run)
    assert len(trace) == 100 and all(map(torch.isfinite, torch.tensor(trace)))
    # The same 8 pairs every step. Moving the bias alone reaches the loss of a model that cannot tell the
    # pairs apart (p = 1/8 for every pair: ln 8 + 7 ln(8/7) = 3.01); only matching goes below it.
    collapsed = math.log(8) + 7 * math.log(8 / 7)
    assert trace[0] > collapsed and sum(trace[-5:]) / 5 < collapsed - 0.5
    pixels, ids = pixels_and_ids(pairs_file, tokenizer, 8)
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=pixels)
    assert retrieval_recall(out.image_embeds, out.text_embeds)["image_to_text@1"] > 1 / 8  # above chance

    final = run / "final"
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= {
        p.name for p in final.iterdir()
    }
    assert (run / "curves.png").is_file() and (run / "config.yaml").is_file()
    reloaded, reloaded_tokenizer = load_siglip_model(final), AutoTokenizer.from_pretrained(final)
    assert torch.equal(
        tokenize(reloaded_tokenizer, ["a red square"], 8), tokenize(tokenizer, ["a red square"], 8)
    )
    reference = HFSiglipModel.from_pretrained(final).eval()  # a genuine transformers SiglipModel checkpoint
    vision = load_vision_encoder(final / "vision")
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded(input_ids=ids, pixel_values=pixels).logits_per_image, out.logits_per_image
        )
        torch.testing.assert_close(
            reference(input_ids=ids, pixel_values=pixels).logits_per_image,
            out.logits_per_image,
            atol=1e-5,
            rtol=1e-5,
        )
        torch.testing.assert_close(vision(pixels).pooler_output, model.get_image_features(pixels))  # fmt: skip


def test_resume_takes_the_steps_an_uninterrupted_run_takes(tmp_path, pairs_file) -> None:
    straight = config(tmp_path / "a", pairs_file, steps=4, checkpoint_every=2, batch_size=4)
    pt.train(straight)
    # A run that died after its step-2 checkpoint: what it leaves on disk is run a's up to step 2.
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step-00000004")
    shutil.rmtree(tmp_path / "b" / "final")
    metrics = tmp_path / "b" / "metrics.jsonl"
    metrics.write_text("".join(line + "\n" for line in metrics.read_text().splitlines()[:2]))
    resumed = replace(straight, train=replace(straight.train, out_dir=str(tmp_path / "b")))
    pt.train(resumed, resume=True)

    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert len(b) == 4 and b[2:] == pytest.approx(a[2:], rel=1e-5, abs=1e-6)  # steps 3 and 4
    want, got = (
        load_file(tmp_path / "a/final/model.safetensors"),
        load_file(tmp_path / "b/final/model.safetensors"),
    )
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=1e-6, rtol=1e-5)


def test_tokenizer_pads_to_the_fixed_length_and_keeps_eos(tmp_path) -> None:
    from transformers import AutoTokenizer

    tokenizer = pt.train_tokenizer(["a photo of a sneaker", "An emoji of a red apple"] * 3, 300, 6)
    tokenizer.save_pretrained(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    ids = tokenize(tokenizer, ["a sneaker", "AN EMOJI OF A RED APPLE AND A PHOTO OF A SNEAKER"], 6)
    assert ids.shape == (2, 6) and (pad, eos) == (0, 1)
    assert ids[0, -1] == pad and eos in ids[0].tolist()  # short: ends in </s> then <pad>
    assert ids[1, -1] == eos  # truncated, </s> kept at the last position
    lower = tokenize(tokenizer, ["an emoji of a red apple and a photo of a sneaker"], 6)[0]
    assert torch.equal(ids[1], lower)  # lower-cased
    unseen = tokenize(tokenizer, ["ünïcode ✓"], 24)[0]  # byte-level: no text is out of vocabulary
    assert tokenizer.decode(unseen, skip_special_tokens=True).strip() == "ünïcode ✓"


def test_raw_pixel_baselines(tmp_path, pairs_file) -> None:
    data = pt.load_source(pt.Source(str(pairs_file)), 32)
    queries = raw_pixels(data["image"], 32)
    assert pixel_nearest(queries[[5, 2]], [data.select([0, 1]), data], 32) == [(1, 5), (1, 2)]
    # each image finds itself in the gallery, borrows its own caption, and every caption is distinct
    recall = caption_transfer_recall(queries, data["text"], [data], 32)
    assert recall["image_to_text@1"] == recall["text_to_image@1"] == 1.0
    # A gallery of one image: every image borrows caption 0, so only image 0 finds its caption first, and
    # seen from a caption all images are equal: a tie, which counts against the match.
    recall = caption_transfer_recall(queries, data["text"], [data.select([0])], 32)
    assert recall["image_to_text@1"] == 1 / 8 and recall["text_to_image@1"] == 0.0


def test_evaluation_reports_model_and_baselines(tmp_path, pairs_file) -> None:
    try:
        SOURCES["fashion_mnist"](split="test", size=32, limit=1)
    except SourceUnavailable as err:
        missing(f"Debian's dataset-fashion-mnist is not installed: {err}")
    cfg = pt.EvalSection(
        zero_shot_limit=20, retrieval=(pt.Source(str(pairs_file)),), baseline_limit=30, easy_vqa_limit=40
    )
    train = pt.load_sources((pt.Source(str(pairs_file)),), 32, print)
    tokenizer = pt.train_tokenizer(["a photo of a sneaker", "a red square"], 300, 8)
    model = pt.build_model(config(tmp_path, pairs_file), tokenizer)
    result = pt.build_evaluator(cfg, train, 32, print)(model, tokenizer)
    assert result["zeroshot_images"] == 20 and result["zeroshot_pixel_gallery"] == 30
    assert result["retrieval_pairs"] == 8 and result["retrieval_image_to_text@1_pixel"] == 1.0
    assert result["retrieval_image_to_text@5_chance"] == 5 / 8 and result["zeroshot_top1_chance"] == 0.1
    assert 30 <= result["easy_vqa_images"] <= 40  # images whose questions tell both shape and colour
    metrics = (
        "zeroshot_top1",
        "zeroshot_top1_pixel",
        "retrieval_text_to_image@1",
        "easy_vqa_shape",
        "easy_vqa_color",
    )
    assert all(0 <= result[k] <= 1 for k in metrics)
    assert model.training  # the evaluator puts the model back as it found it


def test_two_processes_equal_one_over_the_same_global_batch(tmp_path, pairs_file) -> None:
    """The ring-chunked loss under DDP: 2 processes x 4 pairs take the same step as 1 process x 8."""
    # SGD: Adam's first steps are invariant to the gradient's scale, so they could not tell a mis-scaled loss.
    one = config(tmp_path / "one", pairs_file, steps=2, optimizer="sgd", lr=0.5, batch_size=8)
    two = replace(one, train=replace(one.train, batch_size=4, out_dir=str(tmp_path / "two")))
    pt.train(one)
    path = tmp_path / "two.yaml"
    dump(two, path)
    # the tokenizer and data cache are built again in the subprocesses: same captions, same vocabulary
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(SCRIPT),
        str(path),
    ]
    done = subprocess.run(
        cmd,
        env=cpu_env(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1"),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-5)
    want, got = (
        load_file(tmp_path / "one/final/model.safetensors"),
        load_file(tmp_path / "two/final/model.safetensors"),
    )
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=1e-6, rtol=1e-5)


def test_the_shipped_yaml_builds_the_described_model() -> None:
    path = ROOT / "configs" / "siglip_tiny_offline.yaml"
    assert path.read_text().splitlines()[0].startswith("# COMMAND: python train/pretrain_siglip.py")
    cfg = load_config(pt.PretrainConfig, path)
    model = pt.build_model(cfg, pt.train_tokenizer(["a photo of a sneaker"], 300, 16))
    v, t = model.config.vision_config, model.config.text_config
    assert (v.image_size, v.patch_size, v.hidden_size, v.num_hidden_layers, v.num_attention_heads) == (
        64,
        8,
        192,
        6,
        3,
    )
    assert v.intermediate_size == 768 and v.vision_use_head and t.projection_size == 192
    assert 16 <= t.max_position_embeddings <= 24 and {s.name for s in cfg.data.train} >= {
        "emoji",
        "fashion_mnist",
    }
