"""Published VLMs in and out: SmolVLM / Idefics3 and LLaVA (SigLIP tower) checkpoints load into
`VisionLanguageModel` with transformers' own prompts, pixels, logits and greedy text, and ours export to
transformers folders that give the same logits (tiny random models built in tests/hf_vlms.py, no downloads)."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from hf_vlms import reference, save_tiny_vlm, test_image
from safetensors.torch import load_file, save_file
from tiny import build
from transformers import AutoModelForImageTextToText, Idefics3Config
from transformers.models.idefics3.modeling_idefics3 import Idefics3Connector

from vlm.checks import CheckpointError
from vlm.conversation import user
from vlm.lora import LoraSettings, add_lora
from vlm.model import VisionLanguageModel
from vlm.projector import Projector, ProjectorConfig
from vlm.transformers_format import idefics3_positions

QUESTION = "What is in the picture?"
# (family, image splitting, checkpoint layout): every family as transformers 5 saves it and as the hub holds it
CASES = [
    ("smolvlm", False, False),
    ("smolvlm", True, False),
    ("idefics3", True, True),
    ("idefics3", False, True),
    ("llava", False, False),
    ("llava", False, True),
]


@pytest.fixture(scope="module", autouse=True)
def lm_cache(tmp_path_factory, smollm2_folder):  # SmolLM2's GGUF converted first, in the usual cache
    """The LMs written out of the checkpoints stay out of ~/.cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLM_CACHE", str(tmp_path_factory.mktemp("vlm-cache")))
        yield


@pytest.fixture(scope="module")
def checkpoints(smollm2_folder, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("hf-vlms")
    return {
        case: save_tiny_vlm(
            root / "-".join(map(str, case)), case[0], smollm2_folder, splitting=case[1], legacy_layout=case[2]
        )
        for case in CASES
    }


def ours_vs_reference(model: VisionLanguageModel, folder: Path, image) -> None:
    """Our prompt ids, pixels, logits and greedy text equal what transformers makes of `folder`."""
    ref = reference(folder, image, QUESTION)
    batch = model.prepare([[user(QUESTION, [image])]], for_generation=True)
    assert torch.equal(batch.input_ids, ref.input_ids), model.tokenizer.decode(batch.input_ids[0])
    assert torch.equal(batch.pixel_values, ref.pixel_values.reshape(-1, *batch.pixel_values.shape[1:]))
    with torch.no_grad():
        logits = model(batch.input_ids, batch.attention_mask, batch.pixel_values).logits
    torch.testing.assert_close(logits, ref.logits, atol=1e-4, rtol=0)
    assert model.ask(image, QUESTION, max_new_tokens=8) == ref.text


@pytest.mark.parametrize(
    "case", CASES, ids=lambda c: f"{c[0]}-{'split' if c[1] else 'single'}-{'hub' if c[2] else 'v5'}"
)
def test_a_transformers_checkpoint_answers_as_transformers_does(checkpoints, case):
    folder = checkpoints[case]
    model = VisionLanguageModel.from_pretrained(folder)
    assert model.config.image_layout == ("plain" if case[0] == "llava" else "idefics3")
    assert model.config.typed_parts  # the processor's own chat template places the image
    for width, height in ((80, 40), (30, 90), (32, 32)):  # split into 2x1 / 1x3 tiles + global, or one tile
        ours_vs_reference(model, folder, test_image(width, height, seed=width))
    assert model.config.lm_source == str(folder)


def test_image_splitting_can_be_turned_off_as_in_transformers(smollm2_folder, tmp_path):
    """`set_image_splitting(False)` on a splitting checkpoint answers as transformers with
    do_image_splitting=False (the same weights saved with that processor setting)."""
    split = save_tiny_vlm(tmp_path / "split", "smolvlm", smollm2_folder, splitting=True, seed=4)
    single = save_tiny_vlm(tmp_path / "single", "smolvlm", smollm2_folder, splitting=False, seed=4)
    model = VisionLanguageModel.from_pretrained(split)
    model.set_image_splitting(False)
    ours_vs_reference(model, single, test_image(80, 40, seed=6))
    model.set_image_splitting(True)
    ours_vs_reference(model, split, test_image(80, 40, seed=6))


def test_pixel_shuffle_orders_channels_as_idefics3(smollm2_folder):
    """Our pixel_shuffle projector without bias computes Idefics3's connector, weights loaded as they are."""
    config = Idefics3Config(
        vision_config={"hidden_size": 8, "num_attention_heads": 2},
        text_config={"hidden_size": 12, "num_attention_heads": 2, "num_key_value_heads": 2},
        scale_factor=2,
    )
    theirs = Idefics3Connector(config).eval()
    ours = Projector(ProjectorConfig(8, 12, kind="pixel_shuffle", scale_factor=2, bias=False))
    ours.linear_1.weight.data.copy_(theirs.modality_projection.proj.weight)
    x = torch.randn(3, 16, 8)  # a 4 x 4 grid
    torch.testing.assert_close(ours(x, (4, 4)), theirs(x), atol=1e-6, rtol=0)


def test_idefics3_bucketed_positions_load_as_gathered_rows(smollm2_folder, tmp_path):
    """At 19 patches per side Idefics3's bucketing reads position 11 twice; the import reproduces it."""
    assert not torch.equal(idefics3_positions(19), torch.arange(19 * 19))
    folder = save_tiny_vlm(
        tmp_path / "m", "idefics3", smollm2_folder, vision_image_size=38, patch_size=2, scale_factor=1
    )
    model = VisionLanguageModel.from_pretrained(folder)
    ours_vs_reference(model, folder, test_image(50, 40, seed=3))
    with pytest.raises(ValueError, match="two merge at 19 patches per side"):
        model.save_pretrained(tmp_path / "out", format="transformers")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "case", [("smolvlm", True, False), ("llava", False, True)], ids=["idefics3", "llava"]
)
def test_export_round_trip(checkpoints, case, tmp_path):
    """transformers -> ours -> transformers (equal logits, and transformers' processor makes our prompt) ->
    ours (equal logits)."""
    model = VisionLanguageModel.from_pretrained(checkpoints[case])
    out = model.save_pretrained(tmp_path / "exported", format="transformers")
    image = test_image(80, 40, seed=5)
    batch = model.prepare([[user(QUESTION, [image])]], for_generation=True)
    with torch.no_grad():
        ours = model(batch.input_ids, batch.attention_mask, batch.pixel_values).logits
    ref = reference(out, image, QUESTION)
    assert torch.equal(ref.input_ids, batch.input_ids)
    torch.testing.assert_close(ref.logits, ours, atol=1e-4, rtol=0)
    again = VisionLanguageModel.from_pretrained(out)
    assert again.config == replace(model.config, lm_source=str(out))
    again_batch = again.prepare([[user(QUESTION, [image])]], for_generation=True)
    assert torch.equal(again_batch.input_ids, batch.input_ids)
    with torch.no_grad():
        torch.testing.assert_close(again(**_inputs(again_batch)).logits, ours, atol=1e-5, rtol=0)


def _inputs(batch) -> dict:
    return dict(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.pixel_values
    )


def trained_here(parts, **overrides) -> VisionLanguageModel:
    """A model built by vlm (SmolLM2's tokenizer and template, our image token), LoRA on its LM with non-zero
    updates, so that export has an adapter to merge."""
    model = build(parts, **overrides)
    add_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0, target=r"lm\..*\.(q|v)_proj"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.1)
    return model.eval()


@pytest.mark.parametrize(
    "overrides, family",
    [
        ({"projector": {"kind": "mlp"}, "vision_feature_layer": -2}, "LlavaForConditionalGeneration"),
        ({"projector": {"kind": "pixel_shuffle", "bias": False}}, "Idefics3ForConditionalGeneration"),
    ],
    ids=["mlp", "pixel_shuffle"],
)
def test_a_model_trained_here_exports_with_its_adapter_merged(parts, tmp_path, overrides, family):
    model = trained_here(parts, **overrides)
    image = test_image(40, 40, seed=1)
    batch = model.prepare([[user(QUESTION, [image])]], for_generation=True)
    with torch.no_grad():
        ours = model(**_inputs(batch)).logits
    out = model.save_pretrained(tmp_path / "exported", format="transformers")
    assert any("lora_" in n for n, _ in model.named_parameters())  # the model itself keeps its adapter
    hf = AutoModelForImageTextToText.from_pretrained(out).eval()
    assert type(hf).__name__ == family
    pixels = batch.pixel_values[None] if "Idefics3" in family else batch.pixel_values
    with torch.no_grad():
        theirs = hf(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=pixels
        ).logits
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)
    again = VisionLanguageModel.from_pretrained(
        out
    )  # ours -> transformers -> ours: the same prompt and logits
    assert again.config.image_layout == "plain" and not again.config.typed_parts
    again_batch = again.prepare([[user(QUESTION, [image])]], for_generation=True)
    assert torch.equal(again_batch.input_ids, batch.input_ids)
    with torch.no_grad():
        torch.testing.assert_close(again(**_inputs(again_batch)).logits, ours, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "projector, needed",
    [
        ({"kind": "pixel_shuffle", "pooled_token": True}, "pooled-embedding token"),
        ({"kind": "pixel_shuffle"}, "without bias"),
        ({"kind": "mlp"}, "before post_layernorm"),
        ({"kind": "linear"}, "LLaVA needs 'mlp'"),
    ],
    ids=["pooled", "bias", "post-layernorm", "linear"],
)
def test_a_model_with_no_transformers_counterpart_is_refused_clearly(parts, tmp_path, projector, needed):
    model = build(parts, projector=projector)
    with pytest.raises(ValueError, match=needed):
        model.save_pretrained(tmp_path / "out", format="transformers")
    assert not (tmp_path / "out").exists()


def test_a_fine_tuned_import_saves_in_our_format_and_reloads(checkpoints, tmp_path):
    """Saved the vlm way, an imported model names its checkpoint as its LM source and reloads to the same
    logits (the LM comes out of the checkpoint again)."""
    folder = checkpoints["smolvlm", True, False]
    model = VisionLanguageModel.from_pretrained(folder)
    with torch.no_grad():
        model.projector.linear_1.weight.mul_(1.5)  # as if fine-tuned
    model.save_pretrained(tmp_path / "mine")
    again = VisionLanguageModel.from_pretrained(tmp_path / "mine")
    assert again.config == model.config
    batch = model.prepare([[user(QUESTION, [test_image(80, 40, seed=2)])]], for_generation=True)
    with torch.no_grad():
        torch.testing.assert_close(
            again(**_inputs(batch)).logits, model(**_inputs(batch)).logits, atol=0, rtol=0
        )


# -- bad checkpoints: one clear error each, nothing half-loaded -------------------------------------------------


def copy_of(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / "copy"))


def edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        target = config
        *path, last = key.split("__")
        for part in path:
            target = target[part]
        target[last] = value
    (folder / "config.json").write_text(json.dumps(config))


def edit_weights(folder: Path, edit) -> None:
    weights = load_file(folder / "model.safetensors")
    edit(weights)
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})


def test_bad_checkpoints_are_refused_with_one_clear_error(checkpoints, tmp_path, smollm2_folder, monkeypatch):
    """... and before the checkpoint's LM is written into the cache (hundreds of MB for a real one): a refused
    one leaves nothing there."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("VLM_CACHE", str(cache))
    smol = checkpoints["smolvlm", False, False]
    llava = checkpoints["llava", False, False]
    cases = []

    bad = copy_of(smol, tmp_path / "family")
    edit_config(bad, model_type="qwen2_vl")
    cases.append((bad, "model_type"))

    bad = copy_of(llava, tmp_path / "clip")
    edit_config(bad, vision_config__model_type="clip_vision_model")
    cases.append((bad, "vision tower is 'clip_vision_model'"))

    bad = copy_of(llava, tmp_path / "strategy")
    edit_config(bad, vision_feature_select_strategy="default")
    cases.append((bad, "drops the first patch"))

    bad = copy_of(llava, tmp_path / "layers")
    edit_config(bad, vision_feature_layer=[-2, -1])
    cases.append((bad, "concatenates several layers"))

    bad = copy_of(smol, tmp_path / "missing")
    edit_weights(bad, lambda w: w.pop("model.vision_model.post_layernorm.weight"))
    cases.append((bad, r"missing \(1\): post_layernorm.weight"))

    bad = copy_of(smol, tmp_path / "extra")
    edit_weights(bad, lambda w: w.update({"model.extra.weight": torch.zeros(2)}))
    cases.append((bad, "no known part"))

    bad = copy_of(smol, tmp_path / "lm")
    edit_weights(bad, lambda w: w.pop("model.text_model.norm.weight"))
    cases.append((bad, r"(?s)the LM in .* missing \(1\): model.norm.weight"))

    bad = copy_of(smol, tmp_path / "shape")
    edit_weights(
        bad, lambda w: w.update({"model.connector.modality_projection.proj.weight": torch.zeros(3, 3)})
    )
    cases.append((bad, "(?s)the projector in .* shape mismatch"))

    bad = copy_of(smol, tmp_path / "pickle")
    (bad / "model.safetensors").rename(bad / "pytorch_model.bin")
    cases.append((bad, "only pickle weights"))

    for folder, message in cases:
        with pytest.raises(CheckpointError, match=message):
            VisionLanguageModel.from_pretrained(folder)
        assert not list(cache.glob("lm/*")), folder.parent.name  # no LM written, not even part of one
    VisionLanguageModel.from_pretrained(llava)
    assert len(list((cache / "lm").iterdir())) == 1  # the cache the refusals would have written to


# -- everything else takes them as it takes ours --------------------------------------------------------------


def test_fine_tuning_starts_from_an_imported_checkpoint(checkpoints, tmp_path):
    """`model.init: <SmolVLM folder>`: LoRA on its LM, its projector trained, its tower frozen; the result
    saves the vlm way (naming the checkpoint as its LM) and reloads to the same logits."""
    from scripts import load_script

    from vlm.config import load_config

    ft = load_script("finetune")
    folder = checkpoints["smolvlm", True, False]
    cfg = load_config(ft.FinetuneConfig, None, [
        f"--model.init={folder}", "--lora.r=4", "--lora.alpha=8", "--lora.dropout=0.0",
        "--data.train=[{kind: vqa, name: easy-vqa, limit: 8}]", "--data.eval=null",
        f"--train.out_dir={tmp_path / 'run'}", "--train.batch_size=4", "--train.warmup_steps=1",
        "--train.log_every=1", "--train.steps=3", "--train.lr=5e-3", "--train.lr_projector=5e-3",
        "--train.bf16=false", "--train.checkpoint_every=100",
    ])  # fmt: skip
    before = VisionLanguageModel.from_pretrained(folder)
    model = ft.train(cfg)
    after = {n.replace(".base_layer", ""): p for n, p in model.named_parameters() if "lora_" not in n}
    changed = {n for n, p in before.named_parameters() if not torch.equal(p, after[n])}
    assert changed == {"projector.linear_1.weight"}
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in model.named_parameters())
    final = tmp_path / "run" / "final"
    reloaded = VisionLanguageModel.from_pretrained(final)
    assert reloaded.config.lm_source == str(folder) and reloaded.config.image_layout == "idefics3"
    card = (final / "README.md").read_text()  # the model's own LM and tower, not the config's defaults
    assert f"- base LM: `{folder}`" in card and f"- vision tower: from {folder} (frozen)" in card
    batch = model.prepare([[user(QUESTION, [test_image(80, 40, seed=4)])]], for_generation=True)
    with torch.no_grad():
        expected = model(**_inputs(batch)).logits
        torch.testing.assert_close(reloaded(**_inputs(batch)).logits, expected)
    from vlm.cli import main

    assert main(["merge", str(final), str(tmp_path / "merged")]) == 0  # the adapter folded into the LM
    merged = VisionLanguageModel.from_pretrained(tmp_path / "merged")
    assert merged.config.image_layout == "idefics3" and not any(
        "lora_" in n for n, _ in merged.named_parameters()
    )
    with torch.no_grad():
        torch.testing.assert_close(merged(**_inputs(batch)).logits, expected, atol=1e-4, rtol=0)


def test_the_cli_answers_with_an_imported_checkpoint(checkpoints, tmp_path, capsys):
    from vlm.cli import main

    folder = checkpoints["llava", False, True]
    image = tmp_path / "picture.png"
    test_image(48, 40, seed=7).save(image)
    assert (
        main(["ask", "--model", str(folder), "--image", str(image), "--max-new-tokens", "6", QUESTION]) == 0
    )
    expected = reference(folder, test_image(48, 40, seed=7), QUESTION, max_new_tokens=6).text
    assert capsys.readouterr().out.strip() == expected.strip()


def test_the_demo_serves_an_imported_checkpoint(checkpoints):
    """`vlm demo --model <folder>`: the page's model loads through the same path; its encoder views show the
    whole image (the global tile of a split one)."""
    from demo.app import load_model
    from demo.handlers import Handlers

    model, info = load_model(str(checkpoints["smolvlm", True, False]))
    assert model.config.image_processing.image_splitting and info.name
    handlers = Handlers(model)
    try:
        picture = test_image(80, 40, seed=8)
        assert handlers._whole(picture).shape == (1, 3, 32, 32)
        global_tile = model.processor.tiles(picture).pixels[-1]
        assert (handlers._whole(picture)[0] - global_tile).abs().mean() < 0.05  # one squash vs two resizes
        assert handlers._attention_view(picture).size == handlers._similarity_view(picture, 0, 0)[0].size
    finally:
        handlers.close()
