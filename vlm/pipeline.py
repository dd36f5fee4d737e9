"""Fine-tuning's input pipeline: optimizer step -> this process's micro-batches, built ahead of the model.

    batches = StepBatches(sources, stream, model.preparer, batch_size=16, grad_accum=2, max_length=128)
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
"""

from __future__ import annotations

import os
import random
from collections import OrderedDict
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from vlm.conversation import Encoded, Message, encode
from vlm.data.common import NOT_A_PATH, UNREADABLE_IMAGE
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
    `pack` packs each micro-batch's conversations into rows of `max_length` tokens (`Preparer.collate`)."""

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
    ) -> None:
        if pack and max_length is None:
            raise ValueError("packing fills rows of max_length tokens: give max_length")
        self.pack = max_length if pack else None
        self.sources, self.stream, self.preparer = list(sources), stream, preparer
        self.batch_size, self.grad_accum, self.world, self.rank = batch_size, grad_accum, world, rank
        self.max_length, self.seed = max_length, seed
        self.bad: dict[Key, tuple[str, str]] = {}  # this builder's: never tried again
        self.tokens: OrderedDict[Hashable, Encoded] = OrderedDict()
        self.pixels = PixelCache(preparer, cache_bytes)

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
        key, images = _text_key(messages)
        if p.processor.splitting:  # the tokens depend on each image's tiles too
            key = (key, tuple(self.pixels(image).grid for image in images))
        hit = self.tokens.get(key)
        if hit is None:
            hit = encode(
                p.tokenizer, messages, p.prompt, lambda image: self.pixels(image).grid, with_labels=True,
                max_length=self.max_length,
            )  # fmt: skip
            self.tokens[key] = Encoded(hit.input_ids, hit.labels, [])
            if len(self.tokens) > _MAX_TEXTS:
                self.tokens.popitem(last=False)
        else:
            self.tokens.move_to_end(key)
        return Encoded(hit.input_ids, hit.labels, images)


_MAX_TEXTS = 1_000_000  # token lists kept per builder (~100 ints each for a VQA turn)


def _text_key(messages: Sequence[Message]) -> tuple[Hashable, list[Any]]:
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
    first, bounded by bytes."""

    def __init__(self, preparer: Preparer, max_bytes: int) -> None:
        self.preparer, self.max_bytes, self.bytes = preparer, max_bytes, 0
        self.entries: OrderedDict[Hashable, Tiles] = OrderedDict()

    def __call__(self, image: Any) -> Tiles:
        try:
            key = image_key(image)
        except TypeError:
            key = None
        if key is not None and key in self.entries:
            self.entries.move_to_end(key)
            return self.entries[key]
        tiles = self.preparer.processor.tiles(image)
        if key is not None and key[0] != "pil":  # a PIL image's key is its identity: not worth keeping
            self.entries[key] = tiles
            self.bytes += tiles.pixels.numel() * tiles.pixels.element_size()
            while self.bytes > self.max_bytes and self.entries:
                _, old = self.entries.popitem(last=False)
                self.bytes -= old.pixels.numel() * old.pixels.element_size()
        return tiles


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
