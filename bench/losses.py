"""Sigmoid (SigLIP) vs softmax (CLIP) loss: time and peak memory as the batch grows, and the ring-chunked
sigmoid loss against gathering the batch, per process, in a 2-process gloo run.

    python bench/losses.py            # batch 256 ... 16384, 2-4 minutes on 2 CPU cores
    python bench/losses.py --quick    # batch 256 ... 2048, well under a minute
    python bench/losses.py --smoke    # batch 64 only: the same path, tables and plot in seconds

Prints two tables and writes `out/bench_losses.png` (+ `out/bench_losses.json`).

What is measured (each configuration in a FRESH process, forked from a parent that only imported torch)
- Memory: the process builds its inputs, runs a tiny warm-up (one-time allocations such as gloo's
  connections are not counted), reads its peak resident set size (`resource.getrusage(RUSAGE_SELF)
  .ru_maxrss`), runs one forward + backward of the loss, and reads it again. The difference is the extra
  resident memory the loss needed at its peak: logits, softmax/softplus outputs, everything autograd saved,
  the gradients. A high-water mark cannot miss a short-lived buffer. For this run glibc serves every block
  over 256 KiB with its own mmap and unmaps it on free (`malloc_for_memory`): by default a freed tensor may
  stay in the heap and keep counting, and the peak would depend on what ran before.
- Time: then, with glibc's usual steady-state thresholds back (`malloc_for_speed`; fresh mmaps would add
  page faults to every step), the median wall clock of a few more forward + backward steps (5 up to
  B = 2048, 2 at 4096, 1 above), on (B, 768) L2-normalised fp32 embeddings, the loss alone.
- Ring vs gathered, each rank holding b = B / 2 pairs, one thread per process:
    ring         `vlm.losses.chunked_sigmoid_loss`: text blocks passed neighbour to neighbour, (b, b) logits
    gather-rows  all_gather the texts, then the rank's (b, B) rows of logits (CLIP-style gathering)
    gather-full  all_gather images and texts, then the full (B, B) sigmoid loss on every rank
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import resource
import socket
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn  # all_gather with a backward pass
import torch.multiprocessing as mp
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from vlm.losses import chunked_sigmoid_loss, sigmoid_loss, softmax_loss  # noqa: E402

DIM = 768
# The autograd-aware all_gather above still works, but warns that a newer (private) API exists.
warnings.filterwarnings("ignore", category=FutureWarning, message=".*all_gather is deprecated")
MIB = 1024 * 1024


def mallopt(param: int, value: int) -> None:
    with contextlib.suppress(OSError):  # not glibc: memory is then an upper bound with allocator slack
        ctypes.CDLL("libc.so.6").mallopt(param, value)


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


def malloc_for_memory() -> None:
    """Every block over 256 KiB is its own mmap, unmapped on free: resident memory follows live tensors."""
    mallopt(M_MMAP_THRESHOLD, 256 * 1024)


def malloc_for_speed() -> None:
    """glibc's steady state after large frees (its dynamic thresholds' maximum): blocks up to 32 MiB reuse
    the heap instead of faulting in fresh pages each step."""
    mallopt(M_MMAP_THRESHOLD, 32 * MIB)
    mallopt(M_TRIM_THRESHOLD, 64 * MIB)


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def measure(step: Callable[[], None], batch: int) -> dict[str, float]:
    """Peak extra memory of one step, then the median time of a few more (the first step warmed them up)."""
    malloc_for_memory()
    before = peak_rss_bytes()
    step()
    peak_mib = (peak_rss_bytes() - before) / MIB
    malloc_for_speed()
    times = []
    for _ in range(5 if batch <= 2048 else 2 if batch <= 4096 else 1):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"seconds": statistics.median(times), "peak_mib": peak_mib}


def embeddings(batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = F.normalize(torch.randn(batch, DIM, generator=g), dim=-1)
    texts = F.normalize(images + torch.randn(batch, DIM, generator=g), dim=-1)  # matches a bit closer
    return images.requires_grad_(), texts.requires_grad_()


# --- one process: sigmoid vs softmax ------------------------------------------------------------------------


def single_worker(queue: Any, loss_name: str, batch: int, threads: int) -> None:
    torch.set_num_threads(threads)
    images, texts = embeddings(batch, seed=0)
    scale = torch.tensor([2.3], requires_grad=True)  # t = 10, b = -10: the paper's initialisation
    bias = torch.tensor([-10.0], requires_grad=True)

    def step() -> None:
        if loss_name == "sigmoid":
            loss = sigmoid_loss(images, texts, scale, bias)
        else:
            loss = softmax_loss(images, texts, scale)
        loss.backward()
        for t in (images, texts, scale, bias):
            t.grad = None

    small = embeddings(8, seed=1)  # touch the kernels once on tiny inputs: no large buffers yet
    sigmoid_loss(*small, scale, bias).backward()
    softmax_loss(*small, scale).backward()
    queue.put({"loss": loss_name, "batch": batch, **measure(step, batch)})


# --- two processes: ring vs gathered ------------------------------------------------------------------------


def gather_rows_loss(
    images: torch.Tensor, texts: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """All texts gathered, this rank's (b, B) rows of logits; same normalisation as the ring (W / B)."""
    world, rank, b = dist.get_world_size(), dist.get_rank(), images.shape[0]
    all_texts = torch.cat(dist_fn.all_gather(texts))  # (B, D), gradients flow back to each rank
    logits = (images * scale.exp()) @ all_texts.T + bias  # (b, B)
    nll = F.softplus(logits).sum() - logits[:, rank * b : (rank + 1) * b].diagonal().sum()
    return nll * world / all_texts.shape[0]


def gather_full_loss(
    images: torch.Tensor, texts: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """Images and texts gathered, the full (B, B) loss on every rank (the naive way)."""
    return sigmoid_loss(
        torch.cat(dist_fn.all_gather(images)), torch.cat(dist_fn.all_gather(texts)), scale, bias
    )


VARIANTS = {"ring": chunked_sigmoid_loss, "gather-rows": gather_rows_loss, "gather-full": gather_full_loss}


def ring_worker(rank: int, queue: Any, world: int, port: int, variant: str, batch: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # one core per process on a 2-core machine
    dist.init_process_group("gloo", rank=rank, world_size=world)
    loss_fn = VARIANTS[variant]
    scale = torch.tensor([2.3], requires_grad=True)
    bias = torch.tensor([-10.0], requires_grad=True)
    loss_fn(*embeddings(8, seed=100 + rank), scale, bias).backward()  # connections and kernels, once
    images, texts = embeddings(batch // world, seed=rank)

    def step() -> None:
        dist.barrier()  # start together: a rank's time then is its own work plus waiting for its neighbours
        loss_fn(images, texts, scale, bias).backward()
        for t in (images, texts, scale, bias):
            t.grad = None

    queue.put({"variant": variant, "batch": batch, "rank": rank, **measure(step, batch)})
    dist.destroy_process_group()


# --- driver -------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_single(loss: str, batch: int, threads: int) -> dict[str, Any]:
    """One configuration in a fresh process; a crash (e.g. out of memory) is reported, not fatal."""
    ctx = mp.get_context("fork")  # a fresh process, without paying for importing torch again
    queue = ctx.SimpleQueue()
    proc = ctx.Process(target=single_worker, args=(queue, loss, batch, threads))
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        return {"loss": loss, "batch": batch, "failed": f"exit code {proc.exitcode} (killed for memory?)"}
    return queue.get()


def run_ranks(variant: str, batch: int, world: int = 2) -> list[dict[str, Any]]:
    """One configuration as `world` fresh processes joined by gloo; results of every rank."""
    ctx = mp.get_context("fork")  # a fresh process, without paying for importing torch again
    queue = ctx.SimpleQueue()
    port = free_port()
    procs = [
        ctx.Process(target=ring_worker, args=(rank, queue, world, port, variant, batch))
        for rank in range(world)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    if any(p.exitcode != 0 for p in procs):
        codes = [p.exitcode for p in procs]
        return [{"variant": variant, "batch": batch, "failed": f"exit codes {codes} (killed for memory?)"}]
    return [queue.get() for _ in procs]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller batches (under a minute)")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="batch 64 only: checks the benchmark runs (seconds; tests/test_bench.py), measures nothing",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="threads of the one-process runs (default 1: on a shared 2-core machine, a thread pool that waits "
        "for a descheduled thread dominates small batches; the 2-process runs use 1 thread per process)",
    )
    parser.add_argument("--out", type=Path, default=Path("out"), help="folder for the PNG and JSON")
    args = parser.parse_args(argv)
    if args.smoke:
        single_sizes, ring_sizes = [64], [64]
    elif args.quick:
        single_sizes, ring_sizes = [256, 512, 1024, 2048], [1024, 2048]
    else:
        single_sizes, ring_sizes = [256, 512, 1024, 2048, 4096, 8192, 16384], [2048, 4096, 8192]
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, embeddings (B, {DIM}) fp32")

    single = []
    print(f"\nOne process, {args.threads} thread(s): loss forward + backward (peak = extra resident memory)")
    print(f"{'batch':>7} | {'sigmoid s':>10} {'softmax s':>10} | {'sigmoid MiB':>12} {'softmax MiB':>12}")
    for batch in single_sizes:
        row = {}
        for loss in ("sigmoid", "softmax"):
            result = run_single(loss, batch, args.threads)
            row[loss] = result
            single.append(result)
        print(
            f"{batch:>7} | {row['sigmoid'].get('seconds', float('nan')):>10.3f} "
            f"{row['softmax'].get('seconds', float('nan')):>10.3f} | "
            f"{row['sigmoid'].get('peak_mib', float('nan')):>12.0f} {row['softmax'].get('peak_mib', float('nan')):>12.0f}"
        )

    ring = []
    print(
        "\nTwo processes (gloo, 1 thread each), global batch B, b = B/2 per rank: per-process peak and time"
    )
    print(
        f"{'B':>7} | "
        + " ".join(f"{v + ' MiB':>16}" for v in VARIANTS)
        + " | "
        + " ".join(f"{v + ' s':>14}" for v in VARIANTS)
    )
    for batch in ring_sizes:
        row = {}
        for variant in VARIANTS:
            results = run_ranks(variant, batch)
            worst = max(results, key=lambda r: r.get("peak_mib", float("inf")))
            row[variant] = worst
            ring.extend(results)
        print(
            f"{batch:>7} | "
            + " ".join(f"{row[v].get('peak_mib', float('nan')):>16.0f}" for v in VARIANTS)
            + " | "
            + " ".join(f"{row[v].get('seconds', float('nan')):>14.3f}" for v in VARIANTS)
        )

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_losses.json").write_text(json.dumps({"single": single, "ring": ring}, indent=1) + "\n")
    plot(single, ring, args.out / "bench_losses.png")
    print(f"\nwrote {args.out / 'bench_losses.png'} and {args.out / 'bench_losses.json'}")


def plot(single: list[dict[str, Any]], ring: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for loss, style in (("sigmoid", "o-"), ("softmax", "s--")):
        rows = [r for r in single if r.get("loss") == loss and "seconds" in r]
        axes[0].plot([r["batch"] for r in rows], [r["seconds"] for r in rows], style, label=loss)
        axes[1].plot([r["batch"] for r in rows], [r["peak_mib"] for r in rows], style, label=loss)
    axes[0].set(title="loss forward + backward, one process", ylabel="seconds")
    axes[1].set(title="loss peak memory, one process", ylabel="extra peak RSS (MiB)")
    for variant, style in zip(VARIANTS, ("o-", "s--", "^:"), strict=True):
        per_batch: dict[int, float] = {}
        for r in ring:
            if r.get("variant") == variant and "peak_mib" in r:
                per_batch[r["batch"]] = max(per_batch.get(r["batch"], 0.0), r["peak_mib"])
        batches = sorted(per_batch)
        axes[2].plot(batches, [per_batch[b] for b in batches], style, label=variant)
    axes[2].set(title="sigmoid loss, 2 processes: per-process peak", ylabel="extra peak RSS (MiB)")
    for ax in axes:
        ax.set(xscale="log", yscale="log", xlabel="global batch B")
        ax.set_xscale("log", base=2)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"SigLIP vs CLIP loss on this machine (embeddings {DIM}, fp32, CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
