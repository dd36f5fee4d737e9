"""Serving many users with one model: concurrent questions are answered together, in one batched decode.

    callers (threads) ── stream(conversation) ──► pending queue ──► worker thread: DecodeBatch
                                                                     join: prefill newcomers, merge caches
                                                                     step: one token for every row
    callers ◄── text pieces, each row to its own caller ◄──────────── rows that finish leave the batch

One question at a time leaves a CPU or GPU mostly idle: a decode step for 20 rows costs little more than for
one, since the LM's weights are read once per step either way. So a `BatchedGenerator` keeps one running
batch (continuous batching, as in Orca and vLLM, here without paged memory):
- a request that arrives while the batch decodes joins it at the next step: its prompt is prefilled alone
  (left-padded with the other newcomers), and its key/value cache is merged into the batch's by left-padding
  the shorter one. Padding is masked, and every row keeps its own position ids (the running count of its real
  tokens), so a row's answer is what it would be alone;
- a row that finishes (end of turn, `max_new_tokens`, or its caller stopped or left) leaves the batch at once,
  and padding columns no row needs any more are cut from the cache;
- each row has its own settings (greedy or sampling, top-p, repetition penalty), applied with transformers'
  logits processors in the order `generate` applies them, so greedy answers equal `VisionLanguageModel.generate`.

The splice (`VisionLanguageModel.embed`), the image preprocessing and the chat rendering are the model's
(`VisionLanguageModel.prepare`); this module only schedules. With `adapter_on_text=False` a batch with images
and one without run side by side, since the LoRA adapter is on for the one and off for the other.
"""

from __future__ import annotations

import copy
import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from vlm.conversation import Message, encode, pad, user
from vlm.generation import shared_prefix_length
from vlm.model import Batch, VisionLanguageModel

_DONE = object()  # ends a request's piece queue


@dataclass(eq=False)
class Request:
    """One conversation to answer, prepared (tokenised, images preprocessed) in the caller's thread."""

    batch: Batch  # one row
    settings: dict[str, Any]  # VisionLanguageModel.generation_kwargs(...)
    stop: threading.Event
    pieces: queue.Queue = field(default_factory=queue.Queue)  # str pieces, then an exception or _DONE

    @property
    def has_images(self) -> bool:
        return self.batch.pixel_values is not None


@dataclass(eq=False)
class _Row:
    request: Request
    tokens: list[int]  # prompt then generated ids: what the repetition penalty sees
    prompt_length: int
    processors: LogitsProcessorList
    sample: bool
    sent: str = ""  # text already handed to the caller

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.prompt_length :]


class DecodeBatch:
    """Rows decoding together: one key/value cache, one attention mask, one token per row per `step`."""

    def __init__(self, model: VisionLanguageModel, has_images: bool) -> None:
        self.model = model
        self.has_images = has_images  # the adapter mode (see the module docstring)
        self.rows: list[_Row] = []
        self.cache: Any = None  # the LM's cache; layers hold keys/values (B, heads, L, head_dim)
        self.attention_mask: torch.Tensor | None = None  # (B, L), 0 on padding
        self.next_tokens: torch.Tensor | None = None  # (B,), each row's token to feed next
        self.eos = _eos_ids(model)
        self._shared: tuple[list[int], Any] | None = None  # see `_prefix`

    def __len__(self) -> int:
        return len(self.rows)

    @torch.inference_mode()
    def join(self, requests: Sequence[Request]) -> None:
        """Prefill the newcomers' prompts (one batch) and merge them into the running batch.

        The prompt prefix every conversation shares (the model's system turn and the user header) is computed
        once and its keys/values copied for each newcomer; the newcomers' own tokens follow it, left-padded.
        Padding between prefix and suffix is masked, and positions count real tokens only, so each row is what
        it would be alone (as in `VisionLanguageModel.generate_answers`)."""
        model, device = self.model, self.model.lm.device
        prompts = [r.batch.input_ids[0][r.batch.attention_mask[0].bool()].tolist() for r in requests]
        prefix, prefix_cache = self._prefix()
        if not all(len(p) > len(prefix) and p[: len(prefix)] == prefix for p in prompts):
            prefix, prefix_cache = [], None  # a conversation with its own system turn: no sharing this time
        suffixes = [p[len(prefix) :] for p in prompts]
        input_ids = pad(suffixes, model.tokenizer.pad_token_id, "left").to(device)
        mask = torch.cat(
            [
                torch.ones(len(requests), len(prefix), dtype=torch.long),
                pad([[1] * len(s) for s in suffixes], 0, "left"),
            ],
            dim=1,
        ).to(device)  # (n, prefix + longest suffix)
        cache = None
        if prefix_cache is not None:
            cache = copy.deepcopy(prefix_cache)
            cache.batch_repeat_interleave(len(requests))
        pixels = [r.batch.pixel_values for r in requests if r.batch.pixel_values is not None]
        with model.adapter_for(self.has_images):
            embeds = model.embed(input_ids, torch.cat(pixels).to(device) if pixels else None)
            out = model.lm(
                inputs_embeds=embeds,
                attention_mask=mask,
                position_ids=_positions(mask)[:, len(prefix) :],
                cache=cache,
                use_cache=True,
                logits_to_keep=1,  # the LM head only where the next token is chosen
            )
        rows = [_new_row(r, prompt) for r, prompt in zip(requests, prompts, strict=True)]
        tokens = torch.stack(
            [self._choose(row, logits) for row, logits in zip(rows, out.logits[:, -1], strict=True)]
        )
        if not self.rows:
            self.cache, self.attention_mask, self.next_tokens = out.cache, mask, tokens
        else:
            self.attention_mask = _merge_caches(self.cache, self.attention_mask, out.cache, mask)
            self.next_tokens = torch.cat([self.next_tokens, tokens])
        self.rows += rows
        self._emit_and_retire()

    def _prefix(self) -> tuple[list[int], Any]:
        """The token prefix of every conversation without a system turn of its own, and its keys/values
        (batch 1), computed on first use: what two different questions share once rendered."""
        if self._shared is None:
            model = self.model
            ids = [
                encode(
                    model.tokenizer,
                    model.with_system_prompt([user(text)]),
                    model.config.prompt,
                    add_generation_prompt=True,
                ).input_ids
                for text in ("a", "b")
            ]
            prefix = ids[0][: shared_prefix_length(ids, model.image_token_id)]
            cache = None
            if prefix:
                with torch.inference_mode(), model.adapter_for(self.has_images):
                    ids_t = torch.tensor([prefix], device=model.lm.device)
                    cache = model.lm(input_ids=ids_t, use_cache=True, logits_to_keep=1).cache
            self._shared = (prefix, cache)
        return self._shared

    @torch.inference_mode()
    def step(self) -> None:
        """Feed every row its last token and choose the next one; finished rows leave."""
        model, device = self.model, self.model.lm.device
        mask = torch.cat(
            [self.attention_mask, torch.ones(len(self.rows), 1, dtype=torch.long, device=device)], 1
        )
        with model.adapter_for(self.has_images):
            out = model.lm(
                input_ids=self.next_tokens[:, None],
                attention_mask=mask,
                position_ids=_positions(mask)[:, -1:],
                cache=self.cache,
                use_cache=True,
                logits_to_keep=1,
            )
        self.cache, self.attention_mask = out.cache, mask
        self.next_tokens = torch.stack(
            [self._choose(row, logits) for row, logits in zip(self.rows, out.logits[:, -1], strict=True)]
        )
        self._emit_and_retire()

    def fail(self, err: BaseException) -> None:
        """Hand `err` to every row's caller and empty the batch."""
        for row in self.rows:
            row.request.pieces.put(err)
        self.rows, self.cache, self.attention_mask, self.next_tokens = [], None, None, None

    def _choose(self, row: _Row, logits: torch.Tensor) -> torch.Tensor:
        """The row's next token from its last logits (V,), as `generate` would choose it; recorded in the row."""
        scores = row.processors(torch.tensor([row.tokens], device=logits.device), logits[None].float())[0]
        token = torch.multinomial(scores.softmax(-1), 1)[0] if row.sample else scores.argmax()
        row.tokens.append(int(token))
        return token

    def _emit_and_retire(self) -> None:
        """Send each row's new text; rows that ended (EOS, length, stop) get their last text and leave."""
        keep = []
        for i, row in enumerate(self.rows):
            request, generated = row.request, row.generated
            ended = generated[-1] in self.eos
            text = self.model.tokenizer.decode(
                generated[:-1] if ended else generated, skip_special_tokens=True
            )
            finished = ended or len(generated) >= request.settings["max_new_tokens"] or request.stop.is_set()
            # A token can end inside a multi-byte character (shown as U+FFFD until the rest arrives).
            if (
                text.startswith(row.sent)
                and (finished or not text.endswith("\ufffd"))
                and len(text) > len(row.sent)
            ):
                request.pieces.put(text[len(row.sent) :])
                row.sent = text
            if finished:
                request.pieces.put(_DONE)
            else:
                keep.append(i)
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.cache = self.attention_mask = self.next_tokens = None
            return
        index = torch.tensor(keep, device=self.attention_mask.device)
        # Columns that are padding in every remaining row are no longer needed by anyone.
        first = int(self.attention_mask[index].any(0).nonzero()[0])
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[index, :, first:], layer.values[index, :, first:]
        self.attention_mask = self.attention_mask[index, first:]
        self.next_tokens = self.next_tokens[index]


class BatchedGenerator:
    """Answers conversations from many threads at once with one model, batching them as they arrive.

    `stream` and `generate` are safe to call from any number of threads; one worker thread (started on first
    use) owns the model's generation. At most `max_batch_size` rows decode together; later requests wait."""

    def __init__(self, model: VisionLanguageModel, max_batch_size: int = 32) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.model = model
        self.max_batch_size = max_batch_size
        self._pending: queue.Queue[Request | None] = queue.Queue()
        self._worker: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False

    def stream(
        self, conversation: Sequence[Message], stop: threading.Event | None = None, **settings: Any
    ) -> Iterator[str]:
        """Yield the answer to one conversation piece by piece. Bad input (the conversation, an image, a
        setting) raises ValueError from the first `next()`, before anything is queued. Setting `stop`, or
        closing the iterator, ends this answer within one step; the other rows go on."""
        model = self.model
        request = Request(
            batch=model.prepare([conversation], for_generation=True),
            settings=model.generation_kwargs(**settings),
            stop=stop if stop is not None else threading.Event(),
        )
        model.check_fits(request.batch.input_ids.shape[1], request.settings["max_new_tokens"])
        self._submit(request)
        try:
            while (piece := request.pieces.get()) is not _DONE:
                if isinstance(piece, BaseException):
                    raise piece
                yield piece
        finally:
            request.stop.set()  # a no-op once finished; retires the row when the caller left early

    def generate(self, conversation: Sequence[Message], **settings: Any) -> str:
        """The whole answer to one conversation."""
        return "".join(self.stream(conversation, **settings))

    def close(self) -> None:
        """Stop the worker once the running rows have finished; later calls raise."""
        with self._lock:
            self._closed = True
            worker = self._worker
        self._pending.put(None)
        if worker is not None:
            worker.join()

    def _submit(self, request: Request) -> None:
        with self._lock:
            if self._closed:
                raise RuntimeError("this BatchedGenerator is closed")
            if self._worker is None:
                self._worker = threading.Thread(target=self._run, name="vlm-batched-generate", daemon=True)
                self._worker.start()
            self._pending.put(request)

    def _run(self) -> None:
        """The worker: admit waiting requests, step every batch once, repeat; sleep when there is no work."""
        batches = [DecodeBatch(self.model, has_images) for has_images in (True, False)]
        closing = False
        while True:
            busy = sum(len(b) for b in batches)
            waiting = []
            try:
                if busy == 0 and not closing:
                    waiting.append(self._pending.get())  # idle: block until something arrives
                while busy + len(waiting) < self.max_batch_size:
                    waiting.append(self._pending.get_nowait())
            except queue.Empty:
                pass
            closing = closing or None in waiting
            for r in waiting:
                if r is not None and r.stop.is_set():  # stopped while waiting: nothing to generate
                    r.pieces.put(_DONE)
            waiting = [r for r in waiting if r is not None and not r.stop.is_set()]
            if closing and not waiting and busy == 0:
                return
            for batch in batches:
                newcomers = [r for r in waiting if self._batch_for(batches, r) is batch]
                try:
                    if len(batch):  # the running rows move on while newcomers join
                        batch.step()
                    if newcomers:
                        batch.join(newcomers)
                except Exception as err:  # one failing batch must not take the server down
                    batch.fail(err)
                    for r in newcomers:
                        r.pieces.put(err)

    def _batch_for(self, batches: list[DecodeBatch], request: Request) -> DecodeBatch:
        # With the adapter on for every conversation one batch serves all (images or not).
        if self.model.config.adapter_on_text:
            return batches[0]
        return batches[0] if request.has_images else batches[1]


def _new_row(request: Request, prompt: list[int]) -> _Row:
    s = request.settings
    processors = LogitsProcessorList()
    if s.get("repetition_penalty", 1.0) != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(s["repetition_penalty"]))
    processors.append(_Suppress(s.get("suppress_tokens") or []))
    if s["do_sample"]:  # the warpers `generate` uses, in its order
        processors.append(TemperatureLogitsWarper(s["temperature"]))
        if s.get("top_k"):
            processors.append(TopKLogitsWarper(s["top_k"]))
        if s.get("top_p") is not None and s["top_p"] < 1.0:
            processors.append(TopPLogitsWarper(s["top_p"]))
    return _Row(request, list(prompt), len(prompt), processors, sample=s["do_sample"])


class _Suppress:
    """Never choose these tokens (the image placeholder is input-only)."""

    def __init__(self, token_ids: Sequence[int]) -> None:
        self.token_ids = list(token_ids)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores[:, self.token_ids] = -float("inf")
        return scores


def _eos_ids(model: VisionLanguageModel) -> set[int]:
    eos = model.lm.generation_config.eos_token_id or model.tokenizer.eos_token_id
    return set(eos) if isinstance(eos, (list, tuple)) else {eos}


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids from a left-padded mask: each real token's index among its row's real tokens."""
    return (mask.cumsum(-1) - 1).clamp_min(0)


def _pad_left(x: torch.Tensor, width: int, value: int) -> torch.Tensor:
    return torch.nn.functional.pad(x, (width - x.shape[-1], 0), value=value)


def _merge_caches(cache: Any, mask: torch.Tensor, new_cache: Any, new_mask: torch.Tensor) -> torch.Tensor:
    """Append `new_cache`'s rows to `cache` (in place), left-padding the shorter one; returns the merged mask."""
    width = max(mask.shape[1], new_mask.shape[1])
    for layer, new in zip(cache.layers, new_cache.layers, strict=True):
        for name in ("keys", "values"):
            old, add = getattr(layer, name), getattr(new, name)
            pad_old, pad_add = width - old.shape[2], width - add.shape[2]
            old = torch.nn.functional.pad(
                old, (0, 0, pad_old, 0)
            )  # (B, heads, L, head_dim): pad L on the left
            add = torch.nn.functional.pad(add, (0, 0, pad_add, 0))
            setattr(layer, name, torch.cat([old, add]))
    return torch.cat([_pad_left(mask, width, 0), _pad_left(new_mask, width, 0)])
