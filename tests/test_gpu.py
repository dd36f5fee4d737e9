"""On a CUDA GPU: the model moved there computes what it computes on the CPU, and the serving engine answers
there as on the CPU. Marked `gpu`: run where CUDA is visible, reported as skipped elsewhere (conftest.py)."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny import build, images

from vlm.conversation import user
from vlm.serving import BatchedGenerator

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _full_float32():
    """TF32 (cuDNN's default for convolutions, the patch embedding here) rounds float32 products to 10-bit
    mantissas; the CPU does not. Off, so CPU and GPU differ only by the order of their sums."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_the_forward_pass_and_loss_on_cuda_equal_the_cpus(parts) -> None:
    cpu = build(parts, projector=dict(pooled_token=True))
    gpu = copy.deepcopy(cpu).to("cuda")
    assert {p.device.type for p in gpu.parameters()} == {"cuda"}
    batch = cpu.prepare(
        [
            [user("What is it?", images(1)), {"role": "assistant", "content": "A red square, I think."}],
            [user("And this one?", images(2)[1:]), {"role": "assistant", "content": "Blue."}],
        ]
    )
    with torch.no_grad():
        want = cpu(batch.input_ids, batch.attention_mask, batch.pixel_values)
        got = gpu(*(t.to("cuda") for t in (batch.input_ids, batch.attention_mask, batch.pixel_values)))
        want_loss = cpu(batch.input_ids, batch.attention_mask, batch.pixel_values, batch.labels).loss
        on_cuda = batch.to("cuda")
        got_loss = gpu(on_cuda.input_ids, on_cuda.attention_mask, on_cuda.pixel_values, on_cuda.labels).loss
    assert got.logits.device.type == "cuda"
    torch.testing.assert_close(got.logits.cpu(), want.logits, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(got_loss.cpu(), want_loss, atol=1e-4, rtol=1e-4)


def test_the_shipped_model_answers_on_cuda_as_on_the_cpu(default_model) -> None:
    """Greedy answers of the shipped model, through the serving engine on the GPU, equal `ask` on the CPU."""
    from demo.app import EXAMPLES

    gpu = copy.deepcopy(default_model).to("cuda")
    assert gpu.lm.device.type == "cuda"
    pictures = [str(e.path) for e in EXAMPLES if e.file.startswith("easyvqa_")]
    questions = ["What shape is in the image?", "What color is the shape?"]
    asked = [[user(q, [p])] for p in pictures for q in questions]
    want = default_model.generate(asked, max_new_tokens=12)  # batched = one by one (test_generation.py)
    engine = BatchedGenerator(gpu)
    try:
        got = [engine.generate(conversation, max_new_tokens=12) for conversation in asked]
    finally:
        engine.close()
    assert got == want
    assert gpu.ask(None, "What is the capital of France?", max_new_tokens=20) == default_model.ask(
        None, "What is the capital of France?", max_new_tokens=20
    )


# -- --device: the commands put their models on the GPU by default (tests/test_devices.py on the CPU) ---------------


@pytest.fixture(scope="module")
def device_files(parts, tmp_path_factory):
    from test_devices import write_files

    return write_files(parts, tmp_path_factory.mktemp("gpu_devices"))


@pytest.mark.parametrize("command", ["embed", "viz", "ask", "chat", "eval", "zeroshot", "demo"])
def test_every_command_runs_on_the_gpu_by_default(command, device_files, tmp_path, monkeypatch) -> None:
    import io
    import sys

    from test_devices import NoPage, argv_of, spy

    from vlm.cli import main
    from vlm.devices import default_dtype

    calls = spy(monkeypatch, command)
    if command == "chat":
        monkeypatch.setattr(sys, "stdin", io.StringIO("/quit\n"))
    if command == "demo":
        import demo.app

        monkeypatch.setattr(demo.app, "build_app", lambda handlers, info: NoPage())
    assert main(argv_of(command, device_files, tmp_path)) == 0  # no --device: auto
    gpu = torch.device("cuda", torch.cuda.current_device())
    assert calls and all(given == gpu for given, _ in calls)
    for _, model in calls:
        assert {p.device for p in model.parameters()} == {gpu}
        if command not in ("viz", "zeroshot"):  # --dtype auto; those two run in float32
            assert {p.dtype for p in model.parameters()} == {default_dtype(gpu)}


def test_vlm_ask_on_the_gpu_prints_the_loaded_models_answer(
    device_files, tmp_path, monkeypatch, capsys
) -> None:
    from test_devices import argv_of, spy

    from vlm.cli import main

    calls = spy(monkeypatch, "ask")
    assert main(argv_of("ask", device_files, tmp_path)) == 0
    ((_, model),) = calls
    answer = model.ask(device_files / "picture.png", "What is it?", max_new_tokens=2)
    assert capsys.readouterr().out == answer + "\n"


def test_a_quantized_lm_brings_the_tower_and_projector_to_its_gpu(device_files) -> None:
    """bitsandbytes places the LM on the GPU itself; the rest of the model must follow it (the tower used to stay
    on the CPU, and the first image failed with a device mismatch)."""
    pytest.importorskip("bitsandbytes")
    from vlm.model import VisionLanguageModel

    model = VisionLanguageModel.from_pretrained(device_files / "m", quantization="4bit")  # device=None
    assert model.lm.device.type == "cuda"
    assert {p.device for p in [*model.vision.parameters(), *model.projector.parameters()]} == {
        model.lm.device
    }
    model.ask(device_files / "picture.png", "What is it?", max_new_tokens=4)  # the image meets the LM
    with pytest.raises(ValueError, match=r"bitsandbytes placed the quantized LM on cuda:\d, not on cpu"):
        VisionLanguageModel.from_pretrained(device_files / "m", quantization="4bit", device="cpu")


def test_our_splice_and_learned_token_head_never_wait_for_the_gpu(parts) -> None:
    """A training batch's image splice and learned-token head use the positions found on the CPU: under
    CUDA's sync debug mode "error" (any host-device sync raises) they run, forward and backward. The LM's own
    decoder (transformers' mask creation may check its mask) is left out: what is ours is checked."""
    model = build(parts, projector=dict(pooled_token=True)).to("cuda")
    conversations = [
        [user("What is it?", images(1)), {"role": "assistant", "content": "A red square."}],
        [user("And this?", images(2)[1:]), {"role": "assistant", "content": "Blue."}],
    ]
    batch = model.preparer(conversations).pin_memory().to("cuda", non_blocking=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        embeds = model.embed(batch.input_ids, batch.pixel_values, image_index=batch.image_index)
        picked = embeds[:, :-1].reshape(-1, embeds.shape[-1]).index_select(0, batch.learned_index)
        logits = model.lm.get_output_embeddings()(picked)
        loss = torch.nn.functional.cross_entropy(logits.float(), batch.learned_targets, reduction="sum")
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss).item()
