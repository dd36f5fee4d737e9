"""The `vlm` command. Thin: parse the arguments, call the library, print.

vlm embed IMAGES_OR_DIRS --model NAME_OR_DIR --out embeddings.safetensors [--patches]
vlm viz --out DIR [--model NAME_OR_DIR] [--image PATH]
vlm demo

Each command that runs a model takes --device: auto (the default) runs it on the GPU when one is visible,
in bfloat16 where the GPU has it (--dtype auto); on a machine without one, on the CPU in float32.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import torch

from vlm.checks import (
    InvalidValue,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    probability,
    share,
    shorten,
    utf8_text,
)
from vlm.devices import DTYPES, resolve_device, resolve_dtype

if TYPE_CHECKING:
    from vlm.model import Chat

REPO = Path(__file__).resolve().parents[1]
SAMPLE_IMAGE = REPO / "demo" / "examples" / "chelsea.jpg"
DEVICE_HELP = "auto (the default: cuda when a GPU is visible, else mps, else cpu), cpu, cuda, cuda:N or mps"
DTYPE_HELP = "auto (the default): bfloat16 on a CUDA GPU that has it, else float32"
QUANTIZE = ["4bit", "8bit", "none"]
QUANTIZE_HELP = (
    "load the LM through bitsandbytes (on the GPU when one is visible, so --device auto or cuda); none: full "
    "precision. Default: as the saved model records (config.json quantization: a QLoRA model's LM in 4-bit)"
)


class CommandParser(argparse.ArgumentParser):
    """A command's parser: bad input is one line, `vlm ask: error: ...`, and exit status 2 (the usage block
    argparse would print first is left to `vlm ask --help`)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def checked(check: Callable[[Any, str], Any], parse: Callable[[str], Any] = str) -> Callable[[str], Any]:
    """An argparse `type=` from one of the library's checkers (`vlm.checks`): the flag obeys the rule the
    library applies, and a bad value is refused while parsing, before any model loads."""

    def convert(text: str) -> Any:
        try:
            value = parse(text)
        except ValueError:
            expected = {int: "an integer", float: "a number"}.get(parse, "a value")
            raise argparse.ArgumentTypeError(f"expected {expected}, got {shorten(text)}") from None
        try:
            return check(value, "value")
        except InvalidValue as err:
            raise argparse.ArgumentTypeError(f"must be {err.rule}, got {shorten(text)}") from None

    convert.__name__ = check.__name__  # argparse names the type by it in its own messages
    return convert


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="vlm", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True, parser_class=CommandParser)

    embed = commands.add_parser("embed", help="embed image files with a SigLIP vision encoder")
    embed.add_argument("inputs", nargs="+", help="image files and/or folders (searched recursively)")
    embed.add_argument("--model", required=True, help="SigLIP checkpoint: hub id or local folder")
    embed.add_argument("--out", default="embeddings.safetensors", help="output safetensors file")
    embed.add_argument(
        "--patches", action="store_true", help="patch embeddings (B, N, D) instead of pooled (B, D)"
    )
    embed.add_argument("--batch-size", type=checked(positive_int, int), default=32)
    embed.add_argument("--dtype", choices=["auto", *DTYPES], default="auto", help=DTYPE_HELP)
    embed.add_argument("--device", default="auto", help=DEVICE_HELP)

    viz = commands.add_parser("viz", help="PNGs of patch filters, position similarity and attention")
    viz.add_argument("--out", default="out/viz", help="folder for the PNGs")
    viz.add_argument("--model", help="also draw this checkpoint (hub id or folder) beside a random-init one")
    viz.add_argument(
        "--image", default=None, help=f"image for the attention map (default: {SAMPLE_IMAGE.name})"
    )
    viz.add_argument("--device", default="auto", help=DEVICE_HELP + " (the towers run in float32)")

    ask = commands.add_parser("ask", help="ask one question about images; the answer streams to the terminal")
    ask.add_argument("question", type=checked(utf8_text))
    chat = commands.add_parser("chat", help="an interactive multi-turn chat (/image PATH, /reset, /quit)")
    for sub in (ask, chat):
        sub.add_argument("--image", action="append", default=[], help="an image (repeat for several)")
        sub.add_argument(
            "--model",
            help="a saved VLM folder, or a SmolVLM / Idefics3 / LLaVA (SigLIP) checkpoint: folder or hub id "
            "(default: the project's default model)",
        )
        sub.add_argument("--dtype", choices=["auto", *DTYPES], default="auto", help=DTYPE_HELP)
        sub.add_argument("--device", default="auto", help=DEVICE_HELP)
        sub.add_argument("--quantize", choices=QUANTIZE, help=QUANTIZE_HELP)
        # The rules of VisionLanguageModel.generation_kwargs, applied here before the model loads.
        sub.add_argument("--max-new-tokens", type=checked(positive_int, int), default=256)
        sub.add_argument(
            "--temperature", type=checked(non_negative_float, float), default=0.0, help="0 = greedy"
        )
        sub.add_argument("--top-p", type=checked(probability, float), default=1.0, help="in (0, 1]")
        sub.add_argument("--top-k", type=checked(non_negative_int, int), default=0, help="0 = off")
        sub.add_argument("--repetition-penalty", type=checked(positive_float, float), default=1.0)

    evaluate = commands.add_parser(
        "eval", help="VQA accuracy, caption BLEU-4/CIDEr or chat answers, by greedy generation"
    )
    evaluate.add_argument(
        "model", nargs="?", help="a saved VLM folder (default: the project's default model)"
    )
    evaluate.add_argument(
        "--task", choices=["vqa", "caption", "chat"], default="vqa", help="the data's kind (default: vqa)"
    )
    evaluate.add_argument(
        "--data",
        default="easy-vqa",
        help="as a config's data.name: easy-vqa or another packaged source, a .jsonl/.json/.parquet/.csv "
        "file, a folder, or a hub id (default: easy-vqa, all 9,673 test questions unless --limit)",
    )
    evaluate.add_argument("--subset", help="the hub dataset's configuration")
    evaluate.add_argument(
        "--split",
        default="test",
        help="default: test (a local file takes any split name); sliced like datasets' splits: 'train[:5%%]'",
    )
    evaluate.add_argument(
        "--column",
        action="append",
        default=[],
        metavar="FIELD=COLUMN",
        help="the dataset's column for one of our fields (e.g. question=q); repeatable",
    )
    evaluate.add_argument(
        "--image-root", help="relative image paths start here (default: the data file's folder)"
    )
    evaluate.add_argument("--streaming", action="store_true", help="read the rows in order (needs --limit)")
    evaluate.add_argument(
        "--limit",
        type=checked(positive_int, int),
        help="a fixed random sample of this many rows (streamed: the first rows)",
    )
    evaluate.add_argument(
        "--capitalise",
        type=checked(share, float),
        default=0.0,
        metavar="SHARE",
        help="start this share of the questions with a capital letter, as people type them (easy-VQA's are all "
        "lower case); the same rows each run",
    )
    evaluate.add_argument("--batch-size", type=checked(positive_int, int), default=64)
    evaluate.add_argument("--out", help="write one JSON line per prediction here")
    evaluate.add_argument("--bf16", action="store_true", help="bf16 autocast for an fp32 model")
    evaluate.add_argument("--dtype", choices=["auto", *DTYPES], default="auto", help=DTYPE_HELP)
    evaluate.add_argument("--device", default="auto", help=DEVICE_HELP)
    evaluate.add_argument("--quantize", choices=QUANTIZE, help=QUANTIZE_HELP)
    evaluate.add_argument(
        "--suite",
        choices=["skills"],
        help="instead of --data: every skill's own test set (easy-VQA, each scene skill, Sort-of-CLEVR, "
        "captions), --limit questions each (default 200), printed as a markdown table",
    )
    evaluate.add_argument(
        "--summary", help="with --suite: write the table as JSON here (a model card's eval.json)"
    )

    # No --device: merging adds B @ A to each weight once and writes files, so the CPU does it in seconds and
    # in float32, and the merged files are the same wherever they are made.
    merge = commands.add_parser(
        "merge",
        help="fold a model's LoRA adapter into a standalone model folder (on the CPU, in float32)",
        description="Fold a model's LoRA adapter into a standalone model folder. It runs on the CPU, in "
        "float32: merging adds one low-rank product to each adapted weight and writes files, which takes "
        "seconds, and the merged files are the same wherever they are made (so there is no --device).",
    )
    merge.add_argument("model", help="a saved VLM folder with an adapter/ subfolder")
    merge.add_argument("out", help="the new folder (VLM files + the merged LM in lm/)")

    zeroshot = commands.add_parser("zeroshot", help="SigLIP zero-shot: sigmoid probability of each label")
    zeroshot.add_argument("image")
    zeroshot.add_argument(
        "--labels", required=True, type=checked(utf8_text), help='comma-separated, e.g. "a cat,a dog"'
    )
    zeroshot.add_argument(
        "--model", help="a SigLIP dual encoder folder with its tokenizer (default: the shipped one)"
    )
    zeroshot.add_argument(
        "--template",
        action="append",
        type=checked(utf8_text),
        help='prompt template with {} for the label, repeatable (embeddings averaged); default "a photo of {}."',
    )
    zeroshot.add_argument("--device", default="auto", help=DEVICE_HELP + " (the model runs in float32)")

    # The demo lives outside the library (demo/) and parses its own flags: `vlm demo --help` shows them.
    commands.add_parser(
        "demo", help="the Gradio demo: chat with images, see what the encoder sees", add_help=False
    )

    try:
        args, rest = parser.parse_known_args(argv)
        if rest and args.command != "demo":
            commands.choices[args.command].error(f"unrecognized arguments: {' '.join(rest)}")
    except SystemExit as done:  # argparse printed the help, or one line about bad input
        return done.code if isinstance(done.code, int) else 2
    args.rest = rest  # the demo's own flags
    try:
        if hasattr(args, "device"):  # a device this machine lacks is refused here, before anything loads
            args.device = resolve_device(args.device, "--device")
        if hasattr(args, "dtype"):  # a torch dtype from here on ("auto" follows the device)
            args.dtype = resolve_dtype(args.dtype, args.device)
        handler = {
            "embed": _embed, "viz": _viz, "ask": _ask, "chat": _chat, "eval": _eval, "merge": _merge, "zeroshot": _zeroshot,
            "demo": _demo,
        }[args.command]  # fmt: skip
        return handler(args)
    except (ValueError, OSError) as err:
        # The library's errors for bad input are ValueErrors with a full message (CheckpointError,
        # ImageLoadError, ContextTooLong, InvalidValue, UnicodeError); OSError is the file system's word.
        print(f"vlm {args.command}: error: {err or type(err).__name__}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: stop quietly, as a shell command does
        print(file=sys.stderr)
        return 130


def _embed(args: argparse.Namespace) -> int:
    from vlm.embeddings import embed_files, save_embeddings
    from vlm.processing import iter_image_files
    from vlm.weights import check_output_file, load_vision_encoder

    files = iter_image_files(args.inputs)  # listed once: to keep --out off them, then to embed them
    check_output_file(args.out, "--out", apart_from=files)
    encoder = load_vision_encoder(args.model, dtype=args.dtype, device=args.device)
    result = embed_files(encoder, files, pooled=not args.patches, batch_size=args.batch_size)
    for file, why in result.failures:
        print(f"skipped {file}: {why}", file=sys.stderr)
    if not result.files:
        print("vlm embed: error: no readable image among the inputs", file=sys.stderr)
        return 1
    save_embeddings(result, args.out, model=str(args.model))
    print(
        f"wrote {tuple(result.vectors.shape)} embeddings of {len(result.files)} images to {args.out}"
        + (f" ({len(result.failures)} skipped)" if result.failures else "")
    )
    return 0


def _viz(args: argparse.Namespace) -> int:
    from vlm.processing import load_image
    from vlm.siglip import SiglipVisionConfig, SiglipVisionEncoder
    from vlm.viz import write_visualisations
    from vlm.weights import check_output_folder, load_vision_encoder

    check_output_folder(args.out, "--out")
    image = load_image(args.image or SAMPLE_IMAGE)
    trained = load_vision_encoder(args.model, device=args.device) if args.model else None
    # The seed's contrast: the same architecture before training (random init) and after (the checkpoint).
    config = trained.config if trained else SiglipVisionConfig()
    random_init = SiglipVisionEncoder(config).to(args.device).eval()
    paths = write_visualisations(random_init, args.out, image=image, prefix="random_init_")
    if trained is not None:
        paths += write_visualisations(trained, args.out, image=image, prefix="pretrained_")
    for path in paths:
        print(f"wrote {path}")
    return 0


def _load_vlm(args: argparse.Namespace):
    from vlm.lm import AS_SAVED
    from vlm.model import VisionLanguageModel, load_default_model

    if args.quantize in ("4bit", "8bit") and torch.cuda.is_available() and args.device.type != "cuda":
        # bitsandbytes puts a quantized LM on the GPU whenever one is visible: refused before it loads.
        raise ValueError(
            f"--quantize loads the LM on the GPU when one is visible, so it cannot run on {args.device}: "
            "use --device auto (or cuda), or leave out --quantize"
        )
    # No --quantize: the LM as the saved model records (from_pretrained's default); "none": full precision.
    quantization = {None: AS_SAVED, "none": None}.get(args.quantize, args.quantize)
    kwargs = dict(dtype=args.dtype, device=args.device)
    if args.model is None:  # load_default_model takes no AS_SAVED; the shipped model records no quantization
        return load_default_model(**kwargs, quantization=None if quantization is AS_SAVED else quantization)
    # a folder, or a hub id of a model saved by vlm or of a SmolVLM / LLaVA checkpoint
    return VisionLanguageModel.from_pretrained(args.model, quantization=quantization, **kwargs)


def _settings(args: argparse.Namespace) -> dict:
    return dict(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        repetition_penalty=args.repetition_penalty,
    )


def _ask(args: argparse.Namespace) -> int:
    from vlm.processing import load_image

    # An unreadable image is refused before the model loads, and each image is decoded once.
    images = [load_image(path) for path in args.image]
    if not args.question.strip() and not images:
        raise ValueError("the question is empty: ask something, or give an image (--image)")
    model = _load_vlm(args)
    # A question that does not fit the LM's context raises ContextTooLong before any generation.
    for piece in model.stream(images, args.question, **_settings(args)):
        print(piece, end="", flush=True)
    print()
    return 0


def _tolerate_bad_bytes() -> None:
    """Decode stdin keeping undecodable bytes as lone surrogates (each such line is then refused with a
    message) instead of raising UnicodeDecodeError, which would end the chat and lose the conversation. Set
    before the first read: a text stream cannot change its decoding after it."""
    reconfigure = getattr(sys.stdin, "reconfigure", None)  # absent on a replaced stdin (tests, embedding)
    if reconfigure is not None:
        reconfigure(errors="surrogateescape")


def _chat(args: argparse.Namespace) -> int:
    from vlm.model import Chat
    from vlm.processing import load_image

    pending = [load_image(path) for path in args.image]
    chat = Chat(_load_vlm(args))
    print("Chat with the model. /image PATH adds an image to your next message; /reset; /quit.")
    _tolerate_bad_bytes()
    while True:
        try:
            line = input("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        # Bad input in a line is reported and the chat goes on, its conversation kept.
        if line in ("/quit", "/exit"):
            return 0
        if line == "/reset":
            chat.reset()
            continue
        command = line.split(maxsplit=1)[0] if line.startswith("/") else ""
        if command == "/image":
            path = line.removeprefix("/image").strip()
            try:
                if not path:
                    raise ValueError("/image needs the image's path: /image PATH")
                pending.append(load_image(path))
                print(f"(image {path} goes with your next message)")
            except ValueError as err:  # ImageLoadError: named now, not after the next question
                print(f"(error: {err})")
            continue
        if command[1:].isalpha():  # "/help", "/imgae": a mistyped command, never sent to the model
            print(f"(error: no command {command}: /image PATH, /reset, /quit; start with // to send a /)")
            continue
        line = line.removeprefix("/") if line.startswith("//") else line  # "//x": the message "/x"
        try:
            utf8_text(line, "your message")  # a file name may hold any bytes; a message goes to the tokenizer
        except ValueError as err:
            print(f"(error: {err})")
            continue
        if not line and not pending:
            continue
        _answer(chat, line, pending, _settings(args))
        pending = []


def _answer(chat: Chat, line: str, images: list[Any], settings: dict[str, Any]) -> None:
    """Stream one chat answer; an error or Ctrl-C ends this answer only, never the chat."""
    dropped = chat.dropped
    print("vlm> ", end="", flush=True)
    pieces = chat.send(line, images, **settings)
    try:
        for piece in pieces:
            print(piece, end="", flush=True)
        print()
    except ValueError as err:  # the message does not fit the context, or an image fails late
        print(f"\n(error: {err})")
        return
    except KeyboardInterrupt:
        pieces.close()  # stops the generation; the unfinished exchange is not kept
        print("\n(stopped)")
        return
    if chat.dropped > dropped:  # the context was full: the oldest exchanges left it
        n = chat.dropped - dropped
        print(f"(the oldest {n} exchange{'s' if n > 1 else ''} no longer fit the context and were dropped)")


def _eval(args: argparse.Namespace) -> int:
    from vlm.data.common import SourceUnavailable
    from vlm.data.named import DataError, DataSpec, open_data
    from vlm.evaluate import EVALUATORS
    from vlm.weights import check_output_file

    if args.suite is not None:
        return _eval_suite(args)
    if args.summary is not None:
        print("vlm eval: error: --summary goes with --suite", file=sys.stderr)
        return 2
    if args.out is not None:  # predictions written over the --data file would replace the data
        check_output_file(args.out, "--out", apart_from=[args.data])
    columns = dict(item.partition("=")[::2] for item in args.column)
    if bad := [item for item in args.column if "=" not in item or not all(item.partition("=")[::2])]:
        print(f"vlm eval: error: --column {bad[0]!r}: expected FIELD=COLUMN", file=sys.stderr)
        return 2
    try:  # the data is checked before the model loads
        spec = DataSpec(
            args.task,
            args.data,
            args.subset,
            args.split,
            columns,
            args.limit,
            args.streaming,
            args.image_root,
            capitalise=args.capitalise,
        )
        rows = open_data(spec).eval_rows()
    except (DataError, SourceUnavailable) as err:
        print(f"vlm eval: error: {err}", file=sys.stderr)
        return 2
    model = _load_vlm(args)
    run = EVALUATORS[args.task]
    result = run(model, rows, batch_size=args.batch_size, predictions_path=args.out, bf16=args.bf16)
    print(result.report())
    return 0


def _eval_suite(args: argparse.Namespace) -> int:
    from vlm.data.common import SourceUnavailable
    from vlm.data.named import DataError
    from vlm.skills import evaluate_skills, skill_table, skill_test_sets, skills_summary
    from vlm.weights import atomic_file, check_output_file

    # The suite names its own test sets: an option that picks data would be silently ignored.
    picked = [name for name, value, default in (
        ("--data", args.data, "easy-vqa"), ("--task", args.task, "vqa"), ("--split", args.split, "test"),
        ("--subset", args.subset, None), ("--column", args.column, []), ("--image-root", args.image_root, None),
        ("--streaming", args.streaming, False), ("--out", args.out, None), ("--capitalise", args.capitalise, 0.0),
    ) if value != default]  # fmt: skip
    if picked:
        print(f"vlm eval: error: --suite runs its own test sets; drop {', '.join(picked)}", file=sys.stderr)
        return 2
    if args.summary is not None:
        check_output_file(args.summary, "--summary")
    limit = args.limit or 200
    try:  # the test sets are opened before the model loads
        sets = skill_test_sets(limit)
    except (DataError, SourceUnavailable) as err:
        print(f"vlm eval: error: {err}", file=sys.stderr)
        return 2
    model = _load_vlm(args)
    scores = evaluate_skills(model, sets, batch_size=args.batch_size, bf16=args.bf16)
    print(skill_table(scores))
    if args.summary is not None:
        command = " ".join(
            ["vlm eval", *([args.model] if args.model else []), f"--suite skills --limit {limit}"]
        )
        with atomic_file(args.summary) as tmp:
            tmp.write_text(json.dumps(skills_summary(scores, command), indent=2) + "\n")
        print(f"wrote {args.summary}")
    return 0


def _merge(args: argparse.Namespace) -> int:
    from vlm.lora import lora_modules, save_merged
    from vlm.model import VisionLanguageModel
    from vlm.weights import check_output_folder

    # Before the model loads: merged files written into (or around) the model folder would sit beside its
    # adapter/, which loading would then apply a second time.
    check_output_folder(args.out, "the merged model's folder", empty=True, apart_from=args.model)
    model = VisionLanguageModel.from_pretrained(args.model)
    if not lora_modules(model):
        print(f"vlm merge: error: {args.model} has no adapter/ to merge", file=sys.stderr)
        return 2
    trained = model.config.quantization  # loaded as trained (config.json); merging dequantises it
    print(f"wrote {save_merged(model, args.out)}")
    if trained is not None:
        print(
            f"merged in full precision from a model trained against its LM in {trained}: its weights "
            "dequantised plus the LoRA update (see README.md there)"
        )
    return 0


def _zeroshot(args: argparse.Namespace) -> int:
    from vlm.processing import load_image
    from vlm.zeroshot import (
        DEFAULT_TEMPLATES,
        check_templates,
        format_scores,
        load_dual_encoder,
        parse_labels,
        zero_shot,
    )

    labels = parse_labels(args.labels)
    templates = tuple(args.template or DEFAULT_TEMPLATES)
    check_templates(templates, "--template")  # zero_shot checks them too, but after the model loads
    image = load_image(args.image)
    model, tokenizer = load_dual_encoder(args.model, device=args.device)
    print(format_scores(labels, zero_shot(model, tokenizer, [image], labels, templates)[0]))
    return 0


def _demo(args: argparse.Namespace) -> int:
    # An entry point (pyproject.toml, group "vlm.commands"), so that the library never imports demo/.
    from importlib.metadata import entry_points

    found = entry_points(group="vlm.commands", name="demo")
    if not found:
        print(
            "vlm demo: error: the demo is not installed: pip install -e '.[demo]' in the repository",
            file=sys.stderr,
        )
        return 2
    try:
        demo = next(iter(found)).load()
    except ModuleNotFoundError as err:
        if err.name not in ("gradio", "gradio_client"):
            raise
        print("vlm demo: error: the demo needs gradio: pip install 'vlm[demo]'", file=sys.stderr)
        return 2
    return demo(args.rest)


if __name__ == "__main__":
    raise SystemExit(main())
