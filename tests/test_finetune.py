"""train/finetune.py on a tiny random LM saved to a folder: steps, what trains, resume after SIGKILL, DDP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from scripts import ROOT, load_script

from vlm.config import dump, load_config
from vlm.data import to_conversation
from vlm.model import VisionLanguageModel

SCRIPT = ROOT / "train" / "finetune.py"
ft = load_script("finetune")


@pytest.fixture(scope="module")
def tiny_lm_folder(parts, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-lm")
    lm, tokenizer = parts
    lm.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def config(tmp_path: Path, lm: Path, **train) -> object:
    overrides = [
        f"--model.lm={lm}", "--model.image_size=32", "--model.hidden_size=32", "--model.intermediate_size=64",
        "--model.num_hidden_layers=2", "--model.num_attention_heads=2", "--model.system_prompt=Answer briefly.",
        "--lora.r=4", "--lora.alpha=8", "--lora.dropout=0.0",
        "--data.train=[{kind: vqa, name: easy-vqa, limit: 8}]", "--data.eval=null",
        f"--train.out_dir={tmp_path / 'run'}", "--train.batch_size=4", "--train.warmup_steps=1", "--train.log_every=1",
        "--train.lr=5e-3", "--train.lr_projector=5e-3", "--train.bf16=false",
    ] + [f"--train.{k}={v}" for k, v in train.items()]  # fmt: skip
    return load_config(ft.FinetuneConfig, None, overrides)


def losses_by_step(run: Path) -> dict[int, float]:
    """step -> loss; a step logged twice (run before a kill, then again after the resume) keeps the last."""
    return {
        r["step"]: r["loss"]
        for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
        if "loss" in r
    }


def losses(run: Path) -> list[float]:
    return [
        r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r
    ]


def test_steps_lower_the_loss_and_train_only_lora_and_projector(tmp_path, tiny_lm_folder) -> None:
    cfg = config(tmp_path, tiny_lm_folder, steps=6, checkpoint_every=100)
    torch.manual_seed(cfg.train.seed)
    initial = ft.build_model(cfg)
    model = ft.train(cfg)
    trace = losses(tmp_path / "run")
    assert len(trace) == 6 and all(torch.isfinite(torch.tensor(trace)))
    assert trace[-1] < trace[0]  # 8 rows, 2 batches an epoch: the same data over and over
    after, before = dict(model.named_parameters()), dict(initial.named_parameters())
    base = {
        n.replace(".base_layer", ""): p for n, p in after.items() if "lora_" not in n
    }  # names before LoRA
    assert base.keys() == before.keys()
    changed = {n for n, p in base.items() if not torch.equal(p.data, before[n].data)}
    assert changed and all(n.startswith("projector.") for n in changed)
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in after.items())
    final = tmp_path / "run" / "final"
    assert (final / "adapter" / "adapter_model.safetensors").is_file() and (final / "README.md").is_file()
    reloaded = VisionLanguageModel.from_pretrained(final)
    batch = model.prepare(
        [
            [
                to_conversation(
                    {"image": ROOT / "demo/examples/chelsea.jpg", "question": "what?", "answers": ["a"]}
                )[0]
            ]
        ]
    )
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded(batch.input_ids, batch.attention_mask, batch.pixel_values).logits,
            model(batch.input_ids, batch.attention_mask, batch.pixel_values).logits,
        )


def run_script(args: list[str], **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, str(SCRIPT), *args], env=env, cwd=ROOT, **kwargs)


def as_args(cfg) -> list[str]:
    path = Path(cfg.train.out_dir).parent / "cfg.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    dump(cfg, path)
    return [str(path)]


def test_resume_after_sigkill_matches_an_uninterrupted_run(tmp_path, tiny_lm_folder) -> None:
    straight = config(tmp_path / "a", tiny_lm_folder, steps=8, checkpoint_every=1)
    assert run_script(as_args(straight)).wait(timeout=600) == 0

    killed = replace(straight, train=replace(straight.train, out_dir=str(tmp_path / "b" / "run")))
    proc = run_script(as_args(killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoints = tmp_path / "b" / "run" / "checkpoints"
    deadline = time.time() + 600
    # Kill as soon as any checkpoint is complete (only the newest two are kept, so wait for none in particular).
    while not list(checkpoints.glob("step-*/COMPLETE")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list(checkpoints.glob("step-*/COMPLETE"))
    (checkpoints / "step-00000099").mkdir()  # a checkpoint cut off mid-save: no COMPLETE marker
    resumed = run_script(
        [*as_args(killed), "--resume"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    output, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, output
    assert "ignoring incomplete checkpoint" in output and "step-00000099" in output
    assert "resumed from" in output

    # Every step's loss, the re-run ones after the resume included, equals the uninterrupted run's.
    a, b = losses_by_step(tmp_path / "a" / "run"), losses_by_step(tmp_path / "b" / "run")
    assert sorted(b) == sorted(a) == list(range(1, 9))
    assert [b[k] for k in sorted(b)] == pytest.approx([a[k] for k in sorted(a)], rel=1e-5, abs=1e-6)
    for name in ("model.safetensors", "adapter/adapter_model.safetensors"):
        want, got = load_file(tmp_path / "a/run/final" / name), load_file(tmp_path / "b/run/final" / name)
        for key in want:
            torch.testing.assert_close(got[key], want[key], atol=1e-6, rtol=1e-5)


def test_two_processes_equal_one_over_the_same_global_batch(tmp_path, tiny_lm_folder) -> None:
    # SGD: Adam's first steps are invariant to the gradient's scale, so they could not tell a mis-scaled loss.
    one = config(
        tmp_path / "one", tiny_lm_folder, steps=2, batch_size=4, checkpoint_every=100, optimizer="sgd"
    )
    two = replace(one, train=replace(one.train, batch_size=2, out_dir=str(tmp_path / "two" / "run")))
    assert run_script(as_args(one)).wait(timeout=600) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(SCRIPT),
           *as_args(two)]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    initial = ft.build_model(one)  # the same seed: the weights both runs started from
    moved = 0.0
    for name in ("model.safetensors", "adapter/adapter_model.safetensors"):
        want, got = load_file(tmp_path / "one/run/final" / name), load_file(tmp_path / "two/run/final" / name)
        for key in want:
            torch.testing.assert_close(got[key], want[key], atol=1e-6, rtol=1e-5)
            if key.startswith("projector."):
                moved += float((want[key] - initial.state_dict()[key]).abs().max())
    assert moved > 1e-4  # the step really changed the weights being compared


def test_every_shipped_yaml_loads() -> None:
    """Each YAML under configs/ names its command on the first line; it must load with that script's schema."""
    schemas = {"train/finetune.py": ft.FinetuneConfig}
    schemas["train/pretrain_siglip.py"] = load_script("pretrain_siglip").PretrainConfig
    yamls = sorted((ROOT / "configs").glob("*.yaml"))
    assert yamls
    for path in yamls:
        first = path.read_text().splitlines()[0]
        assert first.startswith("# COMMAND: "), f"{path.name} must start with '# COMMAND: ...'"
        script = next((s for s in schemas if s in first), None)
        assert script is not None, f"{path.name}: its command names no known script: {first}"
        load_config(schemas[script], path)
