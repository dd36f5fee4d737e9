"""Run the Gradio demo, the same as `vlm demo` and `make demo`:

    python demo/app.py [--model DIR_OR_ID] [--host 127.0.0.1] [--port 7860] [--share] [--siglip DIR]

A thin script over `vlm.app`: it loads the model once, prints the URL and serves until Ctrl-C.
"""

from __future__ import annotations

import argparse

from vlm.app import launch


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="a saved VLM folder or hub id (default: the project's default model)")
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to bind; 0.0.0.0 exposes it to the network"
    )
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    parser.add_argument(
        "--siglip",
        help="a SigLIP dual encoder folder (with its tokenizer) for zero-shot labels (default: the shipped one)",
    )
    args = parser.parse_args()
    launch(args.model, host=args.host, port=args.port, share=args.share, siglip_dir=args.siglip)


if __name__ == "__main__":
    main()
