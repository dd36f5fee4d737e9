"""What can a vision tower learn to see in the generated scenes? The tower and one linear head on its
mean-pooled patch features, trained end to end on one label read from the scenes' descriptions, no LM:

    python train/probe_tower.py vlm/default_model runs/siglip_scenes/final --task shape

Tasks: `shape` (one shape on a plain ground, 8 kinds; by size), `color` (the same scenes, 10 colours),
`count` (1-8 objects, shapes and pictures, no words or chart; by number) and `word` (the written word of a
scene of the full world that has exactly one, on a sign or on its own, among its objects and perhaps a chart:
one of the 133 `scenes.WORDS`; by length). Each tower gets the same scenes, steps and seed, and the table says how many
of `--test` held-out scenes it gets right.

`--image-size 128` feeds a tower more pixels than it was trained on: the same patches, more of them (8-px
patches of a 128-px image: 256 tokens instead of 64), the learned position grid resized bicubically as SigLIP
does for other resolutions — the cheap check of whether a skill is limited by the tower's resolution.
`--eval-every N` also tests every N steps: a learning curve (held-out accuracy against samples seen; `--plot`
draws it), the measured answer to "how many samples does this skill want?".

Why: through the VLM a sample costs the LM's forward and backward (4 samples/s on 2 CPU cores), and after
hundreds of steps a scene answer may still come from the question's prior, which says nothing about the
tower. Trained alone, the tower learns ~20x more samples a second, and what it reaches says what its
resolution and pretraining let it see, before anyone spends a VLM run on it. A MODEL is a VLM folder
(`vlm/default_model`, a run's `final/`: its tower and its own image processor) or any SigLIP checkpoint
`vlm.model.load_vision_tower` reads (a dual encoder, a `SiglipVisionModel`, a hub id).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from vlm.data import scenes
from vlm.model import load_vision_tower
from vlm.siglip import SiglipVisionEncoder

TASKS = ("shape", "color", "count", "word")


def task_scenes(task: str, split: str, n: int) -> list[scenes.Scene]:
    """`n` scenes of `split` for `task`: one shape on a plain ground (shape, color), 1-8 objects (count), or
    the first `n` scenes of the full world with exactly one word (word; three scenes in ten)."""
    if task == "word":
        found: list[scenes.Scene] = []
        index = 0
        while len(found) < n:
            scene = scenes.generate(scenes.scene_seed(split, index))
            if len(scene.words) == 1:
                found.append(scene)
            index += 1
        return found
    if task == "count":
        layout, pictures = scenes.Layout((1, scenes.MAX_OBJECTS), clutter=False), True
    else:
        layout, pictures = scenes.Layout((1, 1), clutter=False), False
    return [scenes.generate(scenes.scene_seed(split, i), layout=layout, pictures=pictures) for i in range(n)]


def labels(task: str, scene: scenes.Scene) -> tuple[str, str]:
    """(the answer, the group it is reported in): an object's shape or colour by its size; a count by itself;
    a word by its length."""
    if task == "word":
        text = scene.words[0].text
        return text, f"{len(text)} letters"
    if task == "count":
        return str(len(scene.objects)), str(len(scene.objects))
    thing = scene.objects[0]
    return (thing.name if task == "shape" else str(thing.color)), thing.size


def _group_order(group: str) -> tuple[int, int]:
    """Sizes small to large, counts 1 to 8, words short to long."""
    return (0, list(scenes.SIZES).index(group)) if group in scenes.SIZES else (1, int(group.split()[0]))


def probe(
    encoder: SiglipVisionEncoder,
    pixels: torch.Tensor,
    targets: torch.Tensor,
    n_train: int,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    frozen: bool = False,
    eval_every: int = 0,
) -> dict[int, torch.Tensor]:
    """Train `encoder` (unless `frozen`) and a linear head on `pixels[:n_train]`; the held-out rows'
    predicted classes after the last step, and after every `eval_every` steps before it, by step. Pixels of
    another size than the tower's are read with its position grid resized."""
    resized = pixels.shape[-1] != encoder.config.image_size
    torch.manual_seed(seed)
    head = torch.nn.Linear(encoder.config.hidden_size, int(targets.max()) + 1)
    encoder.requires_grad_(not frozen)
    params = [*(() if frozen else encoder.parameters()), *head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    rng = random.Random(seed)

    def pooled(x: torch.Tensor) -> torch.Tensor:
        return encoder(x, interpolate_pos_encoding=resized).last_hidden_state.mean(1)

    if frozen:  # the features never change: each image's once, then a step is the head's alone
        encoder.eval()
        with torch.no_grad():
            inputs, features = torch.cat([pooled(x) for x in pixels.split(256)]), torch.nn.Identity()
    else:
        encoder.train()
        inputs, features = pixels, pooled

    def predicted() -> torch.Tensor:
        encoder.eval()
        with torch.no_grad():
            classes = torch.cat([head(features(x)).argmax(1) for x in inputs[n_train:].split(256)])
        encoder.train(not frozen)
        return classes

    curve = {}
    for step in tqdm(range(1, steps + 1), desc="probe", leave=False):
        rows = torch.tensor(rng.sample(range(n_train), min(batch_size, n_train)))
        logits = head(features(inputs[rows]))
        loss = torch.nn.functional.cross_entropy(logits, targets[rows])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step == steps or (eval_every and step % eval_every == 0):
            curve[step] = predicted()
    encoder.eval()
    return curve


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", help="VLM folders or SigLIP checkpoints")
    parser.add_argument("--task", choices=TASKS, default="shape")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--train", type=int, default=4000, help="training scenes")
    parser.add_argument("--test", type=int, default=800, help="held-out test scenes")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--frozen",
        action="store_true",
        help="train only the head (a linear probe of the tower as it is); a head alone wants a larger --lr, e.g. "
        "1e-2 (shapes of the shipped tower, 1,000 steps: 43%% at 1e-2, 37.5%% at the default 3e-4)",
    )
    parser.add_argument(
        "--image-size",
        type=int,
        help="feed each tower images of this many pixels a side (default: its own size; see above)",
    )
    parser.add_argument(
        "--eval-every",
        type=int,
        default=0,
        help="also test every N steps: the learning curve, held-out accuracy against samples seen (in the table, "
        "the JSON and --plot; each test of --test scenes is counted in samples/s)",
    )
    parser.add_argument("--out", help="also write the results here as JSON")
    parser.add_argument("--plot", help="also draw the learning curve(s) into this PNG")
    args = parser.parse_args(argv)
    if args.eval_every < 0:
        parser.error("--eval-every must be >= 0 (0: test after the last step only)")
    for flag in ("steps", "batch_size", "train", "test", "image_size"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1")

    batch = min(args.batch_size, args.train)
    drawn = task_scenes(args.task, "train", args.train) + task_scenes(args.task, "test", args.test)
    answers, groups = zip(*(labels(args.task, s) for s in drawn), strict=True)
    classes = sorted(set(answers))
    targets = torch.tensor([classes.index(a) for a in answers])
    images = [scenes.render(s) for s in drawn]
    print(f"{args.task}: {args.train} training and {args.test} test scenes, {len(classes)} classes")
    results = []
    for name in args.models:
        encoder, processor = load_vision_tower(name)
        if args.image_size is not None:
            if args.image_size % encoder.config.patch_size:
                parser.error(
                    f"--image-size must be a multiple of {name}'s patch, {encoder.config.patch_size} px"
                )
            processor = dataclasses.replace(processor, image_size=args.image_size)
        pixels = torch.cat([processor(images[i : i + 256]) for i in range(0, len(images), 256)])
        if len(pixels) != len(images):
            parser.error(f"{name} reads an image as several tiles; the probe needs one tile per image")
        start = time.perf_counter()
        curve = probe(
            encoder,
            pixels,
            targets,
            args.train,
            args.steps,
            args.batch_size,
            args.lr,
            args.seed,
            args.frozen,
            args.eval_every,
        )
        seconds = time.perf_counter() - start
        held_out = targets[args.train :]
        right = curve[args.steps] == held_out
        test_groups = groups[args.train :]
        by_group = {
            g: right[torch.tensor([x == g for x in test_groups])].float().mean().item()
            for g in sorted(set(test_groups), key=_group_order)
        }
        results.append(
            {
                "model": name,
                "image_size": args.image_size or encoder.config.image_size,
                "patch_size": encoder.config.patch_size,
                "frozen": args.frozen,
                "accuracy": right.float().mean().item(),
                "by_group": by_group,
                "seconds": seconds,
                "samples_per_s": args.steps * batch / seconds,
                "curve": [
                    {"step": step, "samples": step * batch, "accuracy": (p == held_out).float().mean().item()}
                    for step, p in curve.items()
                ],
            }
        )
    groups_seen = list(results[0]["by_group"])
    print(f"\n| model | input | {args.task} | " + " | ".join(groups_seen) + " | samples/s |")
    print("|---|---|---|" + "---|" * len(groups_seen) + "---|")
    for r in results:
        cells = " | ".join(f"{100 * r['by_group'][g]:.1f}%" for g in groups_seen)
        size = f"{r['image_size']} px / {r['patch_size']}"
        name = f"{r['model']} (frozen)" if r["frozen"] else r["model"]
        print(f"| {name} | {size} | {100 * r['accuracy']:.1f}% | {cells} | {r['samples_per_s']:.0f} |")
    if args.eval_every:
        seen = " | ".join(f"{p['samples']:,}" for p in results[0]["curve"])
        print(f"\n| model: {args.task} after N samples | {seen} |")
        print("|---|" + "---|" * len(results[0]["curve"]))
        for r in results:
            print(f"| {r['model']} | " + " | ".join(f"{100 * p['accuracy']:.1f}%" for p in r["curve"]) + " |")
    if args.out:
        Path(args.out).write_text(json.dumps({"task": args.task, **vars(args), "results": results}, indent=2))
    if args.plot:
        plot_curves(results, args.task, len(classes), args.plot)
    return 0


def plot_curves(results: list[dict], task: str, n_classes: int, path: str) -> None:
    """Held-out accuracy against samples seen, a line per tower, samples on a log axis (a skill's accuracy
    grows roughly with the logarithm of its samples), chance as a dotted line."""
    import matplotlib

    matplotlib.use("Agg")  # a file, never a window
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for r in results:
        points = r["curve"]
        name = f"{r['model']} (frozen)" if r["frozen"] else r["model"]
        axis.plot(
            [p["samples"] for p in points], [100 * p["accuracy"] for p in points], marker="o", label=name
        )
    axis.axhline(100 / n_classes, linestyle=":", color="grey", label="chance")
    axis.set(
        xscale="log", xlabel="training samples seen", ylabel=f"held-out {task} accuracy (%)", ylim=(0, 100)
    )
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


if __name__ == "__main__":
    sys.exit(main())
