"""The `vlm` command. Thin: parse the arguments, call the library, print.

vlm embed IMAGES_OR_DIRS --model NAME_OR_DIR --out embeddings.safetensors [--patches]
vlm viz --out DIR [--model NAME_OR_DIR] [--image PATH]
vlm demo
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SAMPLE_IMAGE = REPO / "demo" / "examples" / "chelsea.jpg"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="vlm", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)

    embed = commands.add_parser("embed", help="embed image files with a SigLIP vision encoder")
    embed.add_argument("inputs", nargs="+", help="image files and/or folders (searched recursively)")
    embed.add_argument("--model", required=True, help="SigLIP checkpoint: hub id or local folder")
    embed.add_argument("--out", default="embeddings.safetensors", help="output safetensors file")
    embed.add_argument(
        "--patches", action="store_true", help="patch embeddings (B, N, D) instead of pooled (B, D)"
    )
    embed.add_argument("--batch-size", type=int, default=32)
    embed.add_argument("--dtype", choices=DTYPES, default="float32")

    viz = commands.add_parser("viz", help="PNGs of patch filters, position similarity and attention")
    viz.add_argument("--out", default="out/viz", help="folder for the PNGs")
    viz.add_argument("--model", help="also draw this checkpoint (hub id or folder) beside a random-init one")
    viz.add_argument(
        "--image", default=None, help=f"image for the attention map (default: {SAMPLE_IMAGE.name})"
    )

    commands.add_parser("demo", help="the project's main job (the Gradio demo is coming; see README)")

    args = parser.parse_args(argv)
    try:
        return {"embed": _embed, "viz": _viz, "demo": _demo}[args.command](args)
    except (ValueError, OSError) as err:  # our loaders raise ValueError subclasses with a full message
        print(f"vlm {args.command}: error: {err}", file=sys.stderr)
        return 2


def _embed(args: argparse.Namespace) -> int:
    from vlm.embeddings import embed_files, save_embeddings
    from vlm.siglip import SiglipVisionEncoder

    encoder = SiglipVisionEncoder.from_pretrained(args.model, dtype=DTYPES[args.dtype])
    result = embed_files(encoder, args.inputs, pooled=not args.patches, batch_size=args.batch_size)
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

    image = load_image(args.image or SAMPLE_IMAGE)
    trained = SiglipVisionEncoder.from_pretrained(args.model) if args.model else None
    # The seed's contrast: the same architecture before training (random init) and after (the checkpoint).
    random_init = SiglipVisionEncoder(trained.config if trained else SiglipVisionConfig()).eval()
    paths = write_visualisations(random_init, args.out, image=image, prefix="random_init_")
    if trained is not None:
        paths += write_visualisations(trained, args.out, image=image, prefix="pretrained_")
    for path in paths:
        print(f"wrote {path}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from vlm.processing import load_image
    from vlm.siglip import SiglipVisionConfig, SiglipVisionEncoder

    print("The Gradio demo (chat with images) is coming; until then, `make demo` shows the vision encoder.")
    print("No pretrained SigLIP exists offline, so this is a randomly initialised base-shape tower.")
    torch.manual_seed(0)
    encoder = SiglipVisionEncoder(SiglipVisionConfig()).eval()
    image = load_image(SAMPLE_IMAGE)
    vector = encoder.embed([image])[0]
    patches = encoder.embed([image], pooled=False)[0]
    print(f"image: {SAMPLE_IMAGE.relative_to(REPO)} {image.size[0]}x{image.size[1]}")
    print(f"patch embeddings: {tuple(patches.shape)}; pooled embedding: {tuple(vector.shape)}")
    print("pooled embedding[:8] =", [round(v, 4) for v in vector[:8].tolist()], f"norm={vector.norm():.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
