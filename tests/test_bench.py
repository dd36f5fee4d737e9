"""Every benchmark in bench/ runs: its `--smoke` mode (tiny random models, a step or two) goes through the
same code and prints the same tables as a real run, so a benchmark cannot rot unnoticed. The figures are
not checked: on tiny models they mean nothing.

The scripts run in this process through their `main(argv)` (each fresh process would spend ~10 s importing
peft and transformers again); bench/losses.py forks its workers, so it gets a process of its own.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error where no GPU is visible")


def bench(name: str) -> ModuleType:
    """bench/{name}.py as a module, registered in sys.modules (its dataclasses need their module there)."""
    module_name = f"bench_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    if str(ROOT / "bench") not in sys.path:  # as when a script runs: its folder first (bench/smoke.py)
        sys.path.insert(0, str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location(module_name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _keep_threads():
    """The smoke runs set torch's thread count (1): give the rest of the session its own back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def lines_matching(text: str, pattern: str) -> list[str]:
    return [line for line in text.splitlines() if re.search(pattern, line)]


def test_encoder_smoke_prints_its_table_and_ratios(capsys) -> None:
    bench("encoder").main(["--smoke"])
    out = capsys.readouterr().out
    assert lines_matching(out, r"^impl +dtype +s/batch +img/s +GFLOP/s +of peak +peak MiB")
    for impl in ("ours", "hf-sdpa", "hf-eager"):
        for dtype in ("fp32", "bf16"):
            assert lines_matching(out, rf"^{impl} +{dtype} +\d+\.\d{{3}} +\d"), (impl, dtype)
    for dtype in ("fp32", "bf16"):
        assert lines_matching(
            out, rf"^  ours +{dtype}: vs hf-sdpa \d+\.\d\dx, vs hf-eager \d+\.\d\dx \((met|NOT met)\)"
        )
    assert lines_matching(out, r"fp32 ours vs hf-sdpa: max \|diff\| last_hidden_state")


def test_train_step_smoke_prints_its_table_and_ratios(capsys) -> None:
    bench("train_step").main(["--smoke"])
    out = capsys.readouterr().out
    assert lines_matching(out, r"^same weights, same batch, fp32: loss ours .*\|diff\| ")
    assert lines_matching(out, r"^model +seq +trainable +samples/s +tokens/s +vs LLaVA +RSS loaded")
    assert lines_matching(out, r"^LlavaForConditionalGeneration\+peft +\d+ .* 1\.00x")
    # the tiny tower's 4x4 grid: 16 image tokens through the MLP, 4 through pixel shuffle
    for name in (r"ours \(mlp, 16 tokens\)", r"ours \(pixel_shuffle, 4 tokens\)"):
        assert lines_matching(out, rf"^{name} +\d+ +[\d.]+M +[\d.]+ +\d+ +[\d.]+x"), name


def test_generate_smoke_prints_its_tables_and_ratios(capsys) -> None:
    bench("generate").main(["--smoke"])
    out = capsys.readouterr().out
    # the default's design: 2x2 pixel-shuffled tokens and the pooled one (the projector needs its embedding)
    assert lines_matching(out, r"^default 32² pixel_shuffle +5 +\d+ +VLM ")
    assert len(lines_matching(out, r"VLM/LM .*decode >= 0\.95x: (met|MISSED)")) == 4
    for kind in ("linear", "mlp", "pixel_shuffle f=2"):
        assert lines_matching(out, rf"^{kind} +\d+ +[\d.]+M +[\d.]+ +[\d.]+ +\d+ +[\d.]+ +[\d.]+x$"), kind


def test_losses_smoke_prints_its_tables_and_writes_its_plot(tmp_path) -> None:
    # its workers are forked: from a fresh process, not from this one with its thread pools and servers
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "losses.py"), "--smoke", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert lines_matching(done.stdout, r"^ +64 \| +[\d.]+ +[\d.]+ \| +\d+ +\d+$")  # sigmoid vs softmax
    assert lines_matching(done.stdout, r"^ +64 \|( +\d+){3} \|( +[\d.]+){3}$")  # ring vs gathered
    assert (tmp_path / "bench_losses.png").stat().st_size > 0
    assert (tmp_path / "bench_losses.json").stat().st_size > 0


def test_demo_load_smoke_serves_two_clients(capsys) -> None:
    assert bench("demo_load").main(["--smoke"]) == 0  # 1 unless every request was answered
    out = capsys.readouterr().out
    assert lines_matching(out, r"^  answered +2 / 2$")
    assert lines_matching(out, r"^  latency p50 / p95 +[\d.]+ / [\d.]+ s$")


def test_imported_smoke_answers_alike_and_prints_its_tables(capsys) -> None:
    bench("imported").main(["--smoke"])  # raises if the two sides' greedy ids, prompts or pixels differ
    out = capsys.readouterr().out
    # image splitting on and off
    assert len(lines_matching(out, r"^greedy token ids: ours == transformers, 4 tokens")) == 2
    assert lines_matching(out, r"^image splitting on: 4 x 3 tiles \+ the global one = 13 tiles")
    for metric in ("load, first s", "prepare ms", "prefill ms", "decode tok/s"):
        assert len(lines_matching(out, rf" {re.escape(metric)} +-?[\d.]+ +-?[\d.]+ +-?[\d.]+x$")) == 2, metric
    assert len(lines_matching(out, r" in use after load \+ first answer +-?\d+ +-?\d+ ")) == 2


@no_gpu
@pytest.mark.parametrize("name", ["encoder", "train_step", "imported"])
def test_cuda_without_a_gpu_is_a_one_line_error(name: str) -> None:
    with pytest.raises(
        SystemExit, match=rf"^bench/{name}\.py: --device cuda needs a CUDA GPU; torch .* sees none$"
    ):
        bench(name).main(["--device", "cuda", "--smoke"])


@pytest.mark.gpu
def test_encoder_smoke_on_the_gpu(capsys) -> None:
    bench("encoder").main(["--smoke", "--device", "cuda"])
    out = capsys.readouterr().out
    assert lines_matching(out, r"^impl +dtype +s/batch +img/s +TFLOP/s +of peak")
    assert lines_matching(out, r"^  ours +bf16: vs hf-sdpa \d+\.\d\dx")


@pytest.mark.gpu
def test_train_step_smoke_on_the_gpu(capsys) -> None:
    bench("train_step").main(["--smoke", "--device", "cuda", "--dtype", "bfloat16"])
    out = capsys.readouterr().out
    assert lines_matching(out, r"^model +seq +trainable +samples/s +tokens/s +vs LLaVA +GPU loaded")
    assert lines_matching(out, r"^ours \(mlp, 16 tokens\) ")


def test_pipeline_smoke_prints_its_table_and_verdict(capsys) -> None:
    from needs import missing

    from vlm.data import SourceUnavailable

    try:
        bench("pipeline").main(["--smoke"])
    except SourceUnavailable as err:
        missing(str(err))
    out = capsys.readouterr().out
    rows = ("prepare (reference)", "pipeline, cold", "pipeline, warm", "pipeline, 1 workers, cold",
            "pipeline, prepared ahead", "pipeline, 1 workers, prepared ahead")  # fmt: skip
    for row in rows:
        assert lines_matching(out, rf"^{re.escape(row)} +[\d,]+ +\d+\.\d\dx$"), row
    assert lines_matching(out, r"^model step \(this CPU, consumes\) +[\d,.]+$")
    assert lines_matching(
        out,
        r"^prepared ahead: built in [\d.,]+ s \(\d+ MiB, \d+ conversations, \d+ images\); a later run opens",
    )
    for name in ("pipeline, prepared ahead", "pipeline, warm"):
        verdict = (
            rf"^{name} / model step here: [\d,]+x; one worker / GPU target \(1,500/s\): [\d.]+x; 8 workers"
        )
        assert lines_matching(out, verdict), name
    assert lines_matching(out, r"^padding: [\d.]+% of the batches' positions are real tokens")
    assert lines_matching(
        out, r"^packed into rows of 128 tokens: \d+ rows instead of \d+; .* packed: [\d.]+x$"
    )
