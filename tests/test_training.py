"""Shared training pieces: the LR schedule, the resumable data order, atomic checkpoints with optimizer and RNG state, metrics."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
import torch

from vlm.training import (
    MetricsLog,
    Progress,
    Stream,
    build_optimizer,
    check_resumable,
    cosine_lr,
    due,
    latest_checkpoint,
    load_training_state,
    open_run_folder,
    plot_curves,
    resume_point,
    resume_step,
    run_script,
    save_training_checkpoint,
    set_lr,
)


def test_cosine_schedule_shape() -> None:
    lrs = [cosine_lr(s, total_steps=110, warmup_steps=10, peak=1.0, final_ratio=0.1) for s in range(111)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)  # linear warm-up
    assert lrs[10] == pytest.approx(1.0) and lrs[60] == pytest.approx(0.55) and lrs[110] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))  # never rises after warm-up


def test_per_group_lr_scale() -> None:
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([{"params": [a]}, {"params": [b], "lr_scale": 0.1}], lr=1.0)
    set_lr(opt, 2e-3)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([2e-3, 2e-4])


def train_a_bit(model, opt, steps):
    for _ in range(steps):
        loss = model(torch.randn(4, 3)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_checkpoint_restores_optimizer_and_rng(tmp_path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train_a_bit(model, opt, 3)
    at_save = {k: v.clone() for k, v in model.state_dict().items()}
    save_training_checkpoint(tmp_path, 3, lambda d: None, opt, {"position": 12}, {"lr": 1e-2})
    draws_after_save = (torch.rand(3), random.random())
    torch.manual_seed(7)
    train_a_bit(model, opt, 2)
    uninterrupted = {k: v.clone() for k, v in model.state_dict().items()}

    def resume(restore: bool) -> dict[str, torch.Tensor]:
        model.load_state_dict(at_save)
        fresh = torch.optim.AdamW(model.parameters(), lr=1e-2)
        if restore:
            meta = load_training_state(latest_checkpoint(tmp_path), fresh)
            assert meta["step"] == 3 and meta["state"] == {"position": 12} and meta["config"] == {"lr": 1e-2}
            assert torch.equal(torch.rand(3), draws_after_save[0]) and random.random() == draws_after_save[1]
        torch.manual_seed(7)
        train_a_bit(model, fresh, 2)
        return {k: v.clone() for k, v in model.state_dict().items()}

    for key, value in resume(restore=True).items():  # Adam's moments and step count came back exactly
        assert torch.equal(value, uninterrupted[key]), key
    assert any(not torch.equal(v, uninterrupted[k]) for k, v in resume(restore=False).items())


def test_incomplete_checkpoints_are_ignored_and_old_ones_pruned(tmp_path) -> None:
    opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)
    for step in (1, 2, 3):
        save_training_checkpoint(tmp_path, step, lambda d: None, opt, {}, {}, keep=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step-00000002", "step-00000003"]
    (tmp_path / "checkpoints" / ".tmp-step-00000004-abc").mkdir()  # a save killed half-way
    half = tmp_path / "checkpoints" / "step-00000005"
    half.mkdir()
    messages: list[str] = []
    assert latest_checkpoint(tmp_path, messages.append).name == "step-00000003"
    assert any("step-00000005" in m for m in messages)


def test_metrics_log_and_curve(tmp_path) -> None:
    log = MetricsLog(tmp_path / "metrics.jsonl")
    for step in range(5):
        log.write(step=step, loss=1.0 / (step + 1))
    log.write(step=4, accuracy=0.5)
    records = log.read()
    assert len(records) == 6 and records[-1] == {"step": 4, "accuracy": 0.5}
    png = plot_curves(records, tmp_path / "curve.png", ("loss", "accuracy"), "run")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_curves([], tmp_path / "none.png", ("loss",), "empty") is None


def test_data_stream_is_addressable_by_position_and_weighted() -> None:
    """Resuming recomputes the data from a position alone: any slice equals the same slice of one long read."""
    stream = Stream([5, 4], [2.0, 0.5], seed=3)
    assert stream.epoch_len == 5 * 2 + 2  # source 0 twice, half of source 1
    whole = stream.take(0, 3 * stream.epoch_len)
    assert Stream([5, 4], [2.0, 0.5], seed=3).take(7, 20) == whole[7:27]
    first = whole[: stream.epoch_len]
    assert sorted(first.count((0, r)) for r in range(5)) == [2] * 5
    assert len({r for s, r in first if s == 1}) == 2
    assert first != whole[stream.epoch_len : 2 * stream.epoch_len]  # each epoch reshuffled
    with pytest.raises(ValueError, match="empty"):
        Stream([0], [1.0], seed=0)


def test_a_step_splits_into_micro_batches_and_processes_in_stream_order() -> None:
    """Process r's micro-batch m of step s is the r-th slice of global micro-batch m: all processes and
    micro-batches together are the step's consecutive stream positions, each row once."""
    stream = Stream([7, 5], [1.0, 1.0], seed=1)
    batch, accum, world, step = 3, 2, 2, 4
    per_step = batch * accum * world
    whole = stream.take(step * per_step, per_step)
    parts = [stream.step_rows(step, batch, accum, world, rank) for rank in range(world)]
    assert all(len(p) == accum and all(len(m) == batch for m in p) for p in parts)
    joined = [row for micro in range(accum) for rank in range(world) for row in parts[rank][micro]]
    assert joined == whole
    assert stream.step_rows(step, batch * world * accum) == [whole]  # one process, no accumulation
    assert stream.describe(per_step, 10) == "12 rows an epoch; 12 a step; 10 steps = 10.00 epochs"


def test_what_falls_due_on_a_step() -> None:
    assert [s for s in range(1, 8) if due(s, 3, 7)] == [3, 6, 7]  # logging and checkpoints: the last too
    assert [s for s in range(1, 8) if due(s, 3, 7, at_last=False)] == [3, 6]  # mid-run evaluation
    assert [s for s in range(1, 7) if due(s, 3, 6, at_last=False)] == [3]
    assert [s for s in range(1, 8) if due(s, 0, 7, at_last=False)] == []  # 0: never


def test_a_run_starts_fresh_or_where_its_folder_left_off(tmp_path) -> None:
    run = tmp_path / "run"
    config = {"train": {"lr": 0.1, "steps": 4}}
    assert resume_point(run, resume=True, config=config) is None  # nothing there yet
    model = torch.nn.Linear(2, 2)
    opt = build_optimizer([{"params": list(model.parameters()), "weight_decay": 0.0}], "sgd", 0.1)
    assert isinstance(opt, torch.optim.SGD)
    assert resume_step(None, opt) == 0
    metrics = open_run_folder(run, _Cfg(steps=4))
    assert (run / "config.yaml").read_text() == "steps: 4\n"
    metrics.write_eval(2, {"accuracy": 0.5})
    assert metrics.read() == [{"step": 2, "eval_accuracy": 0.5}]
    save_training_checkpoint(run, 2, lambda d: None, opt, {}, config)
    ckpt = resume_point(run, resume=False, config=config)  # the folder exists: re-running continues it
    assert ckpt is not None and ckpt.name == "step-00000002"
    with pytest.raises(ValueError, match="different config"):  # another run's folder is not continued
        resume_point(run, resume=True, config={"train": {"lr": 0.2, "steps": 4}})
    assert isinstance(
        build_optimizer([{"params": list(model.parameters())}], "adamw", 0.1), torch.optim.AdamW
    )
    messages: list[str] = []
    assert resume_step(ckpt, opt, messages.append) == 2 and messages == [f"resumed from {ckpt} at step 2"]
    progress = Progress(4, 2, "test", per_step=8, enabled=False)
    assert progress.update(1.0, 0.1) > 0 and progress.seen == 8
    progress.close()


def test_a_run_folder_resumes_only_under_the_config_that_wrote_it(tmp_path) -> None:
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    config = {"model": {"vision": "a"}, "data": {"train": [{"name": "x"}], "eval": None},
              "train": {"steps": 10, "lr": 0.1, "eval_every": 0}}  # fmt: skip
    ckpt = save_training_checkpoint(tmp_path, 5, lambda d: None, opt, {}, config)
    longer = {**config, "train": {**config["train"], "steps": 20, "eval_every": 5}, "data": {**config["data"], "eval": {"name": "y"}}}  # fmt: skip
    check_resumable(ckpt, longer)  # running longer, or reporting differently, continues the same run
    for changed, key in (
        ({**config, "model": {"vision": "b"}}, "model.vision"),
        ({**config, "train": {**config["train"], "lr": 0.2}}, "train.lr"),
        ({**config, "data": {**config["data"], "train": [{"name": "z"}]}}, "data.train"),
    ):
        with pytest.raises(ValueError, match=rf"different config \({key}: .*another train.out_dir"):
            check_resumable(ckpt, changed)


@dataclass(frozen=True)
class _Cfg:
    steps: int = 1


def test_the_scripts_command_line(tmp_path, capsys) -> None:
    runs = []
    train = lambda cfg, resume: runs.append((cfg, resume))  # noqa: E731
    assert run_script([], "usage: SCRIPT CONFIG", _Cfg, train) == 2 and "usage" in capsys.readouterr().out
    (tmp_path / "c.yaml").write_text("steps: 3\n")
    assert run_script([str(tmp_path / "c.yaml"), "--steps=5", "--resume"], "", _Cfg, train) == 0
    assert runs == [(_Cfg(steps=5), True)]
    (tmp_path / "bad.yaml").write_text("stepz: 3\n")  # a typo: a clear one-line error, no traceback, no run
    assert run_script([str(tmp_path / "bad.yaml")], "", _Cfg, train) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "stepz" in err
    assert len(runs) == 1
