"""The Gradio demo: chat with images, and see what the vision encoder sees.

    python demo/app.py [--model DIR_OR_ID] [--host 127.0.0.1] [--port 7860] [--share] [--siglip DIR]
                       [--device auto|cpu|cuda|cuda:N|mps] [--dtype auto|float32|bfloat16|float16]
    (also `vlm demo` and `make demo`, with the same flags)

One page around one loaded `VisionLanguageModel` (`build_app` wires components to `demo.handlers`; `launch`
loads the model and serves it):
- **Chat**: an image (upload, paste or an example) and a question; the answer streams into a multi-turn chat,
  and a new image can join at any turn. Settings, Stop and Clear; the model's name and card on the page.
- **Encoder**: the tower's attention overlaid on the image; click a patch to see how alike every other
  patch's output embedding is; zero-shot label scores with a SigLIP dual encoder (the shipped one by default).
- **API** (`gradio_client`): `/ask`, `/ask_stream`, `/attention`, `/similarity`, and `/zero_shot` with a
  dual encoder (see `CLIENT_EXAMPLE`).

Deliberate choices
- Many users at once: every answer goes through the handlers' one `BatchedGenerator`, and the generation
  events may run MAX_BATCH_SIZE at a time, so concurrent questions are decoded together in one batch.
- Image inputs skip Gradio's preprocessing (`preprocess=False`): it would open every upload with PIL and fail
  on a broken one with a bare error toast; the handlers get Gradio's upload record (already checked to lie
  in its upload folder) and our loader says what is wrong. Uploads are deleted once read; what Gradio
  itself keeps (the chat's copies, uploads nobody sent) goes on the `delete_cache` schedule.
- Loopback by default: `--host 0.0.0.0` or `--share` expose the demo on purpose.
- The GPU when there is one (`--device auto`), in bfloat16 where it has it (`--dtype auto`): the models load
  there and the batched generator runs where the model is.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import torch

from demo.handlers import (
    DISPLAY_SIZE,
    MAX_IMAGE_PIXELS,
    MAX_NEW_TOKENS,
    RECENT_UPLOADS,
    DualEncoder,
    Handlers,
    Settings,
)
from vlm.checks import InvalidValue
from vlm.cli import CommandParser, checked
from vlm.devices import DTYPES, resolve_device, resolve_dtype
from vlm.model import DEFAULT_MODEL_DIR, VisionLanguageModel, load_default_model
from vlm.weights import read_config, resolve_checkpoint, siglip_config_from
from vlm.zeroshot import DEFAULT_SIGLIP_DIR, DEFAULT_TEMPLATES, load_dual_encoder

EXAMPLES_DIR = Path(__file__).resolve().parent / "examples"
MAX_FILE_SIZE = "20mb"  # Gradio refuses bigger uploads before they reach us
# Waiting events beyond this are refused with "queue full" instead of piling up; the handlers remember as many
# recent uploads (two users sending the same file share it, and the first reader deletes it).
QUEUE_SIZE = RECENT_UPLOADS
DELETE_CACHE = (3600, 86400)  # every hour, Gradio deletes the app's files older than a day
UNTRAINED = "untrained vision tower: ask text questions"


ZERO_SHOT_LABELS = "a circle, a rectangle, a triangle"  # the Encoder tab's starting labels


@dataclass(frozen=True)
class Example:
    """An example shipped in `demo/examples/`; `answer` is the dataset's answer, where there is one."""

    file: str
    question: str
    answer: str | None = None

    @property
    def path(self) -> Path:
        return EXAMPLES_DIR / self.file

    @property
    def group(self) -> str:
        """The examples' heading on the page."""
        if self.file.startswith("easyvqa_"):
            return "Examples: easy-VQA test images"
        if self.file.startswith(("scene_", "sort-of-clevr_")):
            return "Examples: generated test scenes, one per skill"
        return "Examples: photos (not what the model was trained on)"


EXAMPLES = (
    Example("easyvqa_0_red_triangle.png", "What shape is in the image?", "triangle"),
    Example("easyvqa_6_blue_circle.png", "What color is the shape?", "blue"),
    Example("easyvqa_11_black_rectangle.png", "What shape is in the image?", "rectangle"),
    Example("easyvqa_7_green_circle.png", "Is there a green shape?", "yes"),
    Example("easyvqa_28_brown_triangle.png", "What color is the triangle?", "brown"),
    Example("easyvqa_38_teal_rectangle.png", "Does the image contain a circle?", "no"),
    # Generated test scenes (vlm.data.scenes, test images 1-9: never trained on), one per skill; the answer
    # is the scene's own (tests/test_app.py redraws each and checks it).
    Example("scene_2_count.png", "How many objects are there?", "4"),
    Example("scene_1_position.png", "Is the orange triangle on the left or the right?", "left"),
    Example("scene_3_relation.png", "Is the snail above the pink rectangle?", "no"),
    Example("scene_6_reading.png", "What does the sign say?", "sale"),
    Example("scene_4_chart.png", "Which bar is the highest?", "A"),
    Example("scene_9_existence.png", "Is there a red triangle?", "no"),
    Example("scene_14_color.png", "What colour is the star?", "yellow"),
    Example("scene_5_shape.png", "Which shape is red?", "triangle"),
    Example("scene_11_compare.png", "Are there more squares or more triangles?", "squares"),
    Example(
        "scene_7_caption.png",
        "Describe the image.",
        "A circle, a square, a cross, a triangle, a hot dog, a drum and a bar chart.",
    ),
    Example(
        "scene_8_detail.png",
        "Describe the image in detail.",
        "There are four objects. A medium koala at the top. Small grapes on the left. A medium orange "
        "rectangle in the center. A medium gray diamond at the bottom right.",
    ),
    # Sort-of-CLEVR test images 1 and 2 (vlm.data.sort_of_clevr, 75 px), a question of each kind the paper asks.
    Example(
        "sort-of-clevr_1_relational.png",
        "What is the shape of the object that is furthest from the orange object?",
        "circle",
    ),
    Example(
        "sort-of-clevr_2_non-relational.png", "Is the red object on the left or right of the image?", "left"
    ),
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


# -- the model card ------------------------------------------------------------------------------------------


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
    if front := re.match(r"^---\n(.*?)\n---\n", text, re.S):
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
    return (
        f"**Model:** {info.name} · **trained on:** {info.trained_on}  \n"
        f"SigLIP vision tower ({params / 1e6:.1f} M parameters) sees images at {vision.image_size}×{vision.image_size} px "
        f"in {vision.patch_size}-px patches → {model.tokens_per_image} image tokens for the LM "
        f"`{model.config.lm_source}` ({model.context_length:,}-token context)."
    )


def chat_placeholder(info: ModelInfo) -> str:
    if info.trained_on == UNTRAINED:
        tip = (
            "The vision tower is **untrained**, so answers about images are noise until a trained model ships. "
            "The language model is real: ask it text questions, e.g. *What is the capital of France?*"
        )
    else:
        tip = f"Trained on **{info.trained_on}**: pick an example below, or upload your own image."
    return f"### Ask about an image\n{tip}"


# -- the page ---------------------------------------------------------------------------------------------------


def build_app(
    handlers: Handlers, model_info: ModelInfo | None = None, title: str = "vlm: chat with images"
) -> gr.Blocks:
    """The page around `handlers`, queue configured; `launch` serves it. Zero-shot appears only when the
    handlers have a dual encoder."""
    info = model_info or describe_model(None)
    examples = [e for e in EXAMPLES if e.path.is_file()]
    if examples:
        gr.set_static_paths([EXAMPLES_DIR])  # served as they are, from wherever the app is started
    # Answers are batched by the generator, so the generation events run together (module docstring).
    generation = dict(concurrency_id="generate", concurrency_limit=handlers.generator.max_batch_size)
    encoder = dict(concurrency_id="encoder", concurrency_limit=2)
    instant = dict(queue=False, api_visibility="private")
    raw = dict(preprocess=False)  # image inputs reach our loader as Gradio's upload record (docstring)
    has_text_tower = handlers.dual_encoder is not None
    template = DEFAULT_TEMPLATES[0].format("…")

    with gr.Blocks(title=title, analytics_enabled=False, delete_cache=DELETE_CACHE) as blocks:
        gr.Markdown(f"# {title}\n{summary_markdown(handlers.model, info)}")
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
                    image = gr.Image(
                        type="filepath",
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
                        placeholder=chat_placeholder(info),
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
                groups = {e.group: [x for x in examples if x.group == e.group] for e in examples}
                for label, chosen in groups.items():
                    with gr.Column(min_width=280):
                        gr.Examples(
                            [[str(e.path), e.question] for e in chosen],
                            inputs=[image, question],
                            label=label,
                            examples_per_page=len(chosen),
                        )
            chat_inputs = [question, image, chatbot, history, max_new_tokens, temperature, top_p]
            chat_outputs = [chatbot, history, question, image]
            events = [
                trigger(
                    handlers.chat, chat_inputs, chat_outputs, api_visibility="private", **generation, **raw
                )
                for trigger in (question.submit, send.click)
            ]
            stop.click(handlers.stop, None, None, cancels=events, **instant)
            for clearing in (clear.click, chatbot.clear):  # the Chatbot's own bin button as well
                clearing(handlers.clear, None, chat_outputs, cancels=events, **instant)

        with gr.Tab("Encoder"):
            gr.Markdown(
                "What the vision tower sees. **Left:** where its attention goes. **Right:** how alike one "
                "patch's output embedding is to every other patch's; click to move the white square."
            )
            picture = gr.State(None)  # the tab's image, read once: its upload is deleted
            with gr.Row():
                enc_image = gr.Image(
                    type="filepath",
                    sources=["upload", "clipboard"],
                    label="Image",
                    height=DISPLAY_SIZE,
                    elem_id="enc-image",
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
                handlers.encoder_view,
                enc_image,
                [attention_out, attention_note, similarity_out, similarity_note, picture],
                api_visibility="private",
                **encoder,
                **raw,
            )
            similarity_out.select(
                handlers.similarity_click,
                picture,
                [similarity_out, similarity_note],
                api_visibility="private",
                **encoder,
            )
            with gr.Group(visible=has_text_tower):
                gr.Markdown(f"**Zero-shot** with the SigLIP text tower: each label is scored as “{template}”")
                # Labels the shipped encoder knows (it learned easy-VQA's shapes; photos of cats it never saw):
                # the examples' shapes are named right (tests/test_app.py checks all six).
                labels = gr.Textbox(label="Labels (comma-separated)", value=ZERO_SHOT_LABELS)
                scores = gr.Label(label="Probability the image shows it (sigmoid: labels judged one by one)")
                score = gr.Button("Score labels")
            if has_text_tower:
                for trigger in (score.click, labels.submit):
                    trigger(handlers.zero_shot, [picture, labels], scores, api_name="score_labels", api_visibility="private", **encoder)  # fmt: skip

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
                + ("| `/zero_shot` | image, comma-separated labels | label → probability |\n" if has_text_tower else "")
            )  # fmt: skip
            # API-only components: never shown, they give the endpoints plain, typed inputs and outputs.
            with gr.Group(visible=False):
                api_image = gr.Image(type="filepath", label="image")
                api_question = gr.Textbox(label="question")
                api_answer = gr.Textbox(label="answer")
                api_row = gr.Number(label="row", precision=0, value=0)
                api_col = gr.Number(label="col", precision=0, value=0)
                api_picture = gr.Image(label="overlay", format="png")
                api_button = gr.Button()
            settings = [max_new_tokens, temperature, top_p]  # the sliders check ranges for API callers too
            asking = [api_image, api_question, *settings]
            api_button.click(handlers.ask, asking, api_answer, api_name="ask", **generation, **raw)
            api_button.click(handlers.ask_stream, asking, api_answer, api_name="ask_stream", **generation, **raw)  # fmt: skip
            api_button.click(handlers.attention, api_image, api_picture, api_name="attention", **encoder, **raw)  # fmt: skip
            api_button.click(handlers.similarity, [api_image, api_row, api_col], api_picture, api_name="similarity", **encoder, **raw)  # fmt: skip
            if has_text_tower:
                api_button.click(handlers.zero_shot, [api_image, labels], scores, api_name="zero_shot", **encoder, **raw)  # fmt: skip

    blocks.queue(default_concurrency_limit=2, max_size=QUEUE_SIZE)
    return blocks


# -- serving -----------------------------------------------------------------------------------------------------


def port_number(value: int, name: str) -> int:
    """A TCP port to serve on, 0-65535 (0: one the OS picks; a `vlm.checks` checker). Checked before the model
    loads: Gradio would only refuse it once the model is loaded."""
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 65535:
        raise InvalidValue(name, "an integer in 0-65535", value)
    return value


def check_dual_encoder(siglip_dir: str) -> None:
    """Refuse, before the VLM loads, a `--siglip` that is no SigLIP dual encoder: no such folder (or hub id), no
    config.json, or a config of another model (`vlm.weights`' errors). Only the config is read."""
    folder = resolve_checkpoint(siglip_dir)
    siglip_config_from(read_config(folder), folder)


def load_model(
    model_dir: str | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[VisionLanguageModel, ModelInfo]:
    """The model to serve and its description: a saved VLM folder (or hub id), else the project default, on
    `device` (None: the CPU) in `dtype`."""
    if model_dir is None:
        shipped = (DEFAULT_MODEL_DIR / "config.json").is_file()
        info = describe_model(DEFAULT_MODEL_DIR if shipped else None)
        return load_default_model(dtype, device=device), info
    from vlm.lm import VLM_FILES, hub_vlm
    from vlm.weights import resolve_checkpoint

    # a folder, or a hub id: a SmolVLM / LLaVA checkpoint, or a model saved by vlm
    folder = Path(model_dir).expanduser()
    if not folder.is_dir():
        folder = hub_vlm(model_dir) or resolve_checkpoint(model_dir, VLM_FILES)
    return VisionLanguageModel.from_pretrained(folder, dtype=dtype, device=device), describe_model(folder)


def launch(
    model_dir: str | None = None,
    host: str = "127.0.0.1",
    port: int = 7860,
    share: bool = False,
    siglip_dir: str | None = None,
    model: VisionLanguageModel | None = None,
    model_info: ModelInfo | None = None,
    dual_encoder: DualEncoder | None = None,
    block: bool = True,
    max_file_size: str | int = MAX_FILE_SIZE,
    max_image_pixels: int = MAX_IMAGE_PIXELS,
    device: torch.device | str | None = "auto",
    dtype: torch.dtype | str | None = "auto",
) -> tuple[gr.Blocks, str]:
    """Load the model once (unless `model` is given), build the app and serve it; returns (app, URL).

    Binds `host` (loopback unless asked otherwise) and `port`. `siglip_dir` names a SigLIP dual encoder
    (with its tokenizer) for the zero-shot box; when the model is loaded here and none is named, the shipped
    one (`vlm/default_siglip/`) if present. Models loaded here go to `device` ("auto": the GPU when one is
    visible; `vlm.devices.resolve_device`) in `dtype` ("auto": bfloat16 on a GPU that has it, else float32;
    the dual encoder stays float32); a given `model` stays where it is, and the dual encoder goes there.
    With `block=False` returns at once, the server running in a background thread (tests; stop it with
    `app.close()`)."""
    port_number(port, "port")
    if model is None:
        device = resolve_device(device)
        if siglip_dir is not None:  # named now, as a bad --model is, not after the model's slow load
            check_dual_encoder(siglip_dir)
        print(f"Loading the model ({model_dir or 'project default'}) on {device}…", flush=True)
        start = time.perf_counter()
        model, model_info = load_model(model_dir, device, resolve_dtype(dtype, device))
        print(f"Model loaded in {time.perf_counter() - start:.1f} s.", flush=True)
        if siglip_dir is None and (DEFAULT_SIGLIP_DIR / "config.json").is_file():
            siglip_dir = str(DEFAULT_SIGLIP_DIR)
    else:
        device = model.lm.device  # a given model stays where it is, and the dual encoder joins it
    if siglip_dir is not None:
        dual_encoder = load_dual_encoder(siglip_dir, device=device)
    handlers = Handlers(model, dual_encoder, max_image_pixels)
    app = build_app(handlers, model_info)
    _, url, share_url = app.launch(
        server_name=host,
        server_port=port,
        share=share,
        max_file_size=max_file_size,
        max_threads=handlers.generator.max_batch_size + 8,  # a thread per running answer, and a few to spare
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
            handlers.close()
    return app, url


def main(argv: list[str] | None = None) -> int:
    """`python demo/app.py`, `vlm demo` (an entry point: `vlm.commands` in pyproject.toml) and `make demo`."""
    # One line for a bad flag, as every `vlm` command (`CommandParser`), and before anything loads.
    parser = CommandParser(
        prog="vlm demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="a saved VLM folder or hub id (default: the project's default model)")
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to bind; 0.0.0.0 exposes it to the network"
    )
    parser.add_argument("--port", type=checked(port_number, int), default=7860, help="0-65535")
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    parser.add_argument(
        "--siglip",
        help="a SigLIP dual encoder folder (with its tokenizer) for zero-shot labels (default: the shipped one)",
    )
    # Given only when set: `launch`'s own defaults ("auto") are the demo's.
    parser.add_argument(
        "--device",
        default=argparse.SUPPRESS,
        help="auto (the default: cuda when a GPU is visible, else mps, else cpu), cpu, cuda, cuda:N or mps",
    )
    parser.add_argument(
        "--dtype",
        choices=["auto", *DTYPES],
        default=argparse.SUPPRESS,
        help="auto (the default): bfloat16 on a CUDA GPU that has it, else float32",
    )
    args = parser.parse_args(argv)
    chosen = {name: getattr(args, name) for name in ("device", "dtype") if name in args}
    # Bad input is one line, as `vlm demo` prints it (`vlm.cli.main`) for `python demo/app.py` too: a device this
    # machine lacks before anything loads, a missing --model or --siglip before the model loads.
    try:
        if "device" in chosen:
            chosen["device"] = resolve_device(chosen["device"], "--device")
        launch(args.model, host=args.host, port=args.port, share=args.share, siglip_dir=args.siglip, **chosen)
    except (ValueError, OSError) as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
