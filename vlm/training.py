"""Pieces every training loop here shares: the LR schedule, a resumable data order, fault-proof checkpoints,
metrics and curves, and the steps of a loop that are the same in every script (starting the run, resuming,
checkpointing from one process, the progress bar).

Checkpoints are folders `step-00000100/` under a run's `checkpoints/`, written under a temporary name and
renamed into place only when complete (a rename is atomic on one filesystem), with a `COMPLETE` marker
written last: a crash or `kill -9` mid-save leaves a temporary folder that is never loaded. Everything is
safetensors or JSON: optimizer state and RNG state included, so resuming never unpickles anything.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Collection
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

if TYPE_CHECKING:
    from accelerate import Accelerator

COMPLETE = "COMPLETE"


def cosine_lr(step: int, total_steps: int, warmup_steps: int, peak: float, final_ratio: float = 0.1) -> float:
    """Linear warm-up from 0 to `peak` over `warmup_steps`, then a cosine down to `final_ratio * peak`."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return peak * (final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Each param group keeps its `lr_scale` (per-module learning rates) relative to the schedule."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def epoch_order(
    sizes: list[int], weights: list[float], epoch: int, seed: int, sequential: Collection[int] = ()
) -> list[tuple[int, int]]:
    """(source, row) pairs for one epoch: each source repeated or subsampled by its weight, shuffled by a
    seed that depends only on (seed, epoch) — so any data position can be recomputed on resume.

    A `sequential` source (a stream, read in order) keeps its share of the shuffled places, but its rows fill
    them in order: 0, 1, 2, ... (wrapping around when its weight is above 1)."""
    rng = random.Random(seed * 1_000_003 + epoch)
    order = []
    for s, (size, weight) in enumerate(zip(sizes, weights, strict=True)):
        whole, part = int(weight), weight - int(weight)
        rows = list(range(size)) * whole + rng.sample(range(size), round(size * part))
        order += [(s, r) for r in rows]
    rng.shuffle(order)
    if sequential:
        taken = dict.fromkeys(sequential, 0)
        for i, (s, _) in enumerate(order):
            if s in taken:
                order[i] = (s, taken[s] % sizes[s])
                taken[s] += 1
    return order


class Stream:
    """Global micro-batches of (source, row) pairs, addressable by position for exact resumption."""

    def __init__(
        self, sizes: list[int], weights: list[float], seed: int, sequential: Collection[int] = ()
    ) -> None:
        self.sizes, self.weights, self.seed, self.sequential = sizes, weights, seed, tuple(sequential)
        self.epoch_len = len(epoch_order(sizes, weights, 0, seed))
        if self.epoch_len == 0:
            raise ValueError("the training data is empty")
        self._cache: tuple[int, list[tuple[int, int]]] | None = None

    def take(self, position: int, n: int) -> list[tuple[int, int]]:
        """The `n` (source, row) pairs from `position` on (positions count rows since the first epoch)."""
        out = []
        for p in range(position, position + n):
            epoch, index = divmod(p, self.epoch_len)
            if self._cache is None or self._cache[0] != epoch:
                self._cache = (
                    epoch,
                    epoch_order(self.sizes, self.weights, epoch, self.seed, self.sequential),
                )
            out.append(self._cache[1][index])
        return out

    def step_rows(
        self, step: int, batch_size: int, grad_accum: int = 1, world: int = 1, rank: int = 0
    ) -> list[list[tuple[int, int]]]:
        """This process's rows for optimizer step `step`: `grad_accum` micro-batches of `batch_size` pairs.
        A step is `batch_size * world * grad_accum` consecutive positions; each micro-batch is a global one of
        `batch_size * world`, of which process `rank` takes its slice. Depends on `step` alone, so a resumed
        run draws what the uninterrupted one would."""
        position = step * batch_size * world * grad_accum
        out = []
        for micro in range(grad_accum):
            pairs = self.take(position + micro * batch_size * world, batch_size * world)
            out.append(pairs[rank * batch_size : (rank + 1) * batch_size])
        return out

    def describe(self, per_step: int, steps: int) -> str:
        """One line for the log: rows an epoch, rows a step, and how many epochs the run makes."""
        return (
            f"{self.epoch_len:,} rows an epoch; {per_step} a step; {steps} steps = "
            f"{steps * per_step / self.epoch_len:.2f} epochs"
        )


# -- optimizer and RNG state as safetensors + JSON --------------------------------------------------------


def optimizer_to_files(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, entry in state["state"].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{name}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{index}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_from_files(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]
) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, value in [*tensors.items(), *meta["scalars"].items()]:
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors |= {f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
    np_state = np.random.get_state()
    meta = {
        "python": _jsonable(random.getstate()),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
    }
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = meta["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))


def _jsonable(value: Any) -> Any:
    return [_jsonable(v) for v in value] if isinstance(value, (list, tuple)) else value


# -- checkpoints ---------------------------------------------------------------------------------------------


def save_training_checkpoint(
    run_dir: Path,
    step: int,
    write_model: Callable[[Path], None],
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    config: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write `checkpoints/step-<step>/` atomically: the model (through `write_model(folder)`), optimizer,
    RNG, loop `state` (step, data position, ...) and the resolved config. Keeps the newest `keep`."""
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".tmp-step-{step:08d}-"))
    try:
        write_model(tmp)
        opt_tensors, opt_meta = optimizer_to_files(optimizer)
        save_file(opt_tensors, tmp / "optimizer.safetensors")
        rng_tensors, rng_meta = rng_state()
        save_file(rng_tensors, tmp / "rng.safetensors")
        meta = {"step": step, "state": state, "optimizer": opt_meta, "rng": rng_meta, "config": config}
        (tmp / "trainer_state.json").write_text(json.dumps(meta, indent=1))
        (tmp / COMPLETE).write_text(time.strftime("%Y-%m-%dT%H:%M:%S"))
        if final.exists():  # a re-run that reached the same step again: replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in sorted(p for p in root.glob("step-*") if (p / COMPLETE).is_file())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path, log: Callable[[str], None] = print) -> Path | None:
    """The newest complete checkpoint, or None. Incomplete folders are reported and skipped."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return None
    for folder in sorted(root.glob("*step-*"), reverse=True):
        if folder.name.startswith("step-") and (folder / COMPLETE).is_file():
            return folder
        log(f"ignoring incomplete checkpoint {folder} (interrupted while saving)")
    return None


# What a resumed run may change: how long it runs, how it reports, where its folder is (a copied or moved run).
# Anything else (model, data, LR, batch, seed, ...) would make the continued run a different run.
RESUMABLE_CHANGES = ("train.out_dir", "train.steps", "train.checkpoint_every", "train.eval_every", "train.eval_batch_size",
                     "train.log_every", "train.tensorboard", "data.eval", "eval.")  # fmt: skip


def check_resumable(folder: Path, config: dict[str, Any]) -> None:
    """Refuse to continue `folder`'s run under a config that trains differently: re-running a command in an
    old run folder must not silently resume someone else's run. Raises ValueError naming the differences."""
    saved = json.loads((folder / "trainer_state.json").read_text()).get("config", {})

    def flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in d.items():
            out |= flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v}
        return out

    old, new = flat(saved), flat(json.loads(json.dumps(config)))  # as saved: tuples become lists
    differ = [
        k for k in sorted(old.keys() | new.keys())
        if old.get(k) != new.get(k) and not any(k == c or k.startswith(c) for c in RESUMABLE_CHANGES)
    ]  # fmt: skip
    if differ:
        shown = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in differ[:6])
        raise ValueError(
            f"{folder} was written by a run with a different config ({shown}{'; ...' if len(differ) > 6 else ''}); "
            "resuming would mix two runs: set another train.out_dir, or delete the old run folder"
        )


def load_training_state(folder: Path, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore optimizer and RNG from a checkpoint; returns its metadata (step, loop state, config)."""
    meta = json.loads((folder / "trainer_state.json").read_text())
    optimizer_from_files(optimizer, load_file(folder / "optimizer.safetensors"), meta["optimizer"])
    set_rng_state(load_file(folder / "rng.safetensors"), meta["rng"])
    return meta


# -- metrics -------------------------------------------------------------------------------------------------


class MetricsLog:
    """Append-only JSONL of metrics, one object per line, flushed at once (readable while training runs)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, **record: Any) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def write_eval(self, step: int, summary: dict[str, Any]) -> None:
        """An evaluation's scores at `step`, each key prefixed `eval_` (beside the training loss's keys)."""
        self.write(step=step, **{f"eval_{k}": v for k, v in summary.items()})

    def read(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def plot_curves(records: list[dict[str, Any]], path: Path, keys: tuple[str, ...], title: str) -> Path | None:
    """One panel per key, against step (e.g. loss and eval accuracy). Returns None when nothing to draw."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(k, [(r["step"], r[k]) for r in records if k in r and "step" in r]) for k in keys]
    panels = [(k, pts) for k, pts in panels if pts]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.5), squeeze=False)
    for ax, (key, points) in zip(axes[0], panels, strict=True):
        steps, values = zip(*points, strict=True)
        ax.plot(steps, values, marker="." if len(points) < 50 else None)
        ax.set_xlabel("step")
        ax.set_title(key)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# -- the loop's shared steps ------------------------------------------------------------------------------------


def make_accelerator(bf16: bool, seed: int) -> Accelerator:
    """The run's `accelerate.Accelerator` (bf16 autocast when asked and the hardware has bf16 units), with
    torch's and Python's RNG seeded. Where bf16 would be emulated (a CPU without AVX-512 BF16 or AMX, a GPU
    before Ampere) the run trains in float32 and says so: emulated, it is two orders of magnitude slower."""
    from accelerate import Accelerator

    from vlm.devices import native_bf16

    device = "cuda" if torch.cuda.is_available() else "cpu"
    emulated = bf16 and not native_bf16(device)
    # cpu=True on a machine without CUDA: accelerate then treats torchrun's WORLD_SIZE > 1 as multi-process
    # CPU (gloo); without it each process would train alone.
    precision = "bf16" if bf16 and not emulated else "no"
    accelerator = Accelerator(mixed_precision=precision, cpu=not torch.cuda.is_available())
    if emulated:
        accelerator.print(
            f"train.bf16: this {device.upper()} has no bf16 units (bf16 would be emulated, ~100x slower): "
            "training in float32"
        )
    torch.manual_seed(seed)
    random.seed(seed)
    return accelerator


def resume_point(
    run_dir: Path, resume: bool, config: dict[str, Any], log: Callable[[str], None] = print
) -> Path | None:
    """The checkpoint a run continues from: the newest complete one when `resume` is asked or the run folder
    exists (re-running a command continues its run), else None. Raises ValueError when that checkpoint was
    written under a config that trains differently (`check_resumable`)."""
    ckpt = latest_checkpoint(run_dir, log) if (resume or run_dir.exists()) else None
    if ckpt is not None:
        check_resumable(ckpt, config)
    return ckpt


def build_optimizer(groups: list[dict[str, Any]], name: str, lr: float) -> torch.optim.Optimizer:
    """AdamW or SGD over the parameter groups (each group's `lr_scale` is applied by `set_lr`)."""
    return torch.optim.AdamW(groups, lr=lr) if name == "adamw" else torch.optim.SGD(groups, lr=lr)


def resume_step(
    ckpt: Path | None, optimizer: torch.optim.Optimizer, log: Callable[[str], None] = print
) -> int:
    """The step a run starts at: 0, or the checkpoint's, with its optimizer and RNG state restored."""
    if ckpt is None:
        return 0
    step = load_training_state(ckpt, optimizer)["step"]
    log(f"resumed from {ckpt} at step {step}")
    return step


def open_run_folder(run_dir: Path, config: Any, main_process: bool = True) -> MetricsLog:
    """The run folder, with the resolved config beside it as `config.yaml` (written by the main process),
    and its `metrics.jsonl`."""
    from vlm.config import dump

    if main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        dump(config, run_dir / "config.yaml")
    return MetricsLog(run_dir / "metrics.jsonl")


def due(step: int, every: int, total: int, at_last: bool = True) -> bool:
    """Whether something done every `every` steps (0: never) falls on `step`. The last step (`total`) does
    with `at_last` (a log line, a checkpoint), never without (a mid-run evaluation: the final one follows)."""
    if step == total:
        return at_last
    return every > 0 and step % every == 0


def grad_sync(accelerator: Accelerator, model: torch.nn.Module, last: bool) -> AbstractContextManager:
    """Where a micro-batch's forward and backward run: gradients accumulate locally over a step's micro-batches
    (DDP's `no_sync`) and are all-reduced across processes once, on its `last`."""
    return accelerator.no_sync(model) if not last and accelerator.num_processes > 1 else nullcontext()


def save_checkpoint(
    accelerator: Accelerator,
    run_dir: Path,
    step: int,
    write_model: Callable[[Path], None],
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    config: dict[str, Any],
) -> None:
    """`save_training_checkpoint` from the main process, every process waiting before (so all have taken the
    step) and after (so none runs ahead of a checkpoint being written)."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_training_checkpoint(run_dir, step, write_model, optimizer, state, config)
    accelerator.wait_for_everyone()


class Progress:
    """A run's progress bar (on the local main process only) and its throughput in samples per second."""

    def __init__(self, total: int, initial: int, desc: str, per_step: int, enabled: bool = True) -> None:
        self.bar = tqdm(total=total, initial=initial, desc=desc, disable=not enabled)
        self.per_step, self.seen, self.started = per_step, 0, time.perf_counter()
        self.loss: float | None = None

    def update(self, loss: float | None, lr: float) -> float:
        """One step done: the bar moves and shows loss (the last one given: None keeps it, so that a loop need
        not read the loss off the accelerator every step), LR and throughput; returns the samples per second
        since this run (or resumed run) started."""
        self.seen += self.per_step
        rate = self.seen / (time.perf_counter() - self.started)
        self.loss = loss if loss is not None else self.loss
        self.bar.update(1)
        shown = f"{self.loss:.4f}" if self.loss is not None else "-"
        self.bar.set_postfix(loss=shown, lr=f"{lr:.2e}", it_s=f"{rate:.1f}")
        return rate

    def close(self) -> None:
        self.bar.close()


# -- the scripts' command line ---------------------------------------------------------------------------------


def run_script(argv: list[str], doc: str, config_class: type, train: Callable[..., Any]) -> int:
    """`SCRIPT [CONFIG.yaml] [--dotted.key=value ...] [--resume]`, shared by the training scripts: load and
    validate the config (the YAML, else the defaults, then the overrides), then `train(cfg, resume)`. Returns
    the exit status: 2 with the script's docstring when given nothing, 2 with a one-line message for a bad
    config (`ConfigError`: checked before anything loads) or a run folder another run wrote."""
    from vlm.config import load_config

    resume = "--resume" in argv
    args = [a for a in argv if a != "--resume"]
    if not args:
        print(doc)
        return 2
    path, overrides = (None, args) if args[0].startswith("--") else (args[0], args[1:])
    try:
        train(load_config(config_class, path, overrides), resume)
    except ValueError as err:  # one line per problem (a data section may have several), whitespace squashed
        for line in str(err).splitlines() or [""]:
            if line.strip() or len(str(err).splitlines()) <= 1:
                print(f"error: {' '.join(line.split())}", file=sys.stderr)
        return 2
    return 0


class RunBase:
    """What both training scripts' `Run` dataclasses derive from the config and the accelerator they hold
    (`cfg.train.out_dir`, `batch_size`, `grad_accum`; `accelerator`)."""

    cfg: Any
    accelerator: Accelerator

    @property
    def dir(self) -> Path:
        return Path(self.cfg.train.out_dir)

    @property
    def per_step(self) -> int:
        """Rows an optimizer step, over all processes and micro-batches."""
        t = self.cfg.train
        return t.batch_size * self.accelerator.num_processes * t.grad_accum

    def log(self, line: str) -> None:
        """A line on the main process's stdout."""
        self.accelerator.print(line)
