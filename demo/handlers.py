"""The demo's event handlers: small functions over library calls, knowing nothing of the page layout.

The library does the work: answers come from one `vlm.serving.BatchedGenerator` (concurrent users share one
batched decode; a stop event ends an answer within a token), long chats are cut by
`VisionLanguageModel.fit_context`, pictures are `vlm.viz`'s and zero-shot scores `vlm.zeroshot`'s. What is
left here is the demo's own job: friendly one-line messages for bad input, the chat's two histories (what the
model sees, what the page shows), and removing uploads once they are read.

Uploads: Gradio keeps every upload in its temp folder for the server's lifetime. `Uploads.open` reads one
into memory and deletes the file (a refused one too); the chat shows a small copy it writes into that folder,
where the app's `delete_cache` schedule removes it.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import gradio as gr
import torch
from gradio.utils import get_upload_folder
from PIL import Image
from transformers import PreTrainedTokenizerBase

from vlm.conversation import Message, user
from vlm.model import ContextTooLong, VisionLanguageModel
from vlm.processing import ImageLoadError, SiglipImageProcessor, load_image
from vlm.serving import BatchedGenerator
from vlm.siglip_model import SiglipModel
from vlm.viz import attention_map, overlay, patch_similarity
from vlm.zeroshot import DEFAULT_TEMPLATES, parse_labels, zero_shot

log = logging.getLogger(__name__)

MAX_IMAGE_PIXELS = 25_000_000  # a 25-megapixel phone photo passes; a pixel bomb is refused from its header
KEEP_SIDE = 1024  # images are kept in the chat history at most this large (the model sees 64..384 px)
SHOWN_SIDE = 512  # the chat shows a copy at most this large
MAX_NEW_TOKENS = 1024  # the settings slider's top
DISPLAY_SIZE = 384  # side of the encoder tab's square pictures, px
MAX_BATCH_SIZE = 32  # answers decoded together; the generation events' concurrency limit
# Uploads remembered after their file is gone (see `Uploads`): as many as the app's queue admits at once, so
# that no burst it lets in can push out an upload another request has yet to read (up to 64 x 3 MB).
RECENT_UPLOADS = 64

# What an image input brings: a path, or Gradio's upload record ({"path": ...}) from an event that skips
# Gradio's preprocessing (which would open the file with PIL before us and fail without our message).
ImageInput = str | Path | dict[str, Any] | None
DualEncoder = tuple[SiglipModel, PreTrainedTokenizerBase]


class InputError(ValueError):
    """Input the demo cannot use; `str(err)` is a sentence for the user."""


@dataclass(frozen=True)
class Settings:
    """Generation settings as the page offers them; temperature 0 is greedy (top-p is then unused)."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 0.9


class UserStop(threading.Event):
    """An answer's stop event; `by_user` once Stop or Clear set it (rather than the answer ending)."""

    by_user = False
    cleared = False  # by Clear: the chat event's last update must be the cleared chat too


class Uploads:
    """Opens the images users send, and deletes Gradio's file of each upload once read (or refused).

    Gradio files an upload under the hash of its content, so two users sending the same file share one path,
    and one may still be waiting to read it when the other deletes it. The last few images read from the
    upload folder are therefore remembered by path (content-addressed: a path always means the same image)."""

    def __init__(self, folder: str | Path, max_pixels: int = MAX_IMAGE_PIXELS) -> None:
        self.folder = Path(folder).resolve()
        self.max_pixels = max_pixels
        self._recent: OrderedDict[str, Image.Image] = OrderedDict()
        self._lock = threading.Lock()

    def open(self, source: ImageInput) -> Image.Image:
        """The image as RGB, at most KEEP_SIDE px a side, or `InputError` saying what is wrong with it."""
        raw = source.get("path") if isinstance(source, dict) else source
        path = Path(raw) if raw else None
        if path is None:
            raise InputError(
                "I couldn't use that image: it did not arrive as a file. Please upload it again."
            )
        if not path.resolve().is_relative_to(self.folder):  # an example or a local file: never deleted
            return self._load(path)
        key = str(path.resolve())
        with self._lock:
            image = self._recent.get(key)
        if image is None:
            try:
                image = self._load(path)
            except InputError:
                image = self._recent.get(key)  # the same upload, read and deleted by a concurrent request
                if image is None:
                    path.unlink(missing_ok=True)
                    raise
            with self._lock:
                self._recent[key] = image
                while len(self._recent) > RECENT_UPLOADS:
                    self._recent.popitem(last=False)
        path.unlink(
            missing_ok=True
        )  # remembered before deleted, so a concurrent reader finds one or the other
        return image

    def shown_copy(self, image: Image.Image) -> str:
        """A small copy of `image` for the chat to show, in Gradio's folder (its `delete_cache` clears it)."""
        copy = image.copy()
        copy.thumbnail((SHOWN_SIDE, SHOWN_SIDE), Image.Resampling.BICUBIC)
        path = self.folder / "vlm-demo" / f"{uuid.uuid4().hex}.webp"
        path.parent.mkdir(parents=True, exist_ok=True)
        copy.save(path, quality=90)
        return str(path)

    def _load(self, path: Path) -> Image.Image:
        try:
            image = load_image(path, max_pixels=self.max_pixels)
        except ImageLoadError as err:
            # load_image's reasons are written for developers: drop the advice meant for them.
            reason = err.reason.split(" (a possible decompression bomb)")[0].split("; pass a larger")[0]
            reason = reason.replace("max_pixels = ", "the limit of ")
            limit = self.max_pixels
            limit_text = f"{limit / 1e6:g} megapixels" if limit >= 1e6 else f"{limit:,} pixels"
            raise InputError(
                f"I couldn't use that image: {reason}. Please try a PNG, JPEG, WebP or GIF of at most {limit_text}."
            ) from None
        if max(image.size) > KEEP_SIDE:  # the history keeps every image; the model never sees more than this
            image.thumbnail((KEEP_SIDE, KEEP_SIDE), Image.Resampling.BICUBIC)
        return image


class Handlers:
    """The demo's event handlers around one model and one batched generator."""

    def __init__(
        self,
        model: VisionLanguageModel,
        dual_encoder: DualEncoder | None = None,
        max_image_pixels: int = MAX_IMAGE_PIXELS,
        upload_folder: str | Path | None = None,
        max_batch_size: int = MAX_BATCH_SIZE,
    ) -> None:
        self.model = model
        self.dual_encoder = dual_encoder
        self.generator = BatchedGenerator(model, max_batch_size=max_batch_size)
        self.uploads = Uploads(upload_folder or get_upload_folder(), max_image_pixels)
        self._stops: dict[str, UserStop] = {}  # session hash -> its answer's stop, for the Stop button

    def close(self) -> None:
        """Let running answers finish, then stop the generator's worker."""
        self.generator.close()

    def settings(
        self, max_new_tokens: float | None, temperature: float | None, top_p: float | None
    ) -> Settings:
        """Sanitised settings: at most half the context is spent on the answer, so the prompt keeps room."""
        default = Settings()
        n = default.max_new_tokens if max_new_tokens is None else int(max_new_tokens)
        n = max(1, min(n, MAX_NEW_TOKENS, self.model.context_length // 2))
        t = default.temperature if temperature is None else max(0.0, float(temperature))
        p = default.top_p if top_p is None else min(max(float(top_p), 0.01), 1.0)
        return Settings(n, t, p)

    def fit(self, messages: list[Message], settings: Settings) -> tuple[list[Message], int]:
        """`fit_context`, with a too-long message as an `InputError`."""
        try:
            return self.model.fit_context(messages, settings.max_new_tokens)
        except ContextTooLong as err:
            raise InputError(
                f"Your message is {err.length:,} tokens, more than the {err.budget:,} this model can read with "
                f"{err.max_new_tokens} tokens left to answer. Please shorten it (or lower 'max new tokens')."
            ) from None

    def stream(
        self,
        messages: list[Message],
        settings: Settings,
        session: str | None = None,
        stop: UserStop | None = None,
    ) -> Iterator[str]:
        """The answer so far (growing text) as the generator produces it. Stop (for `session`), clear, or
        closing this iterator (Gradio's cancel, a closed tab) ends the answer within a token. Once the user
        stopped it, nothing more is yielded: a piece decoded meanwhile must not redraw a chat just cleared
        (Gradio's cancel of this event can arrive after the Clear button's own update)."""
        stop = stop if stop is not None else UserStop()
        if session is not None:
            if (previous := self._stops.get(session)) is not None:
                previous.set()  # one answer per session
            self._stops[session] = stop
        text = ""
        try:
            for piece in self.generator.stream(messages, stop=stop, **asdict(settings)):
                if stop.by_user:
                    return
                text += piece
                yield text
        finally:
            stop.set()
            if session is not None and self._stops.get(session) is stop:
                del self._stops[session]

    def stop(self, request: gr.Request | None = None, cleared: bool = False) -> None:
        """Stop this session's answer (the Stop button; Gradio also cancels the event)."""
        if request is not None and (stop := self._stops.get(request.session_hash)) is not None:
            stop.by_user, stop.cleared = True, cleared
            stop.set()

    # -- chat tab

    def chat(
        self,
        question: str | None,
        image: ImageInput,
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
        display, history = list(display or []), list(history or [])
        question = (question or "").strip()
        if not question:  # the image stays in its box (unread) for the next try
            hint = (
                "Type a question about the image"
                if image
                else "Type a question (and add an image if you like)"
            )
            yield [*display, _assistant(f"{hint}, then press Enter.")], history, gr.skip(), gr.skip()
            return
        try:
            settings = self.settings(max_new_tokens, temperature, top_p)
            pictures = [self.uploads.open(image)] if image else []
            messages, dropped = self.fit([*history, user(question, pictures)], settings)
        except InputError as err:  # keep the question so it can be re-sent; drop an unusable image
            yield [*display, _shown_user(question, None), _assistant(f"⚠️ {err}")], history, gr.skip(), None
            return

        display.append(_shown_user(question, self.uploads.shown_copy(pictures[0]) if pictures else None))
        if dropped:
            display.append(_assistant(self._dropped_notice(dropped, history, messages)))
        yield display, messages, "", None  # show the question now, and clear the input boxes
        answer, stop = "", UserStop()
        try:
            for answer in self.stream(messages, settings, request.session_hash if request else None, stop):
                yield [*display, _assistant(answer)], [*messages, _assistant(answer)], gr.skip(), gr.skip()
        except Exception:
            log.exception("generation failed")
            note = "⚠️ Something went wrong while answering. The app is still running: please try again."
            yield [*display, _assistant(f"{answer}\n\n{note}".strip())], messages, gr.skip(), gr.skip()
            return
        if (
            stop.cleared
        ):  # Gradio may deliver this event's last update after Clear's: make it the cleared chat
            yield [], [], gr.skip(), gr.skip()
            return
        if not answer and not stop.by_user:  # after Stop the page keeps what it shows
            shown = [*display, _assistant("_(the model gave an empty answer)_")]
            yield shown, [*messages, _assistant("")], gr.skip(), gr.skip()

    def clear(self, request: gr.Request | None = None) -> tuple[list, list, str, None]:
        """Forget the conversation (and stop an answer in progress)."""
        self.stop(request, cleared=True)
        return [], [], "", None

    def _dropped_notice(self, dropped: int, history: list[Message], kept: list[Message]) -> str:
        images = _count_images(history) - _count_images(kept[:-1])
        with_images = f" (with {images} image{'s' if images > 1 else ''})" if images else ""
        return (
            f"ⓘ This conversation no longer fits the model's {self.model.context_length:,}-token context: "
            f"the oldest {dropped} exchange{'s' if dropped > 1 else ''}{with_images} left what the model sees."
        )

    # -- API: one question, no history

    def ask_stream(
        self,
        image: ImageInput,
        question: str,
        max_new_tokens: float | None = 256,
        temperature: float | None = 0.0,
        top_p: float | None = 0.9,
    ) -> Iterator[str]:
        """Answer one question about one image (or none), yielding the answer so far as it streams."""
        messages, settings = self._question(image, question, max_new_tokens, temperature, top_p)
        answer = ""
        for answer in self.stream(messages, settings):
            yield answer
        if not answer:
            yield ""

    def ask(
        self,
        image: ImageInput,
        question: str,
        max_new_tokens: float | None = 256,
        temperature: float | None = 0.0,
        top_p: float | None = 0.9,
    ) -> str:
        """Answer one question about one image (or none): the whole answer."""
        messages, settings = self._question(image, question, max_new_tokens, temperature, top_p)
        return self.generator.generate(messages, **asdict(settings))

    def _question(
        self,
        image: ImageInput,
        question: str,
        max_new_tokens: float | None,
        temperature: float | None,
        top_p: float | None,
    ) -> tuple[list[Message], Settings]:
        try:
            settings = self.settings(max_new_tokens, temperature, top_p)
            pictures = (
                [self.uploads.open(image)] if image else []
            )  # read (and deleted) even without a question
            if not (question or "").strip():
                raise InputError("Please ask a question.")
            return self.fit([user(question.strip(), pictures)], settings)[0], settings
        except InputError as err:
            raise gr.Error(str(err)) from None

    # -- encoder tab; `image` is an upload, or the tab's picture (a PIL image kept in a gr.State)

    def encoder_view(self, image: ImageInput) -> tuple[Any, str, Any, str, Image.Image | None]:
        """The encoder tab for a new image: attention and the centre patch's similarity with captions, and
        the picture for the tab's state (the upload's file is gone once read)."""
        if not image:
            return None, "", None, "", None
        try:
            picture = self.uploads.open(image)
        except InputError as err:
            return None, f"⚠️ {err}", None, "", None
        rows, cols = self.model.config.grid
        return (
            self._attention_view(picture),
            self._attention_caption(),
            *self._similarity_view(picture, rows // 2, cols // 2),
            picture,
        )

    def similarity_click(self, picture: Image.Image | None, evt: gr.SelectData) -> tuple[Any, str]:
        """A click on the similarity picture at pixel (x, y) of its DISPLAY_SIZE square picks that patch."""
        if picture is None:
            return None, ""
        rows, cols = self.model.config.grid
        x, y = evt.index  # pixels of the picture as shown
        return self._similarity_view(picture, int(y) * rows // DISPLAY_SIZE, int(x) * cols // DISPLAY_SIZE)

    def attention(self, image: ImageInput | Image.Image) -> Image.Image | None:
        """The vision tower's attention over the patches, overlaid on the image (DISPLAY_SIZE square)."""
        return self._attention_view(self._picture(image)) if image else None

    def similarity(self, image: ImageInput | Image.Image, row: float, col: float) -> Image.Image | None:
        """The patch-similarity map for patch (row, col) overlaid on the image, the patch outlined."""
        return self._similarity_view(self._picture(image), row, col)[0] if image else None

    def zero_shot(self, image: ImageInput | Image.Image, labels: str) -> dict[str, float]:
        """SigLIP zero-shot with `vlm.zeroshot`: for each comma-separated label, the probability that the
        image shows it (sigmoid scores: each label is judged on its own, so they need not sum to 1)."""
        if self.dual_encoder is None:
            raise gr.Error("This demo has no SigLIP text tower, so it cannot score labels.")
        try:
            names = parse_labels(labels or "")
        except ValueError:
            names = []
        if not image or not names:
            raise gr.Error("Give an image and a few comma-separated labels, e.g. 'cat, dog, rocket'.")
        probs = zero_shot(*self.dual_encoder, [self._picture(image)], names, DEFAULT_TEMPLATES)[0]
        return dict(zip(names, probs.tolist(), strict=True))

    def _picture(self, image: ImageInput | Image.Image) -> Image.Image:
        if isinstance(image, Image.Image):
            return image
        try:
            return self.uploads.open(image)
        except InputError as err:
            raise gr.Error(str(err)) from None

    def _whole(self, picture: Image.Image) -> torch.Tensor:
        """(1, 3, H, W): the whole picture squashed to one tile, normalised as the model's processor does (a model
        that splits images into tiles sees it so as its global tile, near enough for a picture of attention)."""
        p = self.model.processor
        return SiglipImageProcessor(p.image_size, p.mean, p.std, p.resample)([picture])

    def _attention_view(self, picture: Image.Image) -> Image.Image:
        heat = attention_map(self.model.vision, self._whole(picture))  # (rows, cols)
        return overlay(_squared(picture), heat)

    def _similarity_view(self, picture: Image.Image, row: float, col: float) -> tuple[Image.Image, str]:
        rows, cols = self.model.config.grid
        row, col = min(max(int(row), 0), rows - 1), min(max(int(col), 0), cols - 1)  # clicks and API input
        sim = patch_similarity(self.model.vision, self._whole(picture), row, col)
        caption = (
            f"Cosine similarity of patch (row {row + 1}, column {col + 1}) of {rows}×{cols} to every patch, "
            f"after the last layer: blue {sim.min():.2f} → red {sim.max():.2f}. "
            "**Click the picture to pick another patch.**"
        )
        return overlay(_squared(picture), sim, mark=(row, col)), caption

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


def _squared(picture: Image.Image) -> Image.Image:
    """The picture squashed to the encoder tab's square, as the model sees it."""
    return picture.resize((DISPLAY_SIZE, DISPLAY_SIZE), Image.Resampling.BICUBIC)


def _assistant(text: str) -> Message:
    """An assistant turn; the same dict serves the model's history and the Chatbot."""
    return {"role": "assistant", "content": text}


def _shown_user(question: str, image: str | None) -> dict[str, Any]:
    return {"role": "user", "content": [{"path": image}, question] if image else question}


def _count_images(messages: list[Message]) -> int:
    return sum(
        part.get("type") == "image"
        for m in messages
        if isinstance(m.get("content"), list)
        for part in m["content"]
    )
