"""The contrastive losses: hand-computed values on small matrices, the hand-written backward of the chunked
block, and the ring-chunked sigmoid loss in 2 and 3 real processes (gloo on CPU) against the single-process
loss and its gradients over the same global batch."""

from __future__ import annotations

import math
import os
import socket
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from vlm.losses import _SigmoidBlockNLL, chunked_sigmoid_loss, sigmoid_loss, softmax_loss


def softplus(z: float) -> float:
    return math.log1p(math.exp(z))  # = -log sigmoid(-z)


def test_sigmoid_loss_2x2_by_hand() -> None:
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    texts = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    scale, bias = torch.tensor([math.log(2.0)]), torch.tensor([-1.0])  # t = 2, b = -1
    # cosines [[1, .6], [0, .8]] -> logits z = 2 cos - 1 = [[1, .2], [-1, .6]]
    # -log sigmoid(+z) on the diagonal = softplus(-z); -log sigmoid(-z) off it = softplus(z)
    by_hand = (softplus(-1.0) + softplus(0.2) + softplus(-1.0) + softplus(-0.6)) / 2  # sum, then / B images
    assert sigmoid_loss(images, texts, scale, bias).item() == pytest.approx(by_hand, rel=1e-6)
    assert by_hand == pytest.approx(0.9310751, rel=1e-6)


def test_sigmoid_loss_3x3_by_hand_and_its_bias_gradient() -> None:
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    texts = torch.tensor([[0.0, 1.0], [0.0, 1.0], [0.6, 0.8]])
    scale = torch.zeros(1, requires_grad=True)  # t = 1
    bias = torch.tensor([0.5], requires_grad=True)
    # cosines [[0, 0, .6], [1, 1, .8], [.8, .8, 1]]; logits z = cos + .5
    z = [[0.5, 0.5, 1.1], [1.5, 1.5, 1.3], [1.3, 1.3, 1.5]]
    nll = [[softplus(-z[i][j]) if i == j else softplus(z[i][j]) for j in range(3)] for i in range(3)]
    loss = sigmoid_loss(images, texts, scale, bias)
    assert loss.item() == pytest.approx(sum(map(sum, nll)) / 3, rel=1e-6)
    # d/dz = sigmoid(z) - [i == j], and dz/db = 1
    sigmoid = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    grad_bias = sum(sigmoid(z[i][j]) - (i == j) for i in range(3) for j in range(3)) / 3
    loss.backward()
    assert bias.grad.item() == pytest.approx(grad_bias, rel=1e-6)


def test_equal_match_ids_make_equal_captions_matches() -> None:
    """Images 0 and 1 share a caption (id 7): each matches both texts 0 and 1; with distinct ids (or none) only
    its own. Same pairs as the 3x3 case above, labels +1 on the matches."""
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    texts = torch.tensor([[0.0, 1.0], [0.0, 1.0], [0.6, 0.8]])
    scale, bias = torch.zeros(1), torch.tensor([0.5])
    z = [[0.5, 0.5, 1.1], [1.5, 1.5, 1.3], [1.3, 1.3, 1.5]]
    match = [[True, True, False], [True, True, False], [False, False, True]]
    nll = [[softplus(-z[i][j]) if match[i][j] else softplus(z[i][j]) for j in range(3)] for i in range(3)]
    got = sigmoid_loss(images, texts, scale, bias, match_ids=torch.tensor([7, 7, 2]))
    assert got.item() == pytest.approx(sum(map(sum, nll)) / 3, rel=1e-6)
    torch.testing.assert_close(
        sigmoid_loss(images, texts, scale, bias, match_ids=torch.tensor([4, 1, 9])),
        sigmoid_loss(images, texts, scale, bias),
    )
    with pytest.raises(ValueError, match="one per pair"):
        sigmoid_loss(images, texts, scale, bias, match_ids=torch.tensor([1, 2]))


def test_softmax_loss_3x3_by_hand() -> None:
    images = torch.eye(3)
    texts = torch.tensor([[1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [0.0, 0.0, 1.0]])
    scale = torch.tensor([math.log(2.0)])  # t = 2
    z = [[2.0, 1.2, 0.0], [0.0, 1.6, 0.0], [0.0, 0.0, 2.0]]  # t * cos(image i, text j)
    lse = lambda xs: math.log(sum(math.exp(x) for x in xs))  # noqa: E731
    image_to_text = sum(lse(z[i]) - z[i][i] for i in range(3)) / 3  # cross-entropy over each row
    text_to_image = sum(lse([z[i][j] for i in range(3)]) - z[j][j] for j in range(3)) / 3  # ... each column
    want = (image_to_text + text_to_image) / 2
    assert softmax_loss(images, texts, scale).item() == pytest.approx(want, rel=1e-6)
    assert want == pytest.approx(0.3575513, rel=1e-6)  # rows .4604 .3391 .2395, columns .2395 .6271 .2395


def test_shapes_are_checked() -> None:
    with pytest.raises(ValueError, match=r"both be \(B, D\)"):
        sigmoid_loss(torch.ones(3, 4), torch.ones(2, 4), torch.zeros(1), torch.zeros(1))
    with pytest.raises(ValueError, match=r"both be \(B, D\)"):
        softmax_loss(torch.ones(3), torch.ones(3), torch.zeros(1))


@pytest.mark.parametrize("positives", [True, False, "ids"])
def test_hand_written_block_backward_passes_gradcheck(positives: bool | str) -> None:
    rows, cols = (3, 3) if positives is True else (3, 5)  # off-diagonal blocks need not be square
    # "ids": matches anywhere in the block, as equal match_ids put them
    matches = torch.tensor([[1, 0, 0, 1, 0], [0, 0, 0, 0, 0], [0, 1, 1, 0, 0]], dtype=torch.bool)
    args = (
        torch.randn(rows, 4, dtype=torch.float64, requires_grad=True),
        torch.randn(cols, 4, dtype=torch.float64, requires_grad=True),
        torch.tensor([0.7], dtype=torch.float64, requires_grad=True),
        torch.tensor([-1.3], dtype=torch.float64, requires_grad=True),
        matches if positives == "ids" else positives,
    )
    assert torch.autograd.gradcheck(_SigmoidBlockNLL.apply, args)


def test_bf16_embeddings_with_fp32_scale_and_bias() -> None:
    """Mixed precision without autocast: bf16 towers, fp32 logit_scale/logit_bias parameters."""
    images, texts = F.normalize(torch.randn(6, 32), dim=-1), F.normalize(torch.randn(6, 32), dim=-1)

    def grads(loss_fn, dtype: torch.dtype) -> list[torch.Tensor]:
        leaves = [
            images.to(dtype, copy=True),
            texts.to(dtype, copy=True),
            torch.tensor([2.3]),
            torch.tensor([-3.0]),
        ]
        leaves = [t.requires_grad_() for t in leaves]
        loss = loss_fn(*leaves)
        assert loss.dtype == torch.float32 and loss.isfinite()
        loss.backward()
        return [t.grad for t in leaves]

    block = lambda x, y, s, b: _SigmoidBlockNLL.apply(x, y, s, b, True) / len(x)  # noqa: E731
    softmax = lambda x, y, s, b: softmax_loss(x, y, s) + 0 * b.sum()  # noqa: E731
    for loss_fn in (sigmoid_loss, block, softmax):
        half, full = grads(loss_fn, torch.bfloat16), grads(loss_fn, torch.float32)
        assert [t.dtype for t in half] == [torch.bfloat16, torch.bfloat16, torch.float32, torch.float32]
        for a, b in zip(half, full, strict=True):
            torch.testing.assert_close(a.float(), b, atol=2e-2, rtol=2e-2)


def test_chunked_loss_without_a_process_group_is_the_sigmoid_loss() -> None:
    images, texts = F.normalize(torch.randn(5, 8), dim=-1), F.normalize(torch.randn(5, 8), dim=-1)
    scale, bias = torch.tensor([2.3]), torch.tensor([-10.0])
    assert not dist.is_initialized()
    torch.testing.assert_close(
        chunked_sigmoid_loss(images, texts, scale, bias), sigmoid_loss(images, texts, scale, bias)
    )


# --- several processes ------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn_on_a_free_port(worker, args_for_port, nprocs: int, tries: int = 3) -> None:
    """`mp.spawn(worker, args=args_for_port(port), ...)` on a port the OS says is free. Another process can
    take it before rank 0 listens on it (EADDRINUSE, and the spawn fails), so a clash is retried on a new one."""
    for attempt in range(tries):
        try:
            return mp.spawn(worker, args=args_for_port(_free_port()), nprocs=nprocs, join=True)
        except mp.ProcessRaisedException as err:
            if "EADDRINUSE" not in str(err) or attempt == tries - 1:
                raise


def _rank_worker(
    rank: int, sizes: list[int], port: int, inputs: dict[str, torch.Tensor], out_dir: str
) -> None:
    """One rank: its slice of the global batch -> chunked loss -> backward; writes what it got."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    world = len(sizes)
    # A timeout, so a mismatched send/receive fails the test instead of hanging it.
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        start = sum(sizes[:rank])
        local = {
            name: (value[start : start + sizes[rank]] if value.ndim == 2 else value).clone().requires_grad_()
            for name, value in inputs.items()
            if name != "ids"
        }
        ids = inputs.get("ids")
        ids = None if ids is None else ids[start : start + sizes[rank]]
        loss = chunked_sigmoid_loss(
            local["images"], local["texts"], local["scale"], local["bias"], match_ids=ids
        )
        loss.backward()
        torch.save(
            {"loss": loss.detach(), **{name: t.grad for name, t in local.items()}},
            Path(out_dir) / f"rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    "sizes, with_ids", [([4, 4], False), ([3, 1, 5], False), ([3, 1, 5], True)],
    ids=["2-ranks", "3-ranks-unequal", "3-ranks-match-ids"],
)  # fmt: skip
def test_chunked_loss_across_processes_equals_global_loss_and_gradients(
    sizes: list[int], with_ids: bool, tmp_path
) -> None:
    world, total = len(sizes), sum(sizes)
    inputs = {
        "images": F.normalize(torch.randn(total, 16), dim=-1),
        "texts": F.normalize(torch.randn(total, 16), dim=-1),
        "scale": torch.tensor([1.9]),  # t ~ 6.7: logits spread over a few units, both signs
        "bias": torch.tensor([-1.5]),
    }
    # Make the positives clearly better than chance, so the diagonal terms differ from the rest.
    inputs["texts"] = F.normalize(inputs["texts"] + inputs["images"], dim=-1)
    if (
        with_ids
    ):  # repeated captions, some held by different ranks: matches off the diagonal and across blocks
        inputs["ids"] = torch.tensor([0, 1, 2, 0, 3, 1, 4, 0, 5])
    _spawn_on_a_free_port(_rank_worker, lambda port: (sizes, port, inputs, str(tmp_path)), world)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]

    reference = {name: value.clone().requires_grad_() for name, value in inputs.items() if name != "ids"}
    want = sigmoid_loss(
        reference["images"], reference["texts"], reference["scale"], reference["bias"], inputs.get("ids")
    )
    want.backward()

    # The mean over ranks of what each returns is the global loss (see chunked_sigmoid_loss's docstring) ...
    got = torch.stack([r["loss"] for r in ranks]).mean()
    torch.testing.assert_close(got, want.detach(), atol=1e-6, rtol=1e-6)
    assert not torch.allclose(ranks[0]["loss"], ranks[1]["loss"])  # each rank holds a different part
    # ... each rank's own embeddings carry W x the global gradient (every rank's use of them, ring-returned) ...
    for name in ("images", "texts"):
        torch.testing.assert_close(
            torch.cat([r[name] for r in ranks]) / world, reference[name].grad, atol=1e-6, rtol=1e-5
        )
    # ... and averaging the shared parameters' gradients over ranks, as DDP does, gives the global gradient.
    for name in ("scale", "bias"):
        torch.testing.assert_close(
            torch.stack([r[name] for r in ranks]).mean(0), reference[name].grad, atol=1e-6, rtol=1e-5
        )
