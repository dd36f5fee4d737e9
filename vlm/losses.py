"""Contrastive image-text losses: SigLIP's sigmoid loss, CLIP's softmax loss, and the sigmoid loss chunked
around a ring of processes.

References
- Zhai et al., "Sigmoid Loss for Language Image Pre-Training" (SigLIP), 2023: Eq. 2 (the sigmoid loss),
  section 3.3 and Fig. 1 (the chunked multi-device implementation), the t' = log 10, b = -10 initialisation.
- Radford et al., "Learning Transferable Visual Models From Natural Language Supervision" (CLIP), 2021:
  Fig. 3 (the symmetric cross-entropy).
- big_vision `trainers/proj/image_text/siglip.py` and transformers' `SiglipModel.forward(return_loss=True)`:
  the sigmoid loss this file is tested against.

Conventions shared by every loss here
- `image_embeds` (B, D) and `text_embeds` (B, D) are L2-normalised (the model normalises them); row i of each
  is a matching pair, every other (i, j) a non-matching one.
- `logit_scale` is the LOG temperature t' (the checkpoints store t', the logits use t = exp(t'), which keeps
  t positive under gradient descent); `logit_bias` is b. Both are tensors of shape (1,) or () as the model
  holds them, so their gradients flow.

Deliberate deviations from the reference
- Optional `match_ids`: with them, image i and text j match whenever their ids are equal, not only when
  i == j. The paper's labels assume every caption in a batch is unique, as in web-scale data; with class-like
  captions ("a red circle", "a photo of a sneaker") a batch holds many identical ones, and the paper's labels
  would call an image and an identical caption of another image a non-match, teaching the towers to tell
  apart images the captions cannot. Equal captions are matches then. Without ids the loss is the paper's.
- The chunked loss has a hand-written backward (`_SigmoidBlockNLL`) that recomputes each block's logits,
  so a process keeps one (b, b) block of logits alive at a time rather than all W of them, (b, B), until the
  backward pass: the paper's memory claim holds for the backward pass too. It costs one extra
  (b, D) x (D, b) matmul per block.
- Sending the next text block is not overlapped with computing the current one (the paper overlaps them):
  the ring pass is one synchronous exchange per step, which keeps the autograd function small.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def _sigmoid_nll_sum(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
    matches: bool | torch.Tensor,
) -> torch.Tensor:
    """Sum over every (image i, text j) of -log sigmoid(label_ij * z_ij) for one block of pairs.

    Each pair is its own binary classification "do x_i and y_j match?" with logit
        z_ij = t * <x_i, y_j> + b,   t = exp(t'),
    and label +1 for a match, -1 otherwise. Since sigmoid(-z) = 1 - sigmoid(z), sigmoid(label * z) is the
    probability the model gives to the right answer in both cases, so -log sigmoid(label * z) is that
    pair's negative log-likelihood. No normalisation couples pairs, which is what lets the sum be split
    into blocks and computed anywhere. `matches`: True when this block's matches are its diagonal (image i
    with text i), False when it holds none (all labels -1), or a (b_img, b_txt) bool tensor of them.

    Written without a (b_img, b_txt) label matrix: with softplus(z) = log(1 + e^z),
        non-match: -log sigmoid(-z) = softplus(z)
        match:     -log sigmoid(z)  = log(1 + e^-z) = softplus(z) - z
    so the block's sum is sum_ij softplus(z_ij), minus sum_i z_ii when it holds the matches; z_ii is the
    row-wise dot product of the pairs, computed from the (b, D) embeddings without indexing the logits
    (whose backward would allocate another block-sized matrix). The scale multiplies the (b_img, D)
    embeddings rather than the block's cosines, so nothing block-sized is saved for it. The block-sized
    tensors are the logits and their softplus; autograd keeps the logits (softplus's input).
    """
    scaled = image_embeds * logit_scale.exp().to(image_embeds.dtype)  # (b_img, D): t * x_i
    logits = scaled @ text_embeds.T + logit_bias  # (b_img, b_txt): z_ij = t <x_i, y_j> + b
    nll = F.softplus(logits).sum()  # every pair scored as a non-match ...
    if isinstance(matches, torch.Tensor):
        nll = nll - (logits * matches).sum()  # ... and the matches corrected: softplus(z) - z
    elif matches:
        matched = (scaled * text_embeds).sum(-1) + logit_bias  # (b,): z_ii
        nll = nll - matched.sum()
    return nll


def sigmoid_loss(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
    match_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """SigLIP's sigmoid loss over one batch of B matching pairs (paper Eq. 2):

        L = -1/B * sum_i sum_j log sigmoid(label_ij * (t <x_i, y_j> + b)),   label_ij = +1 if i == j else -1,

    summed over the B texts for each image, averaged over the B images. The label matrix is symmetric, so
    this equals transformers' "sum over images per text, mean over texts". With B positives and B^2 - B
    negatives the negatives dominate at first; b = -10 at initialisation makes every logit start near
    "no match", where the many negatives cost little (softplus(-10) ~ 4.5e-5), which is why the paper adds
    the bias. With `match_ids` (B,), label_ij = +1 wherever match_ids[i] == match_ids[j] (module docstring).
    Returns a scalar."""
    _check_pairs(image_embeds, text_embeds, match_ids)
    matches = True if match_ids is None else match_ids[:, None] == match_ids[None, :]
    return (
        _sigmoid_nll_sum(image_embeds, text_embeds, logit_scale, logit_bias, matches) / image_embeds.shape[0]
    )


def softmax_loss(
    image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """CLIP's softmax loss (InfoNCE, both directions) over one batch of B matching pairs:

        z_ij = t <x_i, y_j>
        image -> text: p(j | i) = exp(z_ij) / sum_k exp(z_ik),   L_img = -1/B sum_i log p(i | i)
        text -> image: p(i | j) = exp(z_ij) / sum_k exp(z_kj),   L_txt = -1/B sum_j log p(j | j)
        L = (L_img + L_txt) / 2

    i.e. cross-entropy over the rows of the (B, B) logits with target i, and over its columns likewise. Each
    probability is normalised over the WHOLE batch (a row or a column), which is what makes this loss need
    the full B x B matrix, twice (once per direction) - the cost the sigmoid loss avoids. Returns a scalar.
    """
    _check_pairs(image_embeds, text_embeds)
    scaled = image_embeds * logit_scale.exp().to(image_embeds.dtype)  # (B, D): scale the small side
    logits = scaled @ text_embeds.T  # (B, B): rows are images, columns texts
    targets = torch.arange(logits.shape[0], device=logits.device)  # pair i sits on the diagonal
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


def chunked_sigmoid_loss(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
    group: dist.ProcessGroup | None = None,
    match_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """The sigmoid loss over the GLOBAL batch of all processes, with each process holding only its own
    b_r pairs and no process ever building the global (B, B) logits (paper section 3.3, Fig. 1).

    The global sum splits by the rank r that holds image i and the rank s that holds text j:

        sum_i sum_j nll_ij = sum_r sum_s [ sum_{i in images_r} sum_{j in texts_s} nll_ij ]

    Rank r computes its row of blocks: step 0 pairs its images with its own texts (the only block with
    positives, on its diagonal); then, W - 1 times, every rank passes the text block it holds to rank r + 1
    and receives one from rank r - 1, so at step k rank r holds rank (r - k)'s texts and adds that block's
    all-negative sum. A block's logits are (b_r, b_s); the backward recomputes them, so only one is alive at a
    time, in the forward and in the backward pass. The ring pass is an autograd function whose backward sends
    each block's gradient back the way it came, so text embeddings get the gradient of every rank's use of
    them: backward on every rank leaves the exact global gradient on each rank's own embeddings (below).

    What each rank returns, and what a trainer does with it (W = world size, B = sum of local batches):

        returns  L_r = W / B * sum_{i in images_r} sum_{all j} nll_ij

    - The MEAN of L_r over ranks is the single-process loss over the global batch (for logging:
      `dist.all_reduce(loss.detach()); loss / W`, or accelerate's `gather(loss).mean()`). With equal local
      batches, W / B = 1 / b: L_r is "the mean over my images of the sum over all texts".
    - Calling `L_r.backward()` on every rank leaves W times the global loss's gradient on each rank's own
      embeddings, and W times rank r's share of it on rank r's parameters (logit_scale and logit_bias
      included). DDP AVERAGES gradients over ranks: (1/W) * sum_r W * share_r = the exact single-process
      gradient, with no extra factor in the trainer. Without DDP, sum the gradients over ranks and divide
      by W (or all_reduce with AVG).

    Works with every backend that has point-to-point sends and `all_gather` (gloo on CPU, NCCL on GPU; with
    NCCL the embeddings must be on this rank's CUDA device). Local batches may differ in size between ranks.
    Without an initialised process group (or with one process) it is `sigmoid_loss`.

    `match_ids` (b_r,), this rank's pairs' ids, as in `sigmoid_loss`: they travel around the ring with the
    text blocks, so every block knows its matches, which may then lie in any block.
    """
    _check_pairs(image_embeds, text_embeds, match_ids)
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return sigmoid_loss(image_embeds, text_embeds, logit_scale, logit_bias, match_ids)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    sizes = _local_batch_sizes(image_embeds.shape[0], image_embeds.device, group)  # b_0 .. b_{W-1}
    to_rank, from_rank = _global_rank((rank + 1) % world, group), _global_rank((rank - 1) % world, group)

    def block_sum(texts: torch.Tensor, diagonal: bool, text_ids: torch.Tensor | None) -> torch.Tensor:
        matches = diagonal if match_ids is None else match_ids[:, None] == text_ids[None, :]
        return _SigmoidBlockNLL.apply(image_embeds, texts, logit_scale, logit_bias, matches)

    texts, text_ids = text_embeds, match_ids  # (b_r, D): the block this rank holds now; at step 0 its own
    total = block_sum(texts, True, text_ids)
    for step in range(1, world):
        rows = sizes[(rank - step) % world]  # the block arriving now left rank r - step
        texts = _RingPass.apply(texts, to_rank, from_rank, rows, group)  # (rows, D)
        if text_ids is not None:  # plain data, no gradient: the ids ride along with their block
            text_ids = _exchange(text_ids, to_rank, from_rank, rows, group)
        total = total + block_sum(texts, False, text_ids)
    return total * (world / sum(sizes))


class _SigmoidBlockNLL(torch.autograd.Function):
    """`_sigmoid_nll_sum` for one block, keeping only its inputs for backward and recomputing the (b_img, b_txt)
    logits there, so a block's logits live only while that block is being worked on.

    The gradient, written out: with y_ij = 1 for a matching pair and 0 otherwise,
        d/dz [-log sigmoid(z)]  = sigmoid(z) - 1    (a match)
        d/dz [softplus(z)]      = sigmoid(z)        (a non-match)
    i.e. sigmoid(z) - y, logistic regression's residual. With z_ij = t <x_i, y_j> + b and the block's
    residuals G = sigmoid(Z) - Y (b_img, b_txt):
        dL/dX = t G Y              dL/dY = t G^T X
        dL/dt' = sum_ij G_ij * t <x_i, y_j> = t * sum_i <x_i, (G Y)_i>      (dt/dt' = t)
        dL/db = sum_ij G_ij
    G is the only block-sized tensor (built in place from the recomputed logits); dL/dt' reuses G Y.
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        image_embeds: torch.Tensor,
        text_embeds: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor,
        matches: bool | torch.Tensor,
    ) -> torch.Tensor:
        ctx.save_for_backward(image_embeds, text_embeds, logit_scale, logit_bias)
        ctx.matches = matches  # a bool block (when not a flag) is data, not an autograd input
        return _sigmoid_nll_sum(image_embeds, text_embeds, logit_scale, logit_bias, matches)

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        x, y, logit_scale, logit_bias = ctx.saved_tensors
        t = logit_scale.exp().to(x.dtype)
        g = ((x * t) @ y.T + logit_bias).sigmoid_()  # (b_img, b_txt): sigmoid(z), z exactly as in forward ...
        if isinstance(ctx.matches, torch.Tensor):
            g.sub_(ctx.matches.to(g.dtype))  # ... minus y: the residuals G
        elif ctx.matches:
            g.diagonal().sub_(1.0)
        g.mul_(grad)  # times the upstream gradient (a scalar)
        g = g.to(x.dtype)  # the matmuls run in the embeddings' dtype (a no-op in fp32)
        gy = g @ y  # (b_img, D): sum_j G_ij y_j
        grad_x = gy * t
        grad_y = (g.T @ x) * t  # (b_txt, D)
        grad_scale = ((x * gy).sum() * t).reshape(logit_scale.shape).to(logit_scale.dtype)
        grad_bias = g.sum().reshape(logit_bias.shape).to(logit_bias.dtype)
        return grad_x, grad_y, grad_scale, grad_bias, None


class _RingPass(torch.autograd.Function):
    """Forward: send `x` to `to_rank`, return the block received from `from_rank`.
    Backward: our `x` became `to_rank`'s output, so ITS gradient arrives from `to_rank`, while the
    gradient of what we received goes back to `from_rank` - the same ring, in reverse."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        x: torch.Tensor,
        to_rank: int,
        from_rank: int,
        rows: int,
        group: dist.ProcessGroup | None,
    ) -> torch.Tensor:
        ctx.to_rank, ctx.from_rank, ctx.rows, ctx.group = to_rank, from_rank, x.shape[0], group
        return _exchange(x, to_rank, from_rank, rows, group)

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        return _exchange(grad, ctx.from_rank, ctx.to_rank, ctx.rows, ctx.group), None, None, None, None


def _exchange(
    x: torch.Tensor, to_rank: int, from_rank: int, rows: int, group: dist.ProcessGroup | None
) -> torch.Tensor:
    """Send x to one peer while receiving a (rows, *x.shape[1:]) tensor from another, as one batch of
    point-to-point ops: every rank posts both at once, so no ordering of sends and receives can deadlock."""
    x = x.contiguous()
    received = x.new_empty((rows, *x.shape[1:]))
    ops = [dist.P2POp(dist.isend, x, to_rank, group), dist.P2POp(dist.irecv, received, from_rank, group)]
    for request in dist.batch_isend_irecv(ops):
        request.wait()
    return received


def _local_batch_sizes(size: int, device: torch.device, group: dist.ProcessGroup | None) -> list[int]:
    """Every rank's local batch size: the receive buffers need them, and the loss needs their sum B."""
    mine = torch.tensor([size], dtype=torch.int64, device=device)
    everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(everyone, mine, group=group)
    return [int(s) for s in everyone]


def _global_rank(group_rank: int, group: dist.ProcessGroup | None) -> int:
    return group_rank if group is None else dist.get_global_rank(group, group_rank)


def _check_pairs(
    image_embeds: torch.Tensor, text_embeds: torch.Tensor, match_ids: torch.Tensor | None = None
) -> None:
    if image_embeds.ndim != 2 or image_embeds.shape != text_embeds.shape:
        raise ValueError(
            "image_embeds and text_embeds must both be (B, D), row i of each a matching pair; got "
            f"{tuple(image_embeds.shape)} and {tuple(text_embeds.shape)}"
        )
    if match_ids is not None and match_ids.shape != image_embeds.shape[:1]:
        raise ValueError(
            f"match_ids must be ({image_embeds.shape[0]},), one per pair; got {tuple(match_ids.shape)}"
        )
