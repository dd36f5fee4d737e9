"""The checkpoint loader: strict, safetensors-only, one clear error for every way a checkpoint can be wrong."""

from __future__ import annotations

import json

import pytest
import torch
from hf_models import hf_siglip, hf_vision, save
from safetensors.torch import load_file, save_file
from transformers import SiglipVisionModel

from vlm.weights import CheckpointError, load_vision_encoder, save_vision_encoder


def rewrite(folder, edit) -> None:
    """Apply `edit` to the checkpoint's state dict in place, keeping the safetensors format."""
    state = load_file(folder / "model.safetensors")
    edit(state)
    save_file(state, folder / "model.safetensors")


def test_sharded_checkpoint_loads(tmp_path) -> None:
    hf = hf_siglip()
    save(hf, tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file() and not (
        tmp_path / "model.safetensors"
    ).exists()
    ours = load_vision_encoder(tmp_path)
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            ours(pixels).pooler_output, hf.vision_model(pixel_values=pixels).pooler_output
        )


def test_transformers_4_layout_with_vision_model_prefix_loads(tmp_path) -> None:
    """Checkpoints on the hub (and transformers 4 saves) prefix every vision key with `vision_model.`."""
    hf = hf_vision()
    save(hf, tmp_path)
    rewrite(tmp_path, lambda s: s.update({f"vision_model.{k}": s.pop(k) for k in list(s)}))
    ours = load_vision_encoder(tmp_path)
    for key, value in hf.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value, atol=0, rtol=0)


def test_save_vision_encoder_round_trips_and_transformers_reads_it(tmp_path) -> None:
    hf = hf_vision(vision_use_head=False)
    ours = load_vision_encoder(save(hf, tmp_path / "hf"))
    save_vision_encoder(ours, tmp_path / "ours")
    again = load_vision_encoder(tmp_path / "ours")
    assert again.config == ours.config
    for key, value in ours.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key
    theirs = SiglipVisionModel.from_pretrained(tmp_path / "ours").eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            again(pixels).last_hidden_state, theirs(pixel_values=pixels).last_hidden_state
        )
    assert not [p.name for p in (tmp_path / "ours").iterdir() if p.name.endswith(".tmp")]


def test_dtype_and_device_arguments(tmp_path) -> None:
    ours = load_vision_encoder(save(hf_vision(), tmp_path), dtype=torch.bfloat16, device="cpu")
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    assert not ours.training


def test_missing_key_is_named(tmp_path) -> None:
    save(hf_vision(), tmp_path)
    rewrite(tmp_path, lambda s: s.pop("post_layernorm.weight"))
    with pytest.raises(CheckpointError, match=r"missing \(1\): post_layernorm.weight"):
        load_vision_encoder(tmp_path)


def test_unexpected_key_is_named(tmp_path) -> None:
    save(hf_vision(), tmp_path)
    rewrite(tmp_path, lambda s: s.update({"encoder.layers.7.extra.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"unexpected \(1\): encoder.layers.7.extra.weight"):
        load_vision_encoder(tmp_path)


def test_shape_mismatch_is_named(tmp_path) -> None:
    save(hf_vision(), tmp_path)
    rewrite(tmp_path, lambda s: s.update({"head.probe": torch.zeros(1, 1, 16)}))
    with pytest.raises(CheckpointError, match=r"head.probe: checkpoint \(1, 1, 16\) vs model \(1, 1, 32\)"):
        load_vision_encoder(tmp_path)


def test_all_problems_reported_at_once(tmp_path) -> None:
    save(hf_vision(), tmp_path)

    def break_everything(s: dict) -> None:
        s.pop("head.probe")
        s["bogus"] = torch.zeros(1)
        s["post_layernorm.bias"] = torch.zeros(3)

    rewrite(tmp_path, break_everything)
    with pytest.raises(CheckpointError) as err:
        load_vision_encoder(tmp_path)
    assert all(
        word in str(err.value)
        for word in ("missing (1): head.probe", "unexpected (1): bogus", "post_layernorm.bias")
    )


def test_config_disagreeing_with_weights(tmp_path) -> None:
    save(hf_vision(), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["num_hidden_layers"] = 3
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"missing \(\d+\): encoder.layers.2"):
        load_vision_encoder(tmp_path)


def test_text_tower_is_skipped_on_purpose_but_stray_keys_are_not(tmp_path) -> None:
    save(hf_siglip(), tmp_path)
    rewrite(tmp_path, lambda s: s.update({"embeddings.patch_embedding.weight": torch.zeros(1)}))
    with pytest.raises(CheckpointError, match="embeddings.patch_embedding.weight"):
        load_vision_encoder(tmp_path)


def test_not_a_directory(tmp_path) -> None:
    file = tmp_path / "model.safetensors"
    file.write_bytes(b"")
    with pytest.raises(CheckpointError, match="is a file, not a checkpoint folder"):
        load_vision_encoder(file)
    with pytest.raises(CheckpointError, match="no checkpoint folder at"):
        load_vision_encoder(tmp_path / "nowhere")


def test_pickle_only_checkpoint_is_refused_without_unpickling(tmp_path, monkeypatch) -> None:
    hf = hf_vision()
    hf.config.save_pretrained(tmp_path)
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")

    def no_unpickling(*args, **kwargs):
        raise AssertionError("the loader called torch.load")

    monkeypatch.setattr(torch, "load", no_unpickling)
    with pytest.raises(CheckpointError, match="only pickle weights.*pytorch_model.bin.*never unpickles"):
        load_vision_encoder(tmp_path)


def test_not_a_siglip_checkpoint(tmp_path) -> None:
    save(hf_vision(), tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "clip_vision_model", "hidden_size": 32}))
    with pytest.raises(CheckpointError, match="'clip_vision_model' checkpoint; expected a SigLIP one"):
        load_vision_encoder(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(CheckpointError, match="has no config.json"):
        load_vision_encoder(tmp_path)


def test_corrupt_safetensors_file(tmp_path) -> None:
    save(hf_vision(), tmp_path)
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_vision_encoder(tmp_path)


def test_unknown_hub_id_offline_is_a_clear_error() -> None:
    # conftest sets HF_HUB_OFFLINE=1: the hub path is exercised, answered from the (empty) cache only.
    with pytest.raises(CheckpointError, match="not a local folder and the hub could not provide it"):
        load_vision_encoder("google/siglip-base-patch16-224-not-cached")
