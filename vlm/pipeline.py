"""Fine-tuning's input pipeline: optimizer step -> this process's micro-batches, built ahead of the model.

    prepared = prepare_ahead(sources, model.preparer, max_length=128)   # optional: tokens and pixels on disk
    batches = StepBatches(sources, stream, model.preparer, batch_size=16, grad_accum=2, max_length=128,
                          prepared=prepared)
    for item in step_loader(batches, start=run.step, stop=steps, device=device):   # DataLoader, in order
        ...item.batches...   # prepared `Batch`es: tokens, labels, pixels and the learned/image indices

A step's batches are a pure function of the step (the rows `Stream` assigns it, each caption prompt drawn
from an RNG seeded by the step and the row), so workers can build them in any order and a resumed run gets
what the uninterrupted one got. Where they are built is the only choice:

- on an accelerator, `DataLoader` workers (as many as the CPUs spare, `pin_memory`, a few steps prefetched)
  tokenise and decode while the model trains; a streamed source reads its stream in order, so with one
  among the sources a single worker builds every step (several would each read the whole stream);
- on the CPU, in the training process itself: workers would fight the model for the same cores.

Each builder keeps what repeats across epochs: the token ids and labels of each distinct conversation text,
and the processed pixels of each image (least recently used first out, bounded by bytes). A row that cannot
be used (an unreadable image, more than `max_length` tokens, one that does not fit its format) is dropped from
its micro-batch and reported with the step's batches (`StepItem.bad`), so the training process can count it;
a micro-batch left with nothing takes the next usable row in the data.

Prepared ahead (`prepare_ahead`, `data.prepare_ahead` in a recipe): before the first step, every token list
and every image's pixels a source can give are computed once, in parallel (`datasets.map`), into Arrow files
under the data cache, which every builder and every later run memory-maps; the caches above then start full.
A file is named by a fingerprint of the source (its `datasets` fingerprint, spec and length), the preparer
(tokenizer, chat template, image prompt, processor) and `max_length`; an image by its bytes or by its path
with the file's size and modification time, so a changed input is a miss, never a stale batch. Pixels are
stored as float32, bit for bit the processor's: 48 KiB an image at 64 px, 588 KiB at 224 px.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import tempfile
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import torch
from datasets import Features, List, Value
from datasets.fingerprint import Hasher
from tqdm.auto import tqdm

from vlm.conversation import Encoded, Message, encode
from vlm.data.common import NOT_A_PATH, UNREADABLE_IMAGE, cache_root
from vlm.data.named import BadRow, Rows
from vlm.generation import image_key
from vlm.model import Batch, Preparer
from vlm.processing import ImageLoadError, Tiles
from vlm.training import Stream

Key = tuple[int, int]  # (source, row)

# Why a row cannot be used: an unreadable image (`ImageLoadError`, a ValueError), more than `max_length`
# tokens or an empty turn (ValueError), an image field that is no path, bytes or image (TypeError).
UNUSABLE = (ValueError, TypeError)


def why_unusable(err: Exception) -> str:
    """A skip reason that groups alike rows ("unreadable image"), for the skip report."""
    if isinstance(err, BadRow):  # the row does not fit its format (vlm.data.named)
        return err.reason
    if isinstance(err, ImageLoadError):
        return UNREADABLE_IMAGE
    if isinstance(err, TypeError):
        return NOT_A_PATH
    if "tokens, over the limit" in str(err):  # vlm.conversation.encode with max_length
        return "longer than data.max_length"
    return "unusable conversation"


@dataclass
class StepItem:
    """One optimizer step's micro-batches for this process, and the rows found unusable building them:
    (source, row) -> (reason, detail)."""

    step: int
    batches: list[Batch]
    bad: dict[Key, tuple[str, str]] = field(default_factory=dict)

    def pin_memory(self) -> StepItem:
        return StepItem(self.step, [b.pin_memory() for b in self.batches], self.bad)


class StepBatches(torch.utils.data.Dataset):
    """Step -> `StepItem` (see the module docstring). `cache_bytes` bounds the pixel cache of each builder;
    `pack` packs each micro-batch's conversations into rows of `max_length` tokens (`Preparer.collate`);
    `prepared` (`prepare_ahead`, for the same preparer and `max_length`) is read before anything is computed."""

    def __init__(
        self,
        sources: Sequence[Rows],
        stream: Stream,
        preparer: Preparer,
        *,
        batch_size: int,
        grad_accum: int = 1,
        world: int = 1,
        rank: int = 0,
        max_length: int | None = None,
        seed: int = 0,
        cache_bytes: int = 1 << 30,
        pack: bool = False,
        prepared: Prepared | None = None,
    ) -> None:
        if pack and max_length is None:
            raise ValueError("packing fills rows of max_length tokens: give max_length")
        if prepared is not None and prepared.max_length != max_length:
            raise ValueError(
                f"prepared ahead for max_length {prepared.max_length}, not {max_length}: prepare again"
            )
        self.prepared = prepared
        self.pack = max_length if pack else None
        self.sources, self.stream, self.preparer = list(sources), stream, preparer
        self.batch_size, self.grad_accum, self.world, self.rank = batch_size, grad_accum, world, rank
        self.max_length, self.seed = max_length, seed
        self.bad: dict[Key, tuple[str, str]] = {}  # this builder's: never tried again
        self.tokens: OrderedDict[Hashable, Encoded] = OrderedDict()
        self.pixels = PixelCache(preparer, cache_bytes, prepared)

    def __len__(self) -> int:  # steps are addressed by a sampler; any step index is valid
        return 1 << 62

    def __getitem__(self, step: int) -> StepItem:
        known = set(self.bad)
        rows = self.stream.step_rows(step, self.batch_size, self.grad_accum, self.world, self.rank)
        batches = [self.prepare_rows(step, keys) for keys in rows]
        return StepItem(step, batches, {k: v for k, v in self.bad.items() if k not in known})

    # -- rows -> a batch ----------------------------------------------------------------------------------

    def conversation(self, step: int, key: Key) -> list[Message]:
        """Row `key` as a conversation. A caption row's prompt is drawn from an RNG seeded by the seed, the step
        and the row, not from the process's global RNG: every process (and a resumed run) then renders a row
        alike, so N processes take the step one process would."""
        source, row = key
        return self.sources[source].conversation(row, random.Random(f"{self.seed}:{step}:{source}:{row}"))

    def prepare_rows(self, step: int, rows: list[Key]) -> Batch:
        """These rows' conversations as one training `Batch`. A row that cannot be used is dropped and
        remembered in `self.bad`; a micro-batch left with no usable row takes the next usable one after its
        first in the data (the same on every run and process: DDP needs every process in every step)."""
        fresh = [key for key in rows if key not in self.bad]
        if fresh:
            try:  # the usual case: every row is fine
                return self.batch([self.conversation(step, key) for key in fresh])
            except UNUSABLE:
                pass
        good = [c for key in fresh if (c := self.usable(step, key)) is not None]
        if not good:
            good = [self.next_usable(step, rows[0])]
        return self.batch(good)

    def usable(self, step: int, key: Key) -> list[Message] | None:
        """Row `key`'s conversation, or None after recording in `self.bad` why it cannot be used (it is
        tried alone: its image loaded, its tokens counted)."""
        source, row = key
        try:
            conversation = self.conversation(step, key)
            self.batch([conversation])
        except UNUSABLE as err:
            self.bad[key] = (
                why_unusable(err),
                f"data.train[{source}] row {row}: {' '.join(str(err).split())}",
            )
            return None
        return conversation

    def next_usable(self, step: int, key: Key) -> list[Message]:
        flat = [(s, r) for s, source in enumerate(self.sources) for r in range(len(source))]
        start = flat.index(key)
        for candidate in flat[start + 1 :] + flat[: start + 1]:
            if candidate not in self.bad and (conversation := self.usable(step, candidate)) is not None:
                return conversation
        raise ValueError(f"no training row is usable: {len(self.bad)} rows were not")

    def batch(self, conversations: Sequence[Sequence[Message]]) -> Batch:
        """`Preparer`'s training batch, with the tokens of each distinct conversation text and the pixels of
        each image computed once (`Preparer(conversations)` gives the same batch, bit for bit)."""
        encoded = [self.encoded(c) for c in conversations]
        images = [image for e in encoded for image in e.images]
        pixel_values = torch.cat([self.pixels(image).pixels for image in images]) if images else None
        return self.preparer.collate(encoded, pixel_values, pack=self.pack)

    def encoded(self, conversation: Sequence[Message]) -> Encoded:
        """`encode` of a conversation with labels, by its text and its images' tile grids: the images are the
        row's own, the tokens (a chat template's rendering, the slow part) are reused whenever the same text
        comes again."""
        p = self.preparer
        messages = p.with_system_prompt(conversation)
        key, images = text_key(messages)
        if p.processor.splitting:  # the tokens depend on each image's tiles too
            key = (key, tuple(self.pixels(image).grid for image in images))
        hit = self.tokens.get(key)
        if hit is not None:
            self.tokens.move_to_end(key)
            return Encoded(hit.input_ids, hit.labels, images)
        if self.prepared is not None:
            hit = self.prepared.tokens(text_digest(key))
        if hit is None:
            hit = encode(
                p.tokenizer, messages, p.prompt, lambda image: self.pixels(image).grid, with_labels=True,
                max_length=self.max_length,
            )  # fmt: skip
        self.tokens[key] = Encoded(hit.input_ids, hit.labels, [])
        if len(self.tokens) > _MAX_TEXTS:
            self.tokens.popitem(last=False)
        return Encoded(hit.input_ids, hit.labels, images)


_MAX_TEXTS = 1_000_000  # token lists kept per builder (~100 ints each for a VQA turn)


def text_key(messages: Sequence[Message]) -> tuple[Hashable, list[Any]]:
    """A conversation's text with its images as placeholders (what its tokens depend on), and its images."""
    parts: list[Any] = []
    images: list[Any] = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            pieces = []
            for part in content:
                if isinstance(part, dict) and part.get("type") == "image":
                    images.append(part.get("image"))
                    pieces.append(("image",))
                else:
                    pieces.append(("text", str(part.get("text")) if isinstance(part, dict) else repr(part)))
            content = tuple(pieces)
        parts.append((message.get("role"), content if isinstance(content, (str, tuple)) else repr(content)))
    return tuple(parts), images


class PixelCache:
    """Processed images (`Tiles`: (n, 3, H, W) pixels and the tile grid) by `image_key`, least recently used out
    first, bounded by bytes; on a miss, read from `prepared` when it has the image, else processed."""

    def __init__(self, preparer: Preparer, max_bytes: int, prepared: Prepared | None = None) -> None:
        self.preparer, self.max_bytes, self.bytes = preparer, max_bytes, 0
        self.prepared = prepared
        self.entries: OrderedDict[Hashable, Tiles] = OrderedDict()

    def __call__(self, image: Any) -> Tiles:
        try:
            key = image_key(image)
        except TypeError:
            key = None
        if key is not None and key in self.entries:
            self.entries.move_to_end(key)
            return self.entries[key]
        tiles = None
        if self.prepared is not None and (digest := image_digest(image)) is not None:
            tiles = self.prepared.pixels(digest)
        if tiles is None:
            tiles = self.preparer.processor.tiles(image)
        if key is not None and key[0] != "pil":  # a PIL image's key is its identity: not worth keeping
            self.entries[key] = tiles
            self.bytes += tiles.pixels.numel() * tiles.pixels.element_size()
            while self.bytes > self.max_bytes and self.entries:
                _, old = self.entries.popitem(last=False)
                self.bytes -= old.pixels.numel() * old.pixels.element_size()
        return tiles


# -- prepared ahead: a source's tokens and pixels on disk, shared by every builder and every run ---------------

_PREPARED_VERSION = 1  # bump when the same inputs give other stored tokens or pixels
_TOKEN_FEATURES = Features(
    {"digest": Value("string"), "input_ids": List(Value("int32")), "labels": List(Value("int32"))}
)
_PIXEL_FEATURES = Features(
    {
        "digest": Value("string"),
        "pixels": Value("binary"),
        "shape": List(Value("int32")),
        "grid": List(Value("int32")),
    }
)
_PARALLEL_FROM = 1_000  # jobs from which `datasets.map` runs in several processes (starting them costs ~1 s)


def text_digest(key: Hashable) -> str:
    """A conversation's `text_key` (with tile grids under image splitting) as a name that outlives the run."""
    return hashlib.sha1(repr(key).encode()).hexdigest()


def image_digest(image: Any) -> str | None:
    """An image's name across runs: its bytes' digest, or its path with the file's size and modification time
    (a file written since is another image); None for what has none (a PIL image, a missing file)."""
    if isinstance(image, (bytes, bytearray)):
        return "b" + hashlib.sha1(image).hexdigest()
    if isinstance(image, (str, Path)):
        try:
            stat = os.stat(image)
        except OSError:
            return None
        name = f"{os.path.abspath(image)}|{stat.st_size}|{stat.st_mtime_ns}"
        return "p" + hashlib.sha1(name.encode()).hexdigest()
    return None


class Prepared:
    """The token lists and pixels `prepare_ahead` stored, looked up by digest. The tables are memory-mapped
    Arrow files: DataLoader workers share their pages, and nothing is read until it is asked for."""

    def __init__(
        self, tables: Sequence[tuple[datasets.Dataset, datasets.Dataset]], max_length: int | None
    ) -> None:
        self.max_length = max_length
        self.token_tables = [tokens.data for tokens, _ in tables]
        self.pixel_tables = [pixels.data for _, pixels in tables]
        self.token_index: dict[str, tuple[int, int]] = {}
        self.pixel_index: dict[str, tuple[int, int]] = {}
        for k, (tokens, pixels) in enumerate(tables):
            for i, digest in enumerate(tokens.data.column("digest").to_pylist()):
                self.token_index.setdefault(digest, (k, i))
            for i, digest in enumerate(pixels.data.column("digest").to_pylist()):
                self.pixel_index.setdefault(digest, (k, i))

    def tokens(self, digest: str) -> Encoded | None:
        if (hit := self.token_index.get(digest)) is None:
            return None
        table, i = self.token_tables[hit[0]], hit[1]
        return Encoded(table.column("input_ids")[i].as_py(), table.column("labels")[i].as_py())

    def pixels(self, digest: str) -> Tiles | None:
        if (hit := self.pixel_index.get(digest)) is None:
            return None
        table, i = self.pixel_tables[hit[0]], hit[1]
        shape = table.column("shape")[i].as_py()
        stored = np.frombuffer(table.column("pixels")[i].as_buffer(), dtype=np.float32).reshape(shape)
        return Tiles(torch.from_numpy(stored.copy()), tuple(table.column("grid")[i].as_py()))


def prepare_ahead(
    sources: Sequence[Rows],
    preparer: Preparer,
    max_length: int | None,
    *,
    folder: Path | None = None,
    num_proc: int | None = None,
    log: Callable[[str], Any] = print,
) -> Prepared:
    """Every conversation's tokens and every image's pixels that `sources` can give (`Rows.conversations`: a
    caption row's every prompt and caption), computed once into Arrow files in `folder` (default: the data
    cache's "prepared"), or opened where an earlier run built them. A streamed source is left out (preparing
    would read it whole); so are rows that cannot be used (the step that meets one reports it).
    `num_proc` processes share a build (None: the CPUs, up to 8, from 1,000 jobs)."""
    folder = Path(folder) if folder is not None else cache_root() / "prepared"
    tables = []
    for rows in sources:
        if rows.streaming:
            log(f"prepared ahead: {rows.spec.name}: streamed, so built step by step instead")
            continue
        tables.append(_prepared_source(rows, preparer, max_length, folder, num_proc, log))
    return Prepared(tables, max_length)


def _prepared_source(
    rows: Rows,
    preparer: Preparer,
    max_length: int | None,
    folder: Path,
    num_proc: int | None,
    log: Callable[[str], Any],
) -> tuple[datasets.Dataset, datasets.Dataset]:
    fingerprint = Hasher.hash(
        [
            _PREPARED_VERSION,
            rows.dataset._fingerprint,
            repr(rows.spec),
            str(rows.root),
            len(rows),
            preparer,
            max_length,
        ]
    )
    safe_name = re.sub(r"[^\w.+=-]", "_", rows.spec.name)  # "user/dataset" makes no subfolder
    stem = f"{safe_name}-{fingerprint}"
    paths = {part: folder / f"{stem}-{part}.arrow" for part in ("tokens", "pixels")}
    if all(path.exists() for path in paths.values()):
        tokens, pixels = (datasets.Dataset.from_file(str(path)) for path in paths.values())
        log(
            f"prepared ahead: {rows.spec.name}: {len(tokens):,} conversations, {len(pixels):,} images, from {folder}"
        )
        return tokens, pixels
    token_jobs, pixel_jobs = _jobs(rows, preparer)
    folder.mkdir(parents=True, exist_ok=True)
    built = []
    with tempfile.TemporaryDirectory(dir=folder, prefix=f".{stem}-") as scratch:
        for part, jobs, make, features, options in (
            ("tokens", token_jobs, _tokens_batch, _TOKEN_FEATURES, {"max_length": max_length}),
            ("pixels", pixel_jobs, _pixels_batch, _PIXEL_FEATURES, {}),
        ):
            if not jobs["row"]:  # no usable row: `map` of nothing would lose the columns
                _write_arrow(
                    datasets.Dataset.from_dict({k: [] for k in features}, features=features), paths[part]
                )
                built.append(datasets.Dataset.from_file(str(paths[part])))
                continue
            jobs = datasets.Dataset.from_dict(jobs)
            procs = num_proc if num_proc is not None else min(os.cpu_count() or 1, 8)
            mapped = jobs.map(
                make,
                batched=True,
                batch_size=64,
                fn_kwargs={"rows": rows, "preparer": preparer, **options},
                features=features,
                remove_columns=jobs.column_names,
                num_proc=procs if procs > 1 and len(jobs) >= _PARALLEL_FROM else None,
                cache_file_name=str(Path(scratch) / f"{part}.arrow"),
                new_fingerprint=f"{fingerprint}-{part}",
                desc=f"preparing {rows.spec.name}: {part}",
            )
            _write_arrow(mapped, paths[part])
            built.append(datasets.Dataset.from_file(str(paths[part])))
    tokens, pixels = built
    size = sum(path.stat().st_size for path in paths.values())
    log(
        f"prepared ahead: {rows.spec.name}: {len(tokens):,} conversations, {len(pixels):,} images "
        f"({size / 2**20:,.0f} MiB) in {folder}"
    )
    return tokens, pixels


def _write_arrow(dataset: datasets.Dataset, path: Path) -> None:
    """`dataset` as one Arrow stream file at `path`, written under a temporary name and renamed when whole, so
    that a killed build never leaves a file that looks complete (a parallel `map` leaves one file a process)."""
    partial = path.with_name(f".{path.name}.partial")
    with pa.OSFile(str(partial), "wb") as sink, pa.ipc.new_stream(sink, dataset.data.schema) as writer:
        for batch in dataset.data.to_batches():
            writer.write_batch(batch)
    os.replace(partial, path)


def _jobs(rows: Rows, preparer: Preparer) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
    """What to compute, each thing once: a (row, variant) for every distinct conversation text (with the
    images too under image splitting, whose tile grids the tokens depend on), a (row, image) for every
    distinct image."""
    splitting = preparer.processor.splitting
    texts: set[Hashable] = set()
    images: set[str] = set()
    tokens: dict[str, list[int]] = {"row": [], "variant": []}
    pixels: dict[str, list[int]] = {"row": [], "image": []}
    for index in tqdm(
        range(len(rows)), desc=f"listing {rows.spec.name}", unit="row", mininterval=2, leave=False
    ):
        try:
            variants = rows.conversations(index)
        except UNUSABLE:
            continue  # left to the step that meets it, which reports it
        for variant, conversation in enumerate(variants):
            key, row_images = text_key(preparer.with_system_prompt(conversation))
            digests = [image_digest(image) for image in row_images]
            if splitting:
                key = (key, tuple(digests))
            if key not in texts:
                texts.add(key)
                tokens["row"].append(index)
                tokens["variant"].append(variant)
            if variant == 0:  # a row's variants differ in text only
                for position, digest in enumerate(digests):
                    if digest is not None and digest not in images:
                        images.add(digest)
                        pixels["row"].append(index)
                        pixels["image"].append(position)
    return tokens, pixels


def _tokens_batch(
    batch: dict[str, list[int]], rows: Rows, preparer: Preparer, max_length: int | None
) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {"digest": [], "input_ids": [], "labels": []}
    grid = preparer.processor.grid
    for index, variant in zip(batch["row"], batch["variant"], strict=True):
        try:
            messages = preparer.with_system_prompt(rows.conversations(index)[variant])
            key, images = text_key(messages)
            if preparer.processor.splitting:  # as `StepBatches.encoded` keys it
                key = (key, tuple(grid(image) for image in images))
            encoded = encode(
                preparer.tokenizer, messages, preparer.prompt, grid, with_labels=True, max_length=max_length
            )
        except UNUSABLE:
            continue
        out["digest"].append(text_digest(key))
        out["input_ids"].append(encoded.input_ids)
        out["labels"].append(encoded.labels)
    return out


def _pixels_batch(batch: dict[str, list[int]], rows: Rows, preparer: Preparer) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {"digest": [], "pixels": [], "shape": [], "grid": []}
    for index, position in zip(batch["row"], batch["image"], strict=True):
        try:
            _, images = text_key(rows.conversation(index))  # a row's variants differ in text only
            image = images[position]
            tiles = preparer.processor.tiles(image)
        except UNUSABLE:
            continue  # an unreadable image: processed (and refused) when a step meets it
        out["digest"].append(image_digest(image))
        out["pixels"].append(tiles.pixels.numpy().tobytes())
        out["shape"].append(list(tiles.pixels.shape))
        out["grid"].append(list(tiles.grid))
    return out


def default_workers(device: torch.device, streamed: bool) -> int:
    """Builders beside the training process: none on the CPU (they would take its cores), else as many as
    the CPUs spare (up to 8), or one where a source is streamed (it is read in order)."""
    if device.type == "cpu":
        return 0
    if streamed:
        return 1
    return max(0, min(8, (os.cpu_count() or 1) - 1))


def step_loader(
    batches: StepBatches, start: int, stop: int, workers: int, pin_memory: bool = False
) -> Iterator[StepItem]:
    """Steps `start` .. `stop` - 1, in order: built in this process (`workers` = 0) or by a `DataLoader`'s
    workers a few steps ahead."""
    if workers == 0:
        for step in range(start, stop):
            yield batches[step]
        return
    # Each worker tokenises on its own: the tokenizer's own thread pool, forked, could deadlock (Hugging Face
    # tokenizers warns and turns it off); off from the start, quietly.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    loader = torch.utils.data.DataLoader(
        batches,
        batch_size=None,  # an item is already a step's batches
        sampler=range(start, stop),
        num_workers=workers,
        pin_memory=pin_memory,
        prefetch_factor=4,
    )
    yield from loader
