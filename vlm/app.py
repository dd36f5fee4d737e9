"""The Gradio demo: chat with images, and see what the vision encoder sees.

    vlm demo [--model DIR] [--host 127.0.0.1] [--port 7860] [--share] [--siglip DIR]
    (also `make demo` and `python demo/app.py`, with the same flags)

One Blocks app around one loaded `VisionLanguageModel` (`build_app`; `launch` loads the model and serves it):
- **Chat**: an image (upload, paste or an example) and a question; the answer streams token by token into a
  multi-turn chat. A new image can join at any turn: every earlier image stays in what the model sees.
  Generation settings, stop and clear; the model's name and training data on the page.
- **Encoder**: for an image, the pooling head's attention (or the last layer's, without a head) overlaid on
  it; click a patch to see the cosine similarity of its output embedding with every other patch; zero-shot
  label scores when a SigLIP dual encoder (text tower) is given.
- **API** (`gradio_client`): `/ask`, `/ask_stream`, `/attention`, `/similarity`, and `/zero_shot` with a
  text tower (see `CLIENT_EXAMPLE`).

References: the LLaVA and moondream Gradio demos (image beside chat, streamed answers, settings accordion);
Gradio's `ChatInterface` (clear input on send, stop cancels the event).

Deliberate choices
- `Demo` holds the logic and knows nothing of the layout: every event handler is one of its methods, so
  tests call them directly, and `build_app` only wires components to them.
- One generation at a time: the generation events share one queue slot (`concurrency_id="model"`,
  limit 1) and `Demo` holds a lock while the LM generates: two concurrent `generate` calls on one model
  would only fight over the same CPU cores (and torch does not promise they are safe). Each generation runs in a
  worker thread feeding a streamer, so Gradio's event loop, the encoder tab and other sessions stay
  responsive.
- Stop really stops: `VisionLanguageModel.generate` takes no stopping criteria, so the streamer raises from
  `put` (called after every new token) once cancelled, which ends `generate` within one token and frees
  the model for the next user. Stop, clear, a closed tab and a cancelled API job all cancel.
- Bad input is a message, never a traceback: `InputError` carries a sentence for the user; the chat shows it
  as the assistant's reply and the API raises it as `gr.Error` (gradio_client's `AppError`).
- Prompts over the LM's context (`max_position_embeddings`, less the tokens to generate) lose their OLDEST
  exchanges (user turn + answer, images included) with a notice; those turns leave the session's history
  for good, so the notice is shown once.
- Uploads: Gradio's own image preprocessing opens every upload with PIL and would fail with a bare error
  toast; `_image_input` hands over the file path instead, and `vlm.processing.load_image` (with a
  megapixel cap) says what is wrong. File size is capped by Gradio (`MAX_FILE_SIZE`).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gradio as gr
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib import colormaps
from PIL import Image, ImageDraw
from transformers import PreTrainedTokenizerBase, TextIteratorStreamer

from vlm.conversation import Message, encode, user
from vlm.model import DEFAULT_MODEL_DIR, VisionLanguageModel, load_default_model
from vlm.processing import ImageLoadError, SiglipImageProcessor, load_image
from vlm.viz import attention_map

if TYPE_CHECKING:  # the dual encoder is optional; duck-typed at run time
    from vlm.siglip_model import SiglipModel

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
EXAMPLES_DIR = REPO / "demo" / "examples"

MAX_FILE_SIZE = "20mb"  # Gradio refuses bigger uploads before they reach us
MAX_IMAGE_PIXELS = 25_000_000  # a 25-megapixel phone photo passes; a pixel bomb is refused from its header
KEEP_SIDE = 1024  # images are kept in the chat history at most this large (the model sees 64..384 px)
MAX_NEW_TOKENS = 1024  # the settings slider's top
QUEUE_SIZE = 64  # waiting events beyond this are refused with "queue full" instead of piling up
DISPLAY_SIZE = 384  # side of the encoder tab's square pictures, px
ZERO_SHOT_TEMPLATE = "This is a photo of {}."  # SigLIP's prompt for zero-shot labels
UNTRAINED = "untrained vision tower: ask text questions"


@dataclass(frozen=True)
class Example:
    """An example shipped in `demo/examples/`; `answer` is the dataset's answer, where there is one."""

    file: str
    question: str
    answer: str | None = None

    @property
    def path(self) -> Path:
        return EXAMPLES_DIR / self.file


EXAMPLES = (
    Example("easyvqa_0_red_triangle.png", "What shape is in the image?", "triangle"),
    Example("easyvqa_6_blue_circle.png", "What color is the shape?", "blue"),
    Example("easyvqa_11_black_rectangle.png", "What shape is in the image?", "rectangle"),
    Example("easyvqa_7_green_circle.png", "Is there a green shape?", "yes"),
    Example("easyvqa_28_brown_triangle.png", "What color is the triangle?", "brown"),
    Example("easyvqa_38_teal_rectangle.png", "Does the image contain a circle?", "no"),
    Example("chelsea.jpg", "What animal is this?"),
    Example("astronaut.jpg", "Who is in this picture?"),
    Example("coffee.jpg", "What is in the cup?"),
    Example("rocket.jpg", "Describe the image."),
)

CLIENT_EXAMPLE = """\
from gradio_client import Client, handle_file

client = Client("http://127.0.0.1:7860/")
print(client.predict(image=handle_file("demo/examples/easyvqa_0_red_triangle.png"),
                     question="What shape is in the image?", max_new_tokens=32, api_name="/ask"))
"""


class InputError(ValueError):
    """Input the demo cannot use; `str(err)` is a sentence for the user."""


# -- model description ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelInfo:
    """What the page says about the model: its name, what it was trained on, and its card (markdown)."""

    name: str
    trained_on: str
    card: str | None = None


def describe_model(folder: str | Path | None) -> ModelInfo:
    """Name and training data from the model folder's card (`README.md`, Hugging Face style: YAML front
    matter with `datasets:`, then a `# title`); a model without a folder is the fresh default."""
    if folder is None:
        return ModelInfo("vlm default model (fresh)", UNTRAINED)
    folder = Path(folder)
    card_file = folder / "README.md"
    if not card_file.is_file():
        return ModelInfo(folder.name, f"unknown (no model card in {folder})")
    text = card_file.read_text(encoding="utf-8", errors="replace")
    datasets: list[str] = []
    front = re.match(r"^---\n(.*?)\n---\n", text, re.S)
    if front:
        import yaml  # a dependency already (configs); only the card needs it here

        try:
            meta = yaml.safe_load(front.group(1)) or {}
        except yaml.YAMLError:
            meta = {}
        found = meta.get("datasets") if isinstance(meta, dict) else None
        datasets = [found] if isinstance(found, str) else [str(d) for d in found or []]
        text = text[front.end() :]
    title = re.search(r"^#\s+(.+)$", text, re.M)
    paragraphs = [
        p.strip() for p in re.split(r"\n\s*\n", text) if p.strip() and not p.lstrip().startswith("#")
    ]
    trained_on = ", ".join(datasets) or (paragraphs[0] if paragraphs else "see the model card")
    return ModelInfo(title.group(1).strip() if title else folder.name, trained_on, text.strip())


def summary_markdown(model: VisionLanguageModel, info: ModelInfo) -> str:
    """One paragraph for the top of the page: name, training data, shapes."""
    vision = model.config.vision
    params = sum(p.numel() for p in model.vision.parameters())
    context = model.lm.config.max_position_embeddings
    return (
        f"**Model:** {info.name} · **trained on:** {info.trained_on}  \n"
        f"SigLIP vision tower ({params / 1e6:.1f} M parameters) sees images at {vision.image_size}×{vision.image_size} px "
        f"in {vision.patch_size}-px patches → {model.tokens_per_image} image tokens for the LM "
        f"`{model.config.lm_source}` ({context:,}-token context)."
    )


# -- generation ---------------------------------------------------------------------------------------------


class _Cancelled(Exception):
    """Raised inside `generate` (from the streamer) to end a generation nobody is reading any more."""


class _Streamer(TextIteratorStreamer):
    """A `TextIteratorStreamer` that can stop the generation it is fed by: `generate` calls `put` after every
    new token, and once `cancel()` was called `put` raises, which ends `generate` within one token."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.cancelled = threading.Event()

    def cancel(self) -> None:
        self.cancelled.set()

    def put(self, value: torch.Tensor) -> None:
        if self.cancelled.is_set():
            raise _Cancelled
        super().put(value)


@dataclass(frozen=True)
class Settings:
    """Generation settings as the UI offers them; temperature 0 is greedy (top-p is then unused)."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 0.9

    def kwargs(self) -> dict[str, Any]:
        return dict(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p)


# -- the demo's logic ------------------------------------------------------------------------------------------


class Demo:
    """The demo's event handlers around one model, independent of the page layout."""

    def __init__(
        self,
        model: VisionLanguageModel,
        siglip_model: SiglipModel | None = None,
        siglip_tokenizer: PreTrainedTokenizerBase | None = None,
        max_image_pixels: int = MAX_IMAGE_PIXELS,
    ) -> None:
        if siglip_model is not None and siglip_tokenizer is None:
            raise ValueError("zero-shot needs the dual encoder's tokenizer: pass siglip_tokenizer too")
        self.model = model
        self.siglip_model = siglip_model
        self.siglip_tokenizer = siglip_tokenizer
        self.max_image_pixels = max_image_pixels
        self.context_length = int(model.lm.config.max_position_embeddings)
        self._model_lock = threading.Lock()  # one generate at a time, whoever calls
        self._running: dict[str, _Streamer] = {}  # session hash -> its generation, for the stop button

    @property
    def has_text_tower(self) -> bool:
        return self.siglip_model is not None

    # -- input checks

    def open_image(self, source: str | Path | Image.Image | bytes) -> Image.Image:
        """Load an upload as RGB, or raise `InputError` saying what is wrong with it."""
        try:
            image = load_image(source, max_pixels=self.max_image_pixels)
        except ImageLoadError as err:
            # load_image's reasons are written for developers: drop the advice meant for them.
            reason = err.reason.split(" (a possible decompression bomb)")[0].split("; pass a larger")[0]
            reason = reason.replace("max_pixels = ", "the limit of ")
            limit = self.max_image_pixels
            limit_text = f"{limit / 1e6:g} megapixels" if limit >= 1e6 else f"{limit:,} pixels"
            raise InputError(
                f"I couldn't use that image: {reason}. Please try a PNG, JPEG, WebP or GIF of at most {limit_text}."
            ) from None
        except TypeError:
            raise InputError("I couldn't use that image: it is not an image file.") from None
        if max(image.size) > KEEP_SIDE:  # the history keeps every image; the model never sees more than this
            image.thumbnail((KEEP_SIDE, KEEP_SIDE), Image.Resampling.BICUBIC)
        return image

    def settings(
        self, max_new_tokens: float | None, temperature: float | None, top_p: float | None
    ) -> Settings:
        """Sanitised settings: at most half the context is spent on the answer, so the prompt keeps room."""
        default = Settings()
        n = default.max_new_tokens if max_new_tokens is None else int(max_new_tokens)
        n = max(1, min(n, MAX_NEW_TOKENS, self.context_length // 2))
        t = default.temperature if temperature is None else max(0.0, float(temperature))
        p = default.top_p if top_p is None else min(max(float(top_p), 0.01), 1.0)
        return Settings(n, t, p)

    def prompt_length(self, messages: Sequence[Message]) -> int:
        """Tokens the conversation takes as a generation prompt (image placeholders and the model's system
        prompt included, as `generate` will see it)."""
        model = self.model
        encoded = encode(
            model.tokenizer,
            model.with_system_prompt(messages),
            model.config.image_token,
            model.tokens_per_image,
            add_generation_prompt=True,
        )
        return len(encoded.input_ids)

    def fit_context(self, messages: Sequence[Message], max_new_tokens: int) -> tuple[list[Message], int]:
        """Drop the oldest exchanges until the prompt and `max_new_tokens` fit the LM's context.

        Returns the messages that fit and how many user turns were dropped. System messages and the newest
        user turn are never dropped; if that turn alone is too long, raises `InputError`."""
        budget = self.context_length - max_new_tokens
        system = [m for m in messages if m["role"] == "system"]
        turns = [m for m in messages if m["role"] != "system"]
        dropped = 0
        while True:
            try:
                length = self.prompt_length([*system, *turns])
            except ValueError as err:  # e.g. a malformed message; not the user's fault, but say something
                raise InputError(f"I couldn't read that conversation: {err}.") from None
            if length <= budget:
                return [*system, *turns], dropped
            if len(turns) <= 1:
                raise InputError(
                    f"Your message is {length:,} tokens, more than the {budget:,} this model can read with "
                    f"{max_new_tokens} tokens left to answer. Please shorten it (or lower 'max new tokens')."
                )
            # The oldest exchange: a user turn and, when there is one, the assistant's answer to it.
            cut = 2 if len(turns) > 2 and turns[1]["role"] == "assistant" else 1
            turns = turns[cut:]
            dropped += 1

    # -- generation

    def stream(
        self, messages: Sequence[Message], settings: Settings, session: str | None = None
    ) -> Iterator[str]:
        """Yield the answer so far (growing text) as the model generates it.

        Generation runs in a worker thread under the model lock; leaving the loop early (stop, clear, a
        closed tab: Gradio closes the generator) cancels it within one token."""
        streamer = _Streamer(self.model.tokenizer)
        errors: list[BaseException] = []

        def run() -> None:
            try:
                while not self._model_lock.acquire(timeout=0.1):  # waiting for another generation
                    if streamer.cancelled.is_set():
                        return
                try:
                    self.model.generate([list(messages)], streamer=streamer, **settings.kwargs())
                finally:
                    self._model_lock.release()
            except _Cancelled:
                pass
            except BaseException as err:  # re-raised in the reading thread below
                errors.append(err)
            finally:
                streamer.end()  # never leave the reader waiting (a second end() after generate's is harmless)

        if session is not None:
            if (previous := self._running.get(session)) is not None:
                previous.cancel()  # one generation per session
            self._running[session] = streamer
        worker = threading.Thread(target=run, name="vlm-generate", daemon=True)
        worker.start()
        text = ""
        try:
            for piece in streamer:
                if piece:
                    text += piece
                    yield text
        finally:
            streamer.cancel()  # a no-op when generation has finished; frees the model when the reader left
            if session is not None and self._running.get(session) is streamer:
                del self._running[session]
        worker.join()
        if errors:
            raise errors[0]

    def stop(self, request: gr.Request | None = None) -> None:
        """Stop this session's generation (the UI's stop button; Gradio also cancels the event)."""
        if request is not None and (streamer := self._running.get(request.session_hash)) is not None:
            streamer.cancel()

    # -- chat tab

    def chat(
        self,
        question: str | None,
        image: str | None,
        display: list[dict[str, Any]] | None,
        history: list[Message] | None,
        max_new_tokens: float | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        request: gr.Request | None = None,
    ) -> Iterator[tuple[Any, Any, Any, Any]]:
        """One chat turn. Yields (chatbot messages, model history, question box, image box).

        `display` is what the Chatbot shows; `history` is what the model sees (vlm messages with the images
        as PIL images), kept in a per-session `gr.State`. Both grow as the answer streams, so a stopped
        answer stays in both as far as it got."""
        display = list(display or [])
        history = list(history or [])
        question = (question or "").strip()
        if not question:
            hint = (
                "Type a question about the image"
                if image
                else "Type a question (and add an image if you like)"
            )
            yield [*display, _assistant(f"{hint}, then press Enter.")], history, gr.skip(), gr.skip()
            return
        try:
            settings = self.settings(max_new_tokens, temperature, top_p)
            pictures = [self.open_image(image)] if image else []
            messages, dropped = self.fit_context(
                [*history, user(question, pictures)], settings.max_new_tokens
            )
        except InputError as err:
            # Keep the question so it can be re-sent; drop an unusable image.
            yield [*display, _shown_user(question, None), _assistant(f"⚠️ {err}")], history, gr.skip(), None
            return

        display.append(_shown_user(question, image))
        if dropped:
            images_dropped = sum(_count_images(m) for m in history) - sum(
                _count_images(m) for m in messages[:-1]
            )
            display.append(
                _assistant(
                    f"ⓘ This conversation no longer fits the model's {self.context_length:,}-token context: "
                    f"the oldest {dropped} exchange{'s' if dropped > 1 else ''}"
                    + (
                        f" (with {images_dropped} image{'s' if images_dropped > 1 else ''})"
                        if images_dropped
                        else ""
                    )
                    + " left what the model sees."
                )
            )
        yield display, messages, "", None  # show the question now, and clear the input boxes
        answer = ""
        try:
            for answer in self.stream(messages, settings, request.session_hash if request else None):
                yield [*display, _assistant(answer)], [*messages, _assistant(answer)], gr.skip(), gr.skip()
        except Exception:
            log.exception("generation failed")
            note = "⚠️ Something went wrong while answering. The app is still running: please try again."
            yield [*display, _assistant(f"{answer}\n\n{note}".strip())], messages, gr.skip(), gr.skip()
            return
        if not answer:
            yield (
                [*display, _assistant("_(the model gave an empty answer)_")],
                [*messages, _assistant("")],
                gr.skip(),
                gr.skip(),
            )

    def clear(self, request: gr.Request | None = None) -> tuple[list, list, str, None]:
        """Forget the conversation (and stop an answer in progress)."""
        self.stop(request)
        return [], [], "", None

    # -- API: one question, no history

    def ask_stream(
        self,
        image: str | None,
        question: str,
        max_new_tokens: float | None = 256,
        temperature: float | None = 0.0,
        top_p: float | None = 0.9,
    ) -> Iterator[str]:
        """Answer one question about one image (or none), yielding the answer so far as it streams."""
        try:
            settings = self.settings(max_new_tokens, temperature, top_p)
            if not (question or "").strip():
                raise InputError("Please ask a question.")
            pictures = [self.open_image(image)] if image else []
            messages, _ = self.fit_context([user(question.strip(), pictures)], settings.max_new_tokens)
        except InputError as err:
            raise gr.Error(str(err)) from None
        answer = ""
        for answer in self.stream(messages, settings):
            yield answer
        if not answer:
            yield ""

    def ask(
        self,
        image: str | None,
        question: str,
        max_new_tokens: float | None = 256,
        temperature: float | None = 0.0,
        top_p: float | None = 0.9,
    ) -> str:
        """Answer one question about one image (or none): the whole answer."""
        last = deque(self.ask_stream(image, question, max_new_tokens, temperature, top_p), maxlen=1)
        return last[0] if last else ""

    # -- encoder tab

    def attention(self, image: str | None) -> Image.Image | None:
        """The vision tower's attention over the patches, overlaid on the image (DISPLAY_SIZE square)."""
        return self._attention_view(self._open_for_encoder(image)) if image else None

    def similarity(self, image: str | None, row: float, col: float) -> Image.Image | None:
        """The patch-similarity map for patch (row, col) overlaid on the image, the patch outlined."""
        return self._similarity_view(self._open_for_encoder(image), row, col)[0] if image else None

    def patch_similarity(self, image: Image.Image, row: int, col: int) -> torch.Tensor:
        """Cosine similarity of patch (row, col)'s output embedding with every patch's: (rows, cols)."""
        vision = self.model.vision
        with torch.inference_mode():
            hidden = vision(self._pixels(image).to(next(vision.parameters()).dtype)).last_hidden_state[0]
        hidden = F.normalize(hidden.float(), dim=-1)  # (N, D), unit rows
        rows, cols = self.model.config.grid
        return (hidden @ hidden[row * cols + col]).reshape(rows, cols).cpu()

    def encoder_view(self, image: str | None) -> tuple[Any, str, Any, str]:
        """The encoder tab for a new image: attention and the centre patch's similarity, with captions."""
        if not image:
            return None, "", None, ""
        try:
            picture = self._open_for_encoder(image)
        except gr.Error as err:
            return None, f"⚠️ {err.message}", None, ""
        rows, cols = self.model.config.grid
        return (
            self._attention_view(picture),
            self._attention_caption(),
            *self._similarity_view(picture, rows // 2, cols // 2),
        )

    def similarity_click(self, image: str | None, evt: gr.SelectData) -> tuple[Any, str]:
        """A click on the similarity picture at pixel (x, y) of its DISPLAY_SIZE square picks that patch."""
        if not image:
            return None, ""
        try:
            picture = self._open_for_encoder(image)
        except gr.Error as err:
            return None, f"⚠️ {err.message}"
        rows, cols = self.model.config.grid
        x, y = evt.index  # pixels of the picture as shown
        return self._similarity_view(picture, int(y) * rows // DISPLAY_SIZE, int(x) * cols // DISPLAY_SIZE)

    def _pixels(self, image: Image.Image) -> torch.Tensor:
        return self.model.processor([image])  # (1, 3, S, S), as the VLM sees it

    def _attention_view(self, picture: Image.Image) -> Image.Image:
        heat = attention_map(self.model.vision, self._pixels(picture))  # (rows, cols) in [0, 1]
        return overlay(picture, heat)

    def _similarity_view(self, picture: Image.Image, row: float, col: float) -> tuple[Image.Image, str]:
        rows, cols = self.model.config.grid
        row, col = min(max(int(row), 0), rows - 1), min(max(int(col), 0), cols - 1)  # clicks and API input
        sim = self.patch_similarity(picture, row, col)
        lo, hi = sim.min().item(), sim.max().item()
        caption = (
            f"Cosine similarity of patch (row {row + 1}, column {col + 1}) of {rows}×{cols} to every patch, "
            f"after the last layer: blue {lo:.2f} → red {hi:.2f}. **Click the picture to pick another patch.**"
        )
        return overlay(picture, _min_max(sim), mark=(row, col, rows, cols)), caption

    def _attention_caption(self) -> str:
        vision = self.model.config.vision
        rows, cols = self.model.config.grid
        source = (
            "the pooling head's probe (mean over heads)"
            if self.model.vision.head is not None
            else "the last layer, mean over heads and query patches (no pooling head)"
        )
        return (
            f"Attention over the {rows}×{cols} patches from {source}, min-max scaled: red is where the tower "
            f"looks most. The model sees this image squashed to {vision.image_size}×{vision.image_size} px."
        )

    def _open_for_encoder(self, image: str | Path | Image.Image) -> Image.Image:
        try:
            return self.open_image(image)
        except InputError as err:
            raise gr.Error(str(err)) from None

    def zero_shot(self, image: str | None, labels: str) -> dict[str, float]:
        """SigLIP zero-shot: for each comma-separated label, the probability that the image shows it.

        Sigmoid scores: each label is judged on its own, so they need not sum to 1."""
        if self.siglip_model is None or self.siglip_tokenizer is None:
            raise gr.Error("This model has no text tower, so it cannot score labels.")
        names = list(dict.fromkeys(name.strip() for name in (labels or "").split(",") if name.strip()))
        if not image or not names:
            raise gr.Error("Give an image and a few comma-separated labels, e.g. 'cat, dog, rocket'.")
        picture = self._open_for_encoder(image)
        config = self.siglip_model.config
        texts = [ZERO_SHOT_TEMPLATE.format(name) for name in names]
        # SigLIP's text tower reads texts padded to exactly its length (see vlm/siglip_text.py).
        ids = self.siglip_tokenizer(
            texts,
            padding="max_length",
            max_length=config.text_config.max_position_embeddings,
            truncation=True,
            return_tensors="pt",
        )["input_ids"]
        pixels = SiglipImageProcessor(config.vision_config.image_size)([picture])
        param = next(self.siglip_model.parameters())
        probs = self.siglip_model.zero_shot(pixels.to(param.device, param.dtype), ids.to(param.device))[0]
        return {name: float(p) for name, p in zip(names, probs.float().cpu().tolist(), strict=True)}


# -- pictures ---------------------------------------------------------------------------------------------


def _min_max(x: torch.Tensor) -> torch.Tensor:
    return (x - x.min()) / (x.max() - x.min()).clamp_min(1e-12)


def overlay(
    image: Image.Image,
    heat: torch.Tensor,
    mark: tuple[int, int, int, int] | None = None,
    size: int = DISPLAY_SIZE,
    alpha: float = 0.5,
) -> Image.Image:
    """The image squashed to a (size, size) square, as the model sees it, blended with the (rows, cols)
    heat map in [0, 1] (bilinear upsampling, jet colours); `mark` = (row, col, rows, cols) outlines a patch."""
    shown = np.asarray(image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC), np.float32) / 255
    heat_px = F.interpolate(heat.float()[None, None], size=(size, size), mode="bilinear", align_corners=False)
    colours = colormaps["jet"](heat_px[0, 0].clamp(0, 1).numpy())[..., :3]  # (size, size, 3)
    blended = Image.fromarray(np.uint8(np.rint(255 * ((1 - alpha) * shown + alpha * colours))))
    if mark is not None:
        row, col, rows, cols = mark
        box = (col * size / cols, row * size / rows, (col + 1) * size / cols - 1, (row + 1) * size / rows - 1)
        draw = ImageDraw.Draw(blended)
        draw.rectangle(box, outline="black", width=4)  # black under white: visible on any colour
        draw.rectangle(box, outline="white", width=2)
    return blended


# -- chat messages for display ------------------------------------------------------------------------------


def _assistant(text: str) -> Message:
    """An assistant turn; the same dict serves the model's history and the Chatbot."""
    return {"role": "assistant", "content": text}


def _shown_user(question: str, image: str | None) -> dict[str, Any]:
    return {"role": "user", "content": [{"path": image}, question] if image else question}


def _count_images(message: Message) -> int:
    content = message.get("content")
    return sum(1 for part in content if part.get("type") == "image") if isinstance(content, list) else 0


def _image_input(**kwargs: Any) -> gr.Image:
    """A `gr.Image(type="filepath")` that passes an upload's path on unopened: Gradio's own preprocessing
    opens it with PIL and fails on a broken file with a bare error toast, before our friendly message.

    Set on the instance, not by subclassing: Gradio writes a `.pyi` stub beside the module of every
    component subclass, and the library must not write into its own folder."""
    image = gr.Image(type="filepath", **kwargs)
    default = image.preprocess

    def preprocess(payload: Any) -> Any:
        if payload is not None and payload.path and not (payload.url or "").startswith("data:"):
            return payload.path
        return default(payload)

    image.preprocess = preprocess  # type: ignore[method-assign]
    return image


# -- the page ---------------------------------------------------------------------------------------------------


def build_app(
    model: VisionLanguageModel,
    title: str = "vlm: chat with images",
    model_info: ModelInfo | None = None,
    siglip_model: SiglipModel | None = None,
    siglip_tokenizer: PreTrainedTokenizerBase | None = None,
    max_image_pixels: int = MAX_IMAGE_PIXELS,
) -> gr.Blocks:
    """The demo around `model`, queue configured; `launch` serves it. Zero-shot appears only with a
    `siglip_model` (a dual encoder with a text tower) and its tokenizer."""
    demo = Demo(model, siglip_model, siglip_tokenizer, max_image_pixels)
    info = model_info or describe_model(None)
    examples = [e for e in EXAMPLES if e.path.is_file()]
    if examples:
        gr.set_static_paths([EXAMPLES_DIR])  # served as they are, from wherever the app is started
    generation = dict(concurrency_id="model", concurrency_limit=1)  # one generate at a time (docstring)
    encoder = dict(concurrency_id="encoder", concurrency_limit=2)
    instant = dict(queue=False, api_visibility="private")

    with gr.Blocks(title=title, analytics_enabled=False) as blocks:
        gr.Markdown(f"# {title}\n{summary_markdown(model, info)}")
        if info.card:
            with gr.Accordion("Model card", open=False):
                gr.Markdown(info.card)

        with gr.Tab("Chat"):
            history = gr.State([])
            question = gr.Textbox(
                show_label=False,
                placeholder="Ask about the image… (Enter sends; a new image can join at any turn)",
                scale=5,
                elem_id="chat-question",
                autofocus=True,
                render=False,  # drawn under the chat; created first so that the examples can fill it
            )
            with gr.Row():
                with gr.Column(scale=2, min_width=280):
                    image = _image_input(
                        sources=["upload", "clipboard"],
                        label="Image (upload, paste or pick an example)",
                        height=280,
                        elem_id="chat-image",
                    )
                    with gr.Accordion("Generation settings", open=False):
                        max_new_tokens = gr.Slider(1, MAX_NEW_TOKENS, value=Settings.max_new_tokens, step=1, label="Max new tokens", elem_id="max-new-tokens")  # fmt: skip
                        temperature = gr.Slider(0.0, 2.0, value=Settings.temperature, step=0.05, label="Temperature", info="0 = greedy (always the likeliest token)")  # fmt: skip
                        top_p = gr.Slider(0.05, 1.0, value=Settings.top_p, step=0.05, label="Top-p", info="used when temperature > 0")  # fmt: skip
                with gr.Column(scale=3):
                    chatbot = gr.Chatbot(
                        label="Chat",
                        height=520,
                        elem_id="chatbot",
                        placeholder=_chat_placeholder(info),
                        buttons=["copy", "copy_all"],
                    )
                    with gr.Row():
                        question.render()
                        send = gr.Button(
                            "Send", variant="primary", scale=1, min_width=80, elem_id="chat-send"
                        )
                    with gr.Row():
                        stop = gr.Button("Stop", variant="stop", elem_id="chat-stop")
                        clear = gr.Button("Clear", elem_id="chat-clear")
            with gr.Row():
                for label, chosen in [
                    ("Examples: easy-VQA test images", [e for e in examples if e.answer is not None]),
                    ("Examples: photos", [e for e in examples if e.answer is None]),
                ]:
                    with gr.Column(min_width=280):
                        if chosen:
                            gr.Examples(
                                [[str(e.path), e.question] for e in chosen],
                                inputs=[image, question],
                                label=label,
                                examples_per_page=len(chosen),
                            )
            chat_inputs = [question, image, chatbot, history, max_new_tokens, temperature, top_p]
            chat_outputs = [chatbot, history, question, image]
            events = [
                trigger(demo.chat, chat_inputs, chat_outputs, api_visibility="private", **generation)
                for trigger in (question.submit, send.click)
            ]
            stop.click(demo.stop, None, None, cancels=events, **instant)
            for clearing in (clear.click, chatbot.clear):  # the Chatbot's own bin button as well
                clearing(demo.clear, None, chat_outputs, cancels=events, **instant)

        with gr.Tab("Encoder"):
            gr.Markdown(
                "What the vision tower sees. **Left:** where its attention goes. **Right:** how alike one "
                "patch's output embedding is to every other patch's; click to move the white square."
            )
            with gr.Row():
                enc_image = _image_input(
                    sources=["upload", "clipboard"], label="Image", height=DISPLAY_SIZE, elem_id="enc-image"
                )
                with gr.Column():
                    attention_out = gr.Image(label="Attention", format="png", interactive=False, elem_id="enc-attention")  # fmt: skip
                    attention_note = gr.Markdown()
                with gr.Column():
                    similarity_out = gr.Image(label="Patch similarity (click a patch)", format="png", interactive=False, elem_id="enc-similarity")  # fmt: skip
                    similarity_note = gr.Markdown()
            if examples:
                gr.Examples([[str(e.path)] for e in examples], inputs=[enc_image], label="Examples")
            enc_image.change(
                demo.encoder_view,
                enc_image,
                [attention_out, attention_note, similarity_out, similarity_note],
                api_visibility="private",
                **encoder,
            )
            similarity_out.select(
                demo.similarity_click,
                enc_image,
                [similarity_out, similarity_note],
                api_visibility="private",
                **encoder,
            )
            with gr.Group(visible=demo.has_text_tower):
                gr.Markdown(f"**Zero-shot** with the SigLIP text tower: each label is scored as “{ZERO_SHOT_TEMPLATE.format('…')}”")  # fmt: skip
                labels = gr.Textbox(
                    label="Labels (comma-separated)", value="a cat, a dog, a rocket, a cup of coffee"
                )
                scores = gr.Label(label="Probability the image shows it (sigmoid: labels judged one by one)")
                score = gr.Button("Score labels")
            if demo.has_text_tower:
                score.click(demo.zero_shot, [enc_image, labels], scores, api_name="zero_shot", **encoder)
                labels.submit(
                    demo.zero_shot, [enc_image, labels], scores, api_visibility="private", **encoder
                )

        with gr.Tab("API"):
            gr.Markdown(
                "Every answer and picture is also an endpoint for scripts, through "
                "[`gradio_client`](https://www.gradio.app/guides/getting-started-with-the-python-client) "
                "(see also *Use via API* at the bottom of the page):\n\n"
                f"```python\n{CLIENT_EXAMPLE}```\n\n"
                "| endpoint | inputs | output |\n|---|---|---|\n"
                "| `/ask` | image, question, max new tokens, temperature, top-p | the answer |\n"
                "| `/ask_stream` | the same | the answer so far, streamed (`client.submit` and iterate) |\n"
                "| `/attention` | image | attention overlay (PNG) |\n"
                "| `/similarity` | image, patch row, patch column | patch-similarity overlay (PNG) |\n"
                + ("| `/zero_shot` | image, comma-separated labels | label → probability |\n" if demo.has_text_tower else "")
            )  # fmt: skip
            # API-only components: never shown, they give the endpoints plain, typed inputs and outputs.
            with gr.Group(visible=False):
                api_image = _image_input(label="image")
                api_question = gr.Textbox(label="question")
                api_answer = gr.Textbox(label="answer")
                api_row = gr.Number(label="row", precision=0, value=0)
                api_col = gr.Number(label="col", precision=0, value=0)
                api_picture = gr.Image(label="overlay", format="png")
                api_button = gr.Button()
            settings = [max_new_tokens, temperature, top_p]  # the sliders check ranges for API callers too
            api_button.click(demo.ask, [api_image, api_question, *settings], api_answer, api_name="ask", **generation)  # fmt: skip
            api_button.click(demo.ask_stream, [api_image, api_question, *settings], api_answer, api_name="ask_stream", **generation)  # fmt: skip
            api_button.click(demo.attention, api_image, api_picture, api_name="attention", **encoder)
            api_button.click(demo.similarity, [api_image, api_row, api_col], api_picture, api_name="similarity", **encoder)  # fmt: skip

    blocks.queue(default_concurrency_limit=2, max_size=QUEUE_SIZE)
    blocks.handlers = demo  # type: ignore[attr-defined]  # the event handlers, for tests and embedding
    return blocks


def _chat_placeholder(info: ModelInfo) -> str:
    if info.trained_on == UNTRAINED:
        tip = (
            "The vision tower is **untrained**, so answers about images are noise until a trained model ships. "
            "The language model is real: ask it text questions, e.g. *What is the capital of France?*"
        )
    else:
        tip = f"Trained on **{info.trained_on}**: pick an example below, or upload your own image."
    return f"### Ask about an image\n{tip}"


# -- serving -----------------------------------------------------------------------------------------------------


def load_model(model_dir: str | None = None) -> tuple[VisionLanguageModel, ModelInfo]:
    """The model to serve and its description: a saved VLM folder (or hub id), else the project default."""
    if model_dir is None:
        shipped = (DEFAULT_MODEL_DIR / "config.json").is_file()
        return load_default_model(), describe_model(DEFAULT_MODEL_DIR if shipped else None)
    from vlm.weights import resolve_checkpoint

    folder = resolve_checkpoint(model_dir)
    return VisionLanguageModel.from_pretrained(folder), describe_model(folder)


def launch(
    model_dir: str | None = None,
    host: str = "127.0.0.1",
    port: int = 7860,
    share: bool = False,
    siglip_dir: str | None = None,
    model: VisionLanguageModel | None = None,
    model_info: ModelInfo | None = None,
    block: bool = True,
    max_file_size: str | int = MAX_FILE_SIZE,
) -> tuple[gr.Blocks, str]:
    """Load the model once (unless `model` is given), build the app and serve it; returns (app, URL).

    Binds `host` (loopback unless asked otherwise) and `port`. `siglip_dir` names a SigLIP dual encoder
    (with its tokenizer) for the zero-shot box; when the model is loaded here and none is named, the shipped
    one (`vlm/default_siglip/`) if present. With `block=False` returns at once, the server running in a
    background thread (tests; stop it with `app.close()`)."""
    if model is None:
        print(f"Loading the model ({model_dir or 'project default'})…", flush=True)
        start = time.perf_counter()
        model, model_info = load_model(model_dir)
        print(f"Model loaded in {time.perf_counter() - start:.1f} s.", flush=True)
        from vlm.zeroshot import DEFAULT_SIGLIP_DIR

        if siglip_dir is None and (DEFAULT_SIGLIP_DIR / "config.json").is_file():
            siglip_dir = str(DEFAULT_SIGLIP_DIR)
    siglip_model = siglip_tokenizer = None
    if siglip_dir is not None:
        from transformers import AutoTokenizer

        from vlm.siglip_model import SiglipModel
        from vlm.weights import resolve_checkpoint

        folder = resolve_checkpoint(siglip_dir)
        siglip_model, siglip_tokenizer = (
            SiglipModel.from_pretrained(folder),
            AutoTokenizer.from_pretrained(folder),
        )
    app = build_app(
        model, model_info=model_info, siglip_model=siglip_model, siglip_tokenizer=siglip_tokenizer
    )
    _, url, share_url = app.launch(
        server_name=host,
        server_port=port,
        share=share,
        max_file_size=max_file_size,
        prevent_thread_lock=True,
        quiet=True,
        # System fonts: the default theme's web fonts cannot load offline and would only delay the page.
        theme=gr.themes.Default(
            font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"]
        ),  # fmt: skip
    )
    print(f"vlm demo running at {url}" + (f" (public: {share_url})" if share_url else ""), flush=True)
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"Note: bound to {host}, so other machines on the network can reach the demo.", flush=True)
    if block:
        try:
            app.block_thread()
        finally:
            app.close()
    return app, url
