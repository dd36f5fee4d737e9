"""train/finetune.py on a tiny random LM saved to a folder, under two sets of flags: plain (frozen tower, no
pooled token, one micro-batch) and the shipped recipe's (configs/easyvqa_offline.yaml at tiny shapes: the tower
trained in its own LR group, the pooled token, LoRA off for text, caption sources, max_length, mid-run
evaluation, grad_accum=2). What trains, resume after SIGKILL, two processes against one, loss scaling over
micro-batches, the vision LR group, gradient checkpointing, `train_vision: lora`, rows over max_length, and
every YAML in configs/ through a 2-step run."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from hf_models import hf_vision
from needs import cpu_env, missing, pin_cpu
from safetensors.torch import load_file
from scripts import ROOT, load_script

from vlm.config import dump, load_config
from vlm.conversation import user
from vlm.data import SOURCES, SourceUnavailable
from vlm.lora import LoraSettings, add_lora, lora_modules
from vlm.model import VisionLanguageModel
from vlm.weights import load_vision_encoder

SCRIPT = ROOT / "train" / "finetune.py"
SHIPPED = ROOT / "configs" / "easyvqa_offline.yaml"
YAMLS = sorted((ROOT / "configs").glob("*.yaml"))
ft = load_script("finetune")
pt = load_script("pretrain_siglip")


@pytest.fixture(autouse=True)
def _cpu(monkeypatch) -> None:
    """These tests compare runs with CPU computations and with each other to 1e-6: on the CPU everywhere."""
    pin_cpu(monkeypatch)


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("vlm-cache")


@pytest.fixture(autouse=True)
def _data_cache(data_cache, monkeypatch) -> None:
    monkeypatch.setenv("VLM_CACHE", str(data_cache))  # caption sources built once here, not in ~/.cache


@pytest.fixture(scope="module")
def tower(tmp_path_factory) -> Path:
    """A tiny SigLIP vision tower in transformers' format: what `model.vision` names in the shipped recipe."""
    folder = tmp_path_factory.mktemp("tower")
    hf_vision().save_pretrained(folder)
    return folder


def config(out: Path, lm: Path, **train) -> ft.FinetuneConfig:
    """Plain flags: a fresh frozen tower, patch tokens only, easy-VQA only, one micro-batch, fp32."""
    overrides = [
        f"--model.lm={lm}", "--model.image_size=32", "--model.hidden_size=32", "--model.intermediate_size=64",
        "--model.num_hidden_layers=2", "--model.num_attention_heads=2", "--model.system_prompt=Answer briefly.",
        "--lora.r=4", "--lora.alpha=8", "--lora.dropout=0.0",
        "--data.train=[{kind: vqa, name: easy-vqa, limit: 8}]", "--data.eval=null",
        f"--train.out_dir={out / 'run'}", "--train.batch_size=4", "--train.warmup_steps=1", "--train.log_every=1",
        "--train.lr=5e-3", "--train.lr_projector=5e-3", "--train.bf16=false",
    ] + [f"--train.{k}={v}" for k, v in train.items()]  # fmt: skip
    return load_config(ft.FinetuneConfig, None, overrides)


def tiny(cfg: ft.FinetuneConfig, out: Path, lm: Path, tower: Path | None, **train) -> ft.FinetuneConfig:
    """A YAML's config at tiny shapes with its flags kept: the tiny LM, a tiny tower (`tower`, when the YAML
    names a pretrained one, else a fresh 32-px one), a tiny saved model in place of a `model.init` (an earlier
    recipe step's output), 8 rows a source, 4 evaluation questions, an evaluation after every step when the
    YAML evaluates mid-run, a checkpoint and a log line every step."""
    needs_sources(cfg.data.train)
    shapes = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2)  # fmt: skip
    model = replace(cfg.model, lm=str(lm), **({"vision": str(tower)} if cfg.model.vision else shapes))
    if cfg.model.init:
        # its adapter the one the YAML's lora section describes, as the step before it saved one
        model = replace(model, init=str(saved_stand_in(out / "init", lm, ft.lora_settings(cfg))))
    data = replace(
        cfg.data,
        train=tuple(replace(s, limit=min(s.limit or 8, 8)) for s in cfg.data.train),
        eval=cfg.data.eval and replace(cfg.data.eval, limit=4),
    )
    t = cfg.train
    settings = dict(out_dir=str(out / "run"), steps=2, batch_size=2, eval_batch_size=4, checkpoint_every=1,
                    log_every=1, warmup_steps=1, eval_every=min(t.eval_every, 1))  # fmt: skip
    return replace(cfg, model=model, data=data, train=replace(t, **{**settings, **train}))


def saved_stand_in(folder: Path, lm: Path, settings: LoraSettings | None = None) -> Path:
    """What a recipe's earlier step saves (`runs/easyvqa_offline/final`: tower, pixel-shuffle projector with
    the pooled token, LoRA adapter: `settings`, else r 4, alpha 8) at tiny shapes around the tiny LM in `lm`."""
    from tiny import VISION, save_vlm

    from vlm.model import DEFAULT_CONFIG

    projector = replace(DEFAULT_CONFIG.projector, vision_hidden_size=VISION.hidden_size, text_hidden_size=48)
    config = replace(DEFAULT_CONFIG, vision=VISION, projector=projector, lm_source=str(lm))
    torch.manual_seed(3)
    model = VisionLanguageModel.build(config)
    settings = settings or LoraSettings(r=4, alpha=8, dropout=0.0)
    add_lora(model, settings)
    return save_vlm(model, folder, lm, settings)


def shipped(out: Path, lm: Path, tower: Path, **train) -> ft.FinetuneConfig:
    """configs/easyvqa_offline.yaml at tiny shapes, with grad_accum=2."""
    return tiny(load_config(ft.FinetuneConfig, SHIPPED), out, lm, tower, **{"grad_accum": 2, **train})


def needs_sources(sources) -> None:
    """The packaged caption sources a config names are installed (a failure under CI, a skip elsewhere)."""
    for source in sources:
        if source.name in SOURCES and source.name not in ("easy-vqa", "easy_vqa"):
            try:
                SOURCES[source.name](limit=1)
            except SourceUnavailable as err:
                missing(f"{source.name}: {err}")


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def losses_by_step(run: Path) -> dict[int, float]:
    """step -> loss; a step logged twice (run before a kill, then again after the resume) keeps the last."""
    return {r["step"]: r["loss"] for r in records(run) if "loss" in r}


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in records(run) if "loss" in r]


def assert_same_weights(a: Path, b: Path) -> None:
    """Two runs' final/ folders hold the same weights (model and LoRA adapter)."""
    for name in ("model.safetensors", "adapter/adapter_model.safetensors"):
        want, got = load_file(a / "final" / name), load_file(b / "final" / name)
        assert want.keys() == got.keys()
        for key in want:
            torch.testing.assert_close(got[key], want[key], atol=1e-6, rtol=1e-5, msg=key)


def as_args(cfg) -> list[str]:
    path = Path(cfg.train.out_dir).parent / "cfg.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    dump(cfg, path)
    return [str(path)]


def one_picture_batch(model: VisionLanguageModel):
    return model.prepare([[user("what?", [ROOT / "demo/examples/chelsea.jpg"])]])


def logits(model: VisionLanguageModel, batch) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(batch.input_ids, batch.attention_mask, batch.pixel_values).logits


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
    batch = one_picture_batch(model)
    torch.testing.assert_close(logits(reloaded, batch), logits(model, batch))


RECIPES = {
    "plain": lambda out, lm, tower, **train: config(out, lm, **train),
    "shipped-recipe-grad-accum-2": shipped,
}


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_resume_after_sigkill_matches_an_uninterrupted_run(
    recipe, tmp_path, tiny_lm_folder, tower, capsys
) -> None:
    straight = RECIPES[recipe](tmp_path / "a", tiny_lm_folder, tower, steps=4, checkpoint_every=1)
    ft.train(straight)

    # The same run, SIGKILLed half-way through saving its step-3 checkpoint (tests/killed_run.py).
    killed = replace(straight, train=replace(straight.train, out_dir=str(tmp_path / "b" / "run")))
    done = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "killed_run.py"), "3", *as_args(killed)],
        env=cpu_env(), cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == -signal.SIGKILL, done.stdout[-2000:] + done.stderr[-3000:]
    checkpoints = tmp_path / "b" / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("step-*")) == ["step-00000001", "step-00000002"]
    assert len(list(checkpoints.glob(".tmp-step-00000003-*"))) == 1  # the half-written one, left behind
    (checkpoints / "step-00000099").mkdir()  # and one cut off before it was renamed complete
    capsys.readouterr()
    assert ft.main([*as_args(killed), "--resume"]) == 0  # as a user re-runs the command
    output = capsys.readouterr().out
    assert "ignoring incomplete checkpoint" in output and "step-00000099" in output
    assert f"resumed from {checkpoints / 'step-00000002'} at step 2" in output

    # Every step's loss, the re-run step 3 included, equals the uninterrupted run's; so do the final weights.
    a, b = losses_by_step(tmp_path / "a" / "run"), losses_by_step(tmp_path / "b" / "run")
    assert sorted(b) == sorted(a) == list(range(1, 5))
    assert [b[k] for k in sorted(b)] == pytest.approx([a[k] for k in sorted(a)], rel=1e-5, abs=1e-6)
    assert_same_weights(tmp_path / "a" / "run", tmp_path / "b" / "run")
    if straight.data.eval is not None:  # the mid-run evaluations, before and after the kill, agree too
        evals = [{r["step"]: r["eval_accuracy"] for r in records(tmp_path / x / "run") if "eval_accuracy" in r}
                 for x in "ab"]  # fmt: skip
        assert evals[0] == evals[1] and sorted(evals[0]) == [1, 2, 3, 4]


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_two_processes_equal_one_over_the_same_global_batch(recipe, tmp_path, tiny_lm_folder, tower) -> None:
    # SGD: Adam's first steps are invariant to the gradient's scale, so they could not tell a mis-scaled loss.
    # fp32: in bf16 a row's rounding depends on the batch it shares, so differently split batches agree only to
    # bf16 precision (bf16 runs are checked by the resume and the configs tests).
    one = RECIPES[recipe](
        tmp_path / "one", tiny_lm_folder, tower, steps=2, batch_size=4, checkpoint_every=100, optimizer="sgd",
        bf16=False, lr=5e-3, lr_projector=5e-3, lr_vision=1e-2,
    )  # fmt: skip
    two = replace(one, train=replace(one.train, batch_size=2, out_dir=str(tmp_path / "two" / "run")))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(SCRIPT),
           *as_args(two)]  # fmt: skip
    done = subprocess.run(cmd, env=cpu_env(OMP_NUM_THREADS="1"), cwd=ROOT, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    torch.manual_seed(one.train.seed)
    initial = ft.build_model(one).state_dict()  # the same seed: the weights both runs started from
    ft.train(one)
    assert losses(tmp_path / "two" / "run") == pytest.approx(losses(tmp_path / "one" / "run"), rel=1e-5)
    assert_same_weights(tmp_path / "one" / "run", tmp_path / "two" / "run")
    want = load_file(tmp_path / "one/run/final/model.safetensors")
    trained = ("projector.", "vision.") if one.model.train_vision == "full" else ("projector.",)
    for prefix in trained:  # the steps really changed the weights being compared
        moved = max(float((want[k] - initial[k]).abs().max()) for k in want if k.startswith(prefix))
        assert moved > 1e-4, prefix


def one_step(cfg: ft.FinetuneConfig) -> tuple[dict, dict, list[int], int]:
    """One optimizer step of the script's loop (`setup`, then `fit`): the weights before and after, the learned
    tokens in each micro-batch, and how often the MLP of the LM's first decoder layer ran forward."""
    return fit_one_step(ft.setup(cfg, resume=False))


def fit_one_step(run) -> tuple[dict, dict, list[int], int]:
    """`one_step` of a run already set up."""
    before = {k: v.detach().clone() for k, v in run.core.state_dict().items()}
    tokens = [int((b.labels[:, 1:] != -100).sum()) for b in run.batches[run.step].batches]
    mlp = next(m for n, m in run.core.lm.named_modules() if n.endswith("layers.0.mlp"))
    calls, forward = [], mlp.forward

    def counted(*args, **kwargs):  # not a forward hook: the recomputation in the backward pass skips hooks
        calls.append(1)
        return forward(*args, **kwargs)

    mlp.forward = counted
    ft.fit(run)
    return before, {k: v.detach().clone() for k, v in run.core.state_dict().items()}, tokens, len(calls)


def test_accumulation_vision_lr_group_and_checkpointing_take_the_same_step(
    tmp_path, tiny_lm_folder, tower
) -> None:
    """The shipped recipe's flags, one SGD step over the same 4 rows: two micro-batches of 2 equal one batch of
    4 (loss scaled by the step's learned tokens), the tower moves by its own learning rate, and gradient
    checkpointing changes nothing but how often the LM runs forward."""

    def step(name: str, **train) -> tuple[dict, dict, list[int], int]:
        settings = dict(steps=1, batch_size=4, grad_accum=1, optimizer="sgd", bf16=False, lr=5e-2,
                        lr_projector=5e-2, lr_vision=1e-2)  # fmt: skip
        return one_step(shipped(tmp_path / name, tiny_lm_folder, tower, **{**settings, **train}))

    before, whole, _, forwards = step("whole")
    _, halves, tokens, _ = step("halves", batch_size=2, grad_accum=2, lr_vision=2e-2)
    _, checkpointed, _, recomputed = step("checkpointed", gradient_checkpointing=True)
    assert tokens[0] != tokens[1]  # a mean per micro-batch would weigh these rows differently from one batch
    assert whole.keys() == halves.keys() == checkpointed.keys()
    vision = [k for k in whole if k.startswith("vision.")]
    assert vision and any(not torch.equal(whole[k], before[k]) for k in vision)
    for key in whole:
        torch.testing.assert_close(checkpointed[key], whole[key], atol=1e-6, rtol=1e-5, msg=key)
        if key.startswith("vision."):  # lr_vision doubled: the tower's step doubles, nothing else changes
            torch.testing.assert_close(halves[key] - before[key], 2 * (whole[key] - before[key]), atol=1e-6,
                                       rtol=1e-4, msg=key)  # fmt: skip
        else:
            torch.testing.assert_close(halves[key], whole[key], atol=1e-6, rtol=1e-5, msg=key)
    assert recomputed == 2 * forwards  # checkpointing really recomputed the layer in the backward pass


def test_packed_rows_take_the_same_step(tmp_path, tiny_lm_folder, tower) -> None:
    """`data.pack`: the step's conversations packed into rows of max_length tokens take the step the padded
    batch takes (tests/test_pipeline.py checks the mask that keeps them apart)."""
    settings = dict(steps=1, batch_size=4, grad_accum=1, optimizer="sgd", bf16=False, lr=5e-2, lr_projector=5e-2,
                    lr_vision=1e-2)  # fmt: skip
    cfg = shipped(tmp_path / "padded", tiny_lm_folder, tower, **settings)
    before, padded, _, _ = one_step(cfg)
    packed_cfg = shipped(tmp_path / "packed", tiny_lm_folder, tower, **settings)
    run = ft.setup(replace(packed_cfg, data=replace(packed_cfg.data, pack=True)), resume=False)
    rows = run.batches[0].batches[0]
    assert rows.position_ids is not None and len(rows.input_ids) < 4  # several conversations to a row
    _, packed, _, _ = fit_one_step(run)
    assert any(not torch.equal(padded[k], before[k]) for k in padded)
    for key in padded:
        torch.testing.assert_close(packed[key], padded[key], atol=1e-6, rtol=1e-5, msg=key)


def test_a_run_prepared_ahead_takes_the_same_steps(tmp_path, tiny_lm_folder, tower) -> None:
    """`data.prepare_ahead`: the run reads its tokens and pixels from the files `vlm.pipeline.prepare_ahead`
    wrote, and trains exactly as the run that builds them step by step."""
    settings = dict(steps=2, batch_size=4, grad_accum=1, optimizer="sgd", bf16=False, lr=5e-2, lr_projector=5e-2,
                    lr_vision=1e-2)  # fmt: skip
    cfg = shipped(tmp_path / "built", tiny_lm_folder, tower, **settings)
    assert cfg.data.prepare_ahead is None  # the default: prepared where workers build the batches (a GPU)
    built = ft.setup(cfg, resume=False)
    assert built.batches.prepared is None and built.workers == 0
    prepared_cfg = shipped(tmp_path / "prepared", tiny_lm_folder, tower, **settings)
    run = ft.setup(replace(prepared_cfg, data=replace(prepared_cfg.data, prepare_ahead=True)), resume=False)
    assert run.batches.prepared is not None and run.batches.prepared.pixel_index
    ft.fit(built)
    ft.fit(run)
    assert losses(tmp_path / "prepared" / "run") == losses(tmp_path / "built" / "run")
    want = built.core.state_dict()
    for key, value in run.core.state_dict().items():
        assert torch.equal(value, want[key]), key


def test_train_vision_lora_adapts_only_the_towers_q_and_v_and_reloads(
    tmp_path, tiny_lm_folder, tower
) -> None:
    # fp32: accelerate wraps the trained model's forward in the run's bf16 autocast, and the reloaded model's
    # logits are compared with it below
    cfg = shipped(tmp_path, tiny_lm_folder, tower, grad_accum=1, eval_every=0, bf16=False)
    cfg = replace(cfg, model=replace(cfg.model, train_vision="lora"), data=replace(cfg.data, eval=None))
    model = ft.train(cfg)
    params = dict(model.named_parameters())
    adapted = {n.split(".lora_")[0] for n in params if n.startswith("vision.") and ".lora_" in n}
    assert adapted and all(n.endswith(("self_attn.q_proj", "self_attn.v_proj")) for n in adapted), adapted
    assert len(adapted) == 2 * 2  # q and v in each of the tower's 2 layers
    assert all(p.requires_grad == (".lora_" in n) for n, p in params.items() if n.startswith("vision."))
    pretrained = load_vision_encoder(tower).state_dict()
    for name, p in params.items():  # the tower's own weights stay as loaded; its LoRA weights learned
        if name.startswith("vision.") and ".lora_" not in name:
            torch.testing.assert_close(
                p.data, pretrained[name.removeprefix("vision.").replace(".base_layer", "")]
            )
    assert any(p.abs().sum() > 0 for n, p in params.items() if n.startswith("vision.") and "lora_B" in n)
    reloaded = VisionLanguageModel.from_pretrained(tmp_path / "run" / "final")
    batch = one_picture_batch(model)
    torch.testing.assert_close(logits(reloaded, batch), logits(model, batch))


def test_a_vlms_tower_pretrained_further_goes_back_into_it(tmp_path, tiny_lm_folder) -> None:
    """pretrain_siglip's `model.init_vision` starts the dual encoder's tower as a VLM's tower (a fresh text
    tower around it), and finetune's `model.init` + `model.vision` puts the tower it trained back into that
    VLM: projector and adapter as saved, the tower the new one. A tower of another shape is refused."""
    from hf_models import hf_vision, save

    from vlm.weights import CheckpointError

    folder = saved_stand_in(tmp_path / "vlm", tiny_lm_folder)
    saved = VisionLanguageModel.from_pretrained(folder)
    text = "{hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 2, max_position_embeddings: 8, vocab_size: 300}"
    pretrain = [
        f"--model.init_vision={folder}", f"--model.text={text}", "--data.train=[{name: easy-vqa, limit: 16}]",
        "--eval.zero_shot_limit=0", "--eval.retrieval=[]", "--eval.easy_vqa_limit=0", "--train.steps=2",
        "--train.batch_size=8", "--train.warmup_steps=1", "--train.bf16=false", "--train.lr=1e-3",
    ]  # fmt: skip
    start = pt.setup(
        load_config(pt.PretrainConfig, None, [*pretrain, f"--train.out_dir={tmp_path / 'start'}"]), False
    )
    want = saved.vision.state_dict()
    assert start.core.config.vision_config == saved.config.vision
    for key, value in start.core.vision_model.state_dict().items():
        assert torch.equal(value, want[key]), key
    siglip = tmp_path / "siglip"
    pt.train(load_config(pt.PretrainConfig, None, [*pretrain, f"--train.out_dir={siglip}"]))
    assert "the vision tower from" in (siglip / "final" / "README.md").read_text()
    further = load_vision_encoder(siglip / "final" / "vision").state_dict()
    assert not all(torch.equal(further[k], want[k]) for k in want)  # the pretraining moved it

    cfg = load_config(
        ft.FinetuneConfig, None, [f"--model.init={folder}", f"--model.vision={siglip / 'final' / 'vision'}"]
    )
    model = ft.build_model(cfg)
    for key, value in model.vision.state_dict().items():
        assert torch.equal(value, further[key]), key
    for key, value in model.projector.state_dict().items():
        assert torch.equal(value, saved.projector.state_dict()[key]), key
    other = save(hf_vision(num_hidden_layers=1), tmp_path / "one-layer")
    with pytest.raises(CheckpointError, match="not shaped like model.init's"):
        ft.build_model(replace(cfg, model=replace(cfg.model, vision=str(other))))


def test_a_tower_without_a_pooling_head_keeps_the_dual_encoders(tmp_path) -> None:
    """SmolVLM's and nanoVLM's towers have no pooling head; the sigmoid loss compares pooled embeddings, so
    the dual encoder keeps its own head and takes every other tensor from the tower. A tower the text
    tower cannot be compared with is refused."""
    from vlm.siglip import SiglipVisionConfig, SiglipVisionEncoder
    from vlm.siglip_model import SiglipConfig, SiglipModel
    from vlm.siglip_text import SiglipTextConfig
    from vlm.weights import CheckpointError

    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                image_size=32, patch_size=8)  # fmt: skip
    text = SiglipTextConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                            vocab_size=99, max_position_embeddings=8, projection_size=32)  # fmt: skip
    dual = SiglipModel(SiglipConfig(text, vision))
    headless = SiglipVisionEncoder(replace(vision, vision_use_head=False, num_hidden_layers=3))
    out = pt.with_tower(dual, headless, "headless")
    assert out.config.vision_config == replace(vision, num_hidden_layers=3)
    tower, ours = headless.state_dict(), out.vision_model.state_dict()
    assert all(torch.equal(ours[k], v) for k, v in tower.items())
    assert all(
        torch.equal(ours[k], v) for k, v in dual.vision_model.state_dict().items() if k.startswith("head.")
    )
    assert all(
        torch.equal(v, dual.text_model.state_dict()[k]) for k, v in out.text_model.state_dict().items()
    )
    with pytest.raises(CheckpointError, match="48 wide"):
        pt.with_tower(
            dual, SiglipVisionEncoder(replace(vision, hidden_size=48, intermediate_size=96)), "wide"
        )


def test_rows_over_max_length_are_skipped_and_counted(tmp_path, tiny_lm_folder, capsys) -> None:
    from PIL import Image

    Image.new("RGB", (40, 30), (20, 200, 20)).save(tmp_path / "green.png")
    rows = [{"image": "green.png", "question": f"colour {i}?", "answers": ["green"]} for i in range(3)]
    rows.insert(1, {"image": "green.png", "question": "why " * 100 + "?", "answers": ["green"]})
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = config(tmp_path, tiny_lm_folder, steps=2, batch_size=2, checkpoint_every=100)
    data = replace(cfg.data, train=(ft.Source("vqa", str(tmp_path / "rows.jsonl")),), max_length=64)
    capsys.readouterr()
    ft.train(replace(cfg, data=data))
    log = capsys.readouterr().out
    assert "training rows: skipped 1 of 4 rows: 1 longer than data.max_length" in log
    assert "data.train[0] row 1: " in log and "over the limit" in log
    trace = losses(tmp_path / "run")
    assert len(trace) == 2 and all(math.isfinite(x) for x in trace)


@pytest.mark.gpu
def test_on_a_gpu_the_script_trains_there_as_it_does_on_the_cpu(
    tmp_path, tiny_lm_folder, monkeypatch
) -> None:
    cpu = config(tmp_path / "cpu", tiny_lm_folder, steps=2, checkpoint_every=100, optimizer="sgd")
    ft.train(cpu)
    monkeypatch.delenv("ACCELERATE_USE_CPU")  # unpinned: the script picks the GPU itself
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    model = ft.train(replace(cpu, train=replace(cpu.train, out_dir=str(tmp_path / "gpu" / "run"))))
    assert {p.device.type for p in model.parameters()} == {"cuda"}
    # TF32 convolutions and other kernels: equal to CPU within float noise, not bit for bit
    assert losses(tmp_path / "gpu" / "run") == pytest.approx(losses(tmp_path / "cpu" / "run"), rel=1e-3)
    for name in ("model.safetensors", "adapter/adapter_model.safetensors"):
        want, got = load_file(tmp_path / "cpu/run/final" / name), load_file(tmp_path / "gpu/run/final" / name)
        for key in want:
            torch.testing.assert_close(got[key], want[key], atol=1e-4, rtol=1e-3, msg=key)


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.name)
def test_every_shipped_yaml_runs_two_steps_at_tiny_shapes(path, tmp_path, tiny_lm_folder, tower) -> None:
    """Each YAML under configs/ names its command on the first line; with its flags as they are and its sizes
    shrunk, that script runs it for 2 steps, evaluating as the YAML asks, and saves the final model. A hub
    dataset it names is read from a local stand-in with the hub set's columns, subsets and splits (`offline`),
    so its `columns`, `subset`, `split` and `streaming` are exercised without a network."""
    first = path.read_text().splitlines()[0]
    assert first.startswith("# COMMAND: "), f"{path.name} must start with '# COMMAND: ...'"
    if "train/finetune.py" in first:
        cfg = offline(load_config(ft.FinetuneConfig, path), tmp_path / "hub")
        cfg = tiny(cfg, tmp_path, tiny_lm_folder, tower)
        ft.train(cfg)
        evals = {EVAL_KEYS[cfg.data.eval.kind]} if cfg.data.eval is not None else set()
    elif "train/pretrain_siglip.py" in first:
        cfg = tiny_pretrain(load_config(pt.PretrainConfig, path), tmp_path)
        pt.train(cfg)
        evals = {"eval_easy_vqa_shape", "eval_retrieval_image_to_text@1", "eval_zeroshot_top1"}
    else:
        pytest.fail(f"{path.name}: its command names no known script: {first}")
    run = Path(cfg.train.out_dir)
    trace = losses(run)
    assert len(trace) == 2 and all(math.isfinite(x) for x in trace)
    for key in evals:  # mid-run (step 1) where the YAML evaluates mid-run, and at the end (step 2)
        steps = [r["step"] for r in records(run) if key in r]
        assert steps == ([1, 2] if cfg_evaluates_mid_run(cfg) else [2]), (key, steps)
    assert (run / "final" / "config.json").is_file() and (run / "final" / "README.md").is_file()


EVAL_KEYS = {"vqa": "eval_accuracy", "chat": "eval_accuracy", "caption": "eval_cider"}  # data.eval's kind


def offline(cfg: ft.FinetuneConfig, folder: Path) -> ft.FinetuneConfig:
    """`cfg` with every hub dataset its data sources name replaced by a local stand-in (`HUB_STAND_INS`) under
    `folder`: the entry's kind, subset, split, columns, streaming and limit kept, only `name` changed."""

    def local(source):
        if not is_hub_id(source.name):
            return source
        if source.name not in HUB_STAND_INS:
            pytest.fail(
                f"{source.name}: a hub dataset with no offline stand-in; add one to HUB_STAND_INS in "
                f"{Path(__file__).name}, with the columns, subsets and splits its dataset card lists"
            )
        return replace(source, name=str(HUB_STAND_INS[source.name](folder, source.subset)))

    d = cfg.data
    return replace(cfg, data=replace(d, train=tuple(map(local, d.train)), eval=d.eval and local(d.eval)))


def is_hub_id(name: str) -> bool:
    """Not a packaged source, an existing path or a file name: `vlm.data.named.open_data` asks the hub."""
    from vlm.data.named import FILE_TYPES, GENERATED

    path = Path(name).expanduser()
    looks_local = path.suffix.lower() in FILE_TYPES or name.startswith((".", "/", "~"))
    packaged = name in SOURCES or name in GENERATED or name in ("easy-vqa", "easy_vqa")
    return not packaged and not looks_local and not path.exists()


def png(color: str) -> bytes:
    """A 16x16 PNG of one colour."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), color).save(buffer, format="PNG")
    return buffer.getvalue()


STAND_IN_COLORS = ("red", "green", "blue", "yellow", "red", "green", "blue", "yellow")  # 8 rows a split


def hub_folder(
    folder: Path, name: str, configs: dict[str, dict[str, str]], tables: dict[str, object]
) -> Path:
    """A local folder laid out like a hub dataset repository: `tables` (path -> `datasets.Dataset`) written as
    Parquet, and a README.md whose `configs:` YAML maps each subset's splits to those files, as the hub's
    dataset cards do; `load_dataset(folder, subset, split=...)` then reads it as it reads the hub id."""
    root = folder / name.replace("/", "--")
    for relative, table in tables.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        table.to_parquet(root / relative)
    lines = ["---", "configs:"]
    for subset, splits in configs.items():
        lines += [f"- config_name: {subset}", "  data_files:"]
        lines += [f"  - split: {split}\n    path: {pattern}" for split, pattern in splits.items()]
    (root / "README.md").write_text("\n".join([*lines, "---", f"Offline stand-in for {name}.", ""]))
    return root


def vqav2_lmms_lab(folder: Path, subset: str | None) -> Path:
    """lmms-lab/VQAv2's layout and columns (its dataset card: one `default` subset, splits validation, testdev
    and test in data/<split>-*.parquet): question_type, multiple_choice_answer, answers (10 x {answer,
    answer_confidence, answer_id}), image_id, answer_type, question_id, question, image."""
    import datasets

    assert subset in (None, "default"), f"lmms-lab/VQAv2 has one subset, default; not {subset!r}"
    features = datasets.Features(
        question_type=datasets.Value("string"),
        multiple_choice_answer=datasets.Value("string"),
        answers=datasets.List(
            {
                "answer": datasets.Value("string"),
                "answer_confidence": datasets.Value("string"),
                "answer_id": datasets.Value("int64"),
            }
        ),
        image_id=datasets.Value("int64"),
        answer_type=datasets.Value("string"),
        question_id=datasets.Value("int64"),
        question=datasets.Value("string"),
        image=datasets.Image(),
    )
    rows = [
        {
            "question_type": "what color is the",
            "multiple_choice_answer": color,
            "answers": [
                {
                    "answer": color if k < 8 else f"dark {color}",
                    "answer_confidence": "yes",
                    "answer_id": k + 1,
                }
                for k in range(10)
            ],
            "image_id": i,
            "answer_type": "other",
            "question_id": 1000 * i,
            "question": "What color is the picture?",
            "image": {"bytes": png(color), "path": None},
        }
        for i, color in enumerate(STAND_IN_COLORS)
    ]
    table = datasets.Dataset.from_list(rows, features=features)
    splits = ("validation", "testdev", "test")
    return hub_folder(
        folder,
        "lmms-lab/VQAv2",
        {"default": {s: f"data/{s}-*" for s in splits}},
        {f"data/{s}-00000-of-00001.parquet": table for s in splits},
    )


def the_cauldron(folder: Path, subset: str | None) -> Path:
    """HuggingFaceM4/the_cauldron's layout and columns (its dataset card: one subset per source set, each
    with a train split only in <subset>/train-*.parquet): images (a list of images) and texts (a list of
    {user, assistant, source} turns). The text is made up; the columns are the card's."""
    import datasets

    assert subset is not None, "the_cauldron needs a subset (vqav2, ai2d, ...)"
    features = datasets.Features(
        images=datasets.List(datasets.Image()),
        texts=datasets.List(
            {
                "user": datasets.Value("string"),
                "assistant": datasets.Value("string"),
                "source": datasets.Value("string"),
            }
        ),
    )
    rows = [
        {
            "images": [{"bytes": png(color), "path": None}],
            "texts": [
                {
                    "user": "What color is the picture?",
                    "assistant": f"{color.capitalize()}.",
                    "source": subset,
                },
                {"user": "Is it one color?", "assistant": "Yes.", "source": subset},
            ],
        }
        for color in STAND_IN_COLORS
    ]
    table = datasets.Dataset.from_list(rows, features=features)
    return hub_folder(
        folder,
        "HuggingFaceM4/the_cauldron",
        {subset: {"train": f"{subset}/train-*"}},
        {f"{subset}/train-00000-of-00001.parquet": table},
    )


# hub id -> a function (folder, subset) writing its stand-in and returning the folder to name instead
HUB_STAND_INS = {"lmms-lab/VQAv2": vqav2_lmms_lab, "HuggingFaceM4/the_cauldron": the_cauldron}


def cfg_evaluates_mid_run(cfg) -> bool:
    return (cfg.train.eval_every if isinstance(cfg, ft.FinetuneConfig) else cfg.eval.every) > 0


def tiny_pretrain(cfg: pt.PretrainConfig, out: Path) -> pt.PretrainConfig:
    """A pretraining YAML at tiny shapes with its flags kept (sources, weights, evaluations): a 32-px tower, a
    1-layer text tower, 8 rows a source, a few evaluation images, an evaluation after step 1."""
    needs_sources([*cfg.data.train, *cfg.eval.retrieval])
    vision = pt.VisionSection(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=2, num_attention_heads=2)  # fmt: skip
    text = replace(cfg.model.text, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                   vocab_size=300)  # fmt: skip
    e = cfg.eval
    return replace(
        cfg,
        model=replace(cfg.model, vision=vision, text=text),
        data=replace(cfg.data, train=tuple(replace(s, limit=8) for s in cfg.data.train)),
        eval=replace(
            e,
            every=min(e.every, 1),
            zero_shot_limit=min(e.zero_shot_limit, 8),
            baseline_limit=8,
            retrieval=tuple(replace(s, limit=4) for s in e.retrieval),
            batch_size=8,
            easy_vqa_limit=min(e.easy_vqa_limit, 8),
        ),  # fmt: skip
        train=replace(
            cfg.train,
            out_dir=str(out / "run"),
            steps=2,
            batch_size=8,
            checkpoint_every=1,
            log_every=1,
            warmup_steps=1,
        ),  # fmt: skip
    )


def test_an_init_models_adapter_is_trained_on_only_as_the_config_describes_it(
    tmp_path, tiny_lm_folder, capsys
) -> None:
    """A run from a saved model trains that model's adapter and saves it under the config's lora section: a
    rank, alpha or target that differ from the adapter's would save one that fails to load or loads scaled
    wrongly (alpha / r), so they are refused, before any step, with what differs and the two ways on. The
    dropout is the run's: the adapter's layers take it."""
    folder = saved_stand_in(
        tmp_path / "init", tiny_lm_folder
    )  # r 4, alpha 8, dropout 0, the LM's projections
    base = [
        f"--model.init={folder}", "--data.train=[{kind: vqa, name: easy-vqa, limit: 8}]", "--data.eval=null",
        f"--train.out_dir={tmp_path / 'run'}", "--train.steps=1", "--train.batch_size=2", "--train.warmup_steps=1",
        "--train.bf16=false", "--train.checkpoint_every=100",
    ]  # fmt: skip
    for flags, differs in [
        (["--lora.r=8", "--lora.alpha=8"], "r 4, not 8"),
        (["--lora.r=4", "--lora.alpha=32"], "alpha 8, not 32"),
        (
            ["--lora.r=4", "--lora.alpha=8", r"--lora.target=lm\.model\.layers\.\d+\.self_attn\.(q|v)_proj"],
            "target",
        ),
        (["--lora.r=4", "--lora.alpha=8", "--model.train_vision=lora"], "modules it lacks (vision.encoder"),
    ]:
        assert ft.main([*base, *flags]) == 2
        (error,) = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
        assert (
            error.startswith("error: model.init's LoRA adapter") and differs in error and "vlm merge" in error
        )
        assert not (tmp_path / "run" / "final").exists()

    cfg = load_config(ft.FinetuneConfig, None, [*base, "--lora.r=4", "--lora.alpha=8", "--lora.dropout=0.25"])
    model = ft.build_model(cfg)
    ft.make_trainable(model, ft.lora_settings(cfg), gradient_checkpointing=False)
    dropouts = [m.lora_dropout["default"] for n, m in model.named_modules() if n in lora_modules(model)]
    assert dropouts and all(isinstance(d, torch.nn.Dropout) and d.p == 0.25 for d in dropouts)
    ft.train(cfg)
    saved = json.loads((tmp_path / "run" / "final" / "adapter" / "adapter_config.json").read_text())
    assert (saved["r"], saved["lora_alpha"]) == (4, 8)
    VisionLanguageModel.from_pretrained(tmp_path / "run" / "final")  # loads: the adapter fits its settings
