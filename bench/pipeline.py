"""Fine-tuning's input pipeline against the model it feeds: can batches be made faster than a GPU eats them?

    .venv/bin/python bench/pipeline.py [--batch 64] [--steps 20] [--workers N] [--config configs/X.yaml]
    .venv/bin/python bench/pipeline.py --smoke      # a few steps: the same path and table in seconds

The data is a fine-tuning recipe's `data.train` and `data.max_length` (default configs/easyvqa_offline.yaml:
easy-VQA questions, emoji and flag captions, weights 1 / 0.5 / 1), tokenised by the default model's tokenizer
and processed for its 64 px tower. Rows:

- `prepare` (the reference: what the loop did before `vlm.pipeline`): `model.prepare` of each step's
  conversations in the training process, every time;
- `pipeline, cold`: `vlm.pipeline.StepBatches`, first epoch (every text tokenised, every image decoded);
- `pipeline, warm`: the same builder later on, its token and pixel caches filled (an epoch of the recipe is
  ~5,900 rows: from the second epoch on, every step is warm);
- `pipeline, N workers, cold`: a `DataLoader` with N worker processes building first-epoch steps in parallel,
  timed from the first step's arrival (starting the workers, once a run, left out; they share this machine's
  cores with the training process: run where there are cores to spare);
- `prepared ahead`: `vlm.pipeline.prepare_ahead` builds the recipe's token and pixel files (in a temporary
  folder, so it is a real build; its time and size are printed), then a fresh builder reads them: the first
  epoch of every later run, in this process and with N workers.

Then what the model consumes: one training step of the default model at the same batch on this machine's
CPU (forward, backward, AdamW; bf16 autocast as the recipe where the CPU has bf16 units, else float32), and
the figure a GPU must be fed at, the 1,500 samples/s target of issue 12 for one H200. The verdict line
compares the pipeline with 10x that, per worker and for the workers a 16-core GPU machine would run
(`default_workers`: 8).

Packing (`data.pack`: several conversations in one row with a block-diagonal mask, as nanoVLM does) pays
back the padding a batch carries; the padding line says how much that is on this data, and the last lines
time the model step on the same rows padded and packed.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from vlm.config import load_config  # noqa: E402
from vlm.data import open_data  # noqa: E402
from vlm.devices import native_bf16  # noqa: E402
from vlm.pipeline import StepBatches, prepare_ahead, step_loader  # noqa: E402
from vlm.training import Stream  # noqa: E402

GPU_TARGET = 1500  # samples/s: issue 12's target for the shipped recipe on one H200
GPU_WORKERS = 8  # what `default_workers` gives a 16-core GPU machine


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


RECIPE = ROOT / "configs" / "easyvqa_offline.yaml"


def sources(config: Path, limit: int | None) -> tuple[list, list[float], int]:
    """The recipe's training sources as train/finetune.py reads them (each capped at `limit` rows), their
    weights and `data.max_length`."""
    name = "bench_pipeline_finetune"  # not "finetune": the tests load the script under that name themselves
    spec = importlib.util.spec_from_file_location(name, ROOT / "train" / "finetune.py")
    finetune = importlib.util.module_from_spec(spec)
    sys.modules[name] = finetune  # its config dataclasses need their module registered
    spec.loader.exec_module(finetune)
    data = load_config(finetune.FinetuneConfig, config).data
    specs = [s.spec() for s in data.train]
    if limit is not None:
        specs = [replace(s, limit=min(s.limit or limit, limit)) for s in specs]
    return [open_data(s) for s in specs], [s.weight for s in data.train], data.max_length


def rate(run, steps: int, batch: int) -> float:
    start = time.perf_counter()
    run()
    return steps * batch / (time.perf_counter() - start)


def loader_rate(batches: StepBatches, steps: int, workers: int, batch: int) -> float:
    """Steps a second from `workers` DataLoader workers once they run: timed from the first step's arrival
    (starting the processes, once a run, is left out), so `steps` - 1 steps are counted."""
    items = step_loader(batches, 0, steps, workers)
    next(items)
    start = time.perf_counter()
    count = sum(1 for _ in items)
    return count * batch / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--smoke", action="store_true", help="a few steps of a small sample: seconds")
    parser.add_argument(
        "--config", type=Path, default=RECIPE, help="the fine-tuning recipe whose data is read"
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.batch, args.steps, args.workers = 4, 2, 1
    from vlm.model import load_default_model

    torch.manual_seed(0)
    model = load_default_model()
    data, weights, max_length = sources(args.config, 32 if args.smoke else None)
    stream = Stream([len(s) for s in data], weights, seed=0)
    preparer = model.preparer

    def builder(pack: bool = False, prepared=None) -> StepBatches:
        return StepBatches(
            data, stream, preparer, batch_size=args.batch, max_length=max_length, pack=pack, prepared=prepared
        )

    def conversations(step: int, b: StepBatches) -> list:
        return [b.conversation(step, key) for key in stream.step_rows(step, args.batch)[0]]

    steps = range(args.steps)
    ref = builder()
    rows = {"prepare (reference)": rate(lambda: [model.prepare(conversations(s, ref), max_length=max_length) for s in steps],
                                        args.steps, args.batch)}  # fmt: skip
    warm = builder()
    rows["pipeline, cold"] = rate(lambda: [warm[s] for s in steps], args.steps, args.batch)
    rows["pipeline, warm"] = rate(lambda: [warm[s] for s in steps], args.steps, args.batch)
    fresh = builder()
    rows[f"pipeline, {args.workers} workers, cold"] = loader_rate(fresh, args.steps, args.workers, args.batch)
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        prepare_ahead(data, preparer, max_length, folder=Path(folder), log=lambda _: None)
        built_in = time.perf_counter() - start
        stored = sum(f.stat().st_size for f in Path(folder).iterdir())
        start = time.perf_counter()  # called again, as a later run would: it opens what the first call built
        prepared = prepare_ahead(data, preparer, max_length, folder=Path(folder), log=lambda _: None)
        opened_in = time.perf_counter() - start
        read = builder(prepared=prepared)
        rows["pipeline, prepared ahead"] = rate(lambda: [read[s] for s in steps], args.steps, args.batch)
        read = builder(prepared=prepared)
        rows[f"pipeline, {args.workers} workers, prepared ahead"] = loader_rate(
            read, args.steps, args.workers, args.batch
        )

    # padding: the share of a padded batch's positions that hold real tokens, i.e. the most that packing
    # conversations into full rows (nanoVLM's knapsack packing, a block-diagonal mask) could save
    real = padded = padded_rows = 0
    for s in steps:
        for b in warm[s].batches:
            real += int(b.attention_mask.sum())
            padded += b.attention_mask.numel()
            padded_rows += len(b.input_ids)

    packed = builder(pack=True)
    packed_rows = sum(len(b.input_ids) for s in steps for b in packed[s].batches)

    # what the model consumes: one training step of the default model at this batch, on this CPU
    model.freeze(("vision", "lm"))  # the projector trains (and LoRA, which the loaded adapter brings along)
    for name, p in model.named_parameters():
        p.requires_grad |= "lora_" in name
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    model.train()

    bf16 = native_bf16("cpu")  # as train/finetune.py: bf16 autocast only where the CPU has bf16 units

    def step(batch) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(batch.input_ids, batch.attention_mask, batch.pixel_values, batch.labels, reduction="sum",
                        image_index=batch.image_index, learned_index=batch.learned_index,
                        learned_targets=batch.learned_targets, position_ids=batch.position_ids)  # fmt: skip
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    n = 1 if args.smoke else 3
    timed = {}
    for name, b in (("padded", warm), ("packed", packed)):
        batches = [b[s].batches[0] for s in range(n)]  # the same rows both ways
        step(batches[0])  # warm-up
        timed[name] = rate(lambda batches=batches: [step(x) for x in batches], n, args.batch)
    consumed = timed["padded"]

    print(f"input pipeline, {args.config.name}'s data, batch {args.batch}, {args.steps} steps; {cpu_name()}, "
          f"{os.cpu_count()} CPUs, torch {torch.__version__}")  # fmt: skip
    reference = rows["prepare (reference)"]
    print(f"{'':<34}{'samples/s':>11}{'vs prepare':>12}")
    for name, value in rows.items():
        print(f"{name:<34}{value:>11,.0f}{value / reference:>11.2f}x")
    print(f"{'model step (this CPU, consumes)':<34}{consumed:>11,.1f}")
    print(
        f"prepared ahead: built in {built_in:,.1f} s ({stored / 2**20:,.0f} MiB, "
        f"{len(prepared.token_index):,} conversations, {len(prepared.pixel_index):,} images); "
        f"a later run opens it in {opened_in:,.2f} s"
    )
    print(
        f"padding: {real / padded:.1%} of the batches' positions are real tokens, so packing could save at most "
        f"{1 - real / padded:.1%} of the LM's work on this data"
    )
    print(
        f"packed into rows of {max_length} tokens: {packed_rows} rows instead of {padded_rows}; the model step "
        f"{timed['padded']:,.1f} samples/s padded, {timed['packed']:,.1f} packed: "
        f"{timed['packed'] / timed['padded']:.2f}x"
    )
    for name in ("pipeline, prepared ahead", "pipeline, warm"):
        per_worker = rows[name]
        print(
            f"{name} / model step here: {per_worker / consumed:,.0f}x; one worker / GPU target "
            f"({GPU_TARGET:,}/s): {per_worker / GPU_TARGET:.1f}x; {GPU_WORKERS} workers: "
            f"{GPU_WORKERS * per_worker / GPU_TARGET:.1f}x (>= 10x wanted)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
