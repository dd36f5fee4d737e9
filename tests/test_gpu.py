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
