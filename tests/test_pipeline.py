"""Fine-tuning's input pipeline (vlm.pipeline): a step's batches equal, bit for bit, what `model.prepare` makes of
the same rows (first epoch and cached later ones, in this process and from DataLoader workers), bad rows are
dropped and reported with their step, and the forward pass with the CPU-computed learned and image positions
equals the one that finds them itself."""

from __future__ import annotations

import json
import os

import pytest
import torch
from PIL import Image

from vlm import pipeline
from vlm.data.named import DataSpec, open_data
from vlm.model import Batch, VisionLanguageModel, pack_rows
from vlm.pipeline import PixelCache, StepBatches, default_workers, image_digest, prepare_ahead, step_loader
from vlm.training import Stream


@pytest.fixture(scope="module")
def model(parts) -> VisionLanguageModel:
    from tiny import build

    return build(parts)


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> list:
    """Captions (several a row: a prompt and a caption drawn per visit) with an unreadable image, and VQA rows."""
    root = tmp_path_factory.mktemp("rows")
    colours = {"red": (200, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 200)}
    for name, rgb in colours.items():
        Image.new("RGB", (20, 12), rgb).save(root / f"{name}.png")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    captions = [{"image": f"{n}.png", "text": [f"a {n} box", f"{n}"]} for n in colours]
    captions.append({"image": "broken.png", "text": "nothing"})
    (root / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in captions))
    vqa = [{"image": f"{n}.png", "question": f"Is it {m}?", "answers": ["yes" if n == m else "no"]}
           for n in colours for m in colours]  # fmt: skip
    (root / "vqa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in vqa))
    return [
        open_data(DataSpec("caption", str(root / "captions.jsonl"))),
        open_data(DataSpec("vqa", str(root / "vqa.jsonl"))),
    ]


def builder(model: VisionLanguageModel, sources: list, max_length: int = 512, **options) -> StepBatches:
    stream = Stream([len(s) for s in sources], [2.0, 1.0], seed=3)
    return StepBatches(
        sources, stream, model.preparer, batch_size=3, grad_accum=2, max_length=max_length, seed=3, **options
    )


def assert_same(a: Batch, b: Batch) -> None:
    for key, value in vars(a).items():
        other = getattr(b, key)
        assert (value is None) == (other is None), key
        if value is not None:
            assert value.dtype == other.dtype and torch.equal(value, other), key


def test_a_steps_batches_equal_prepare_of_its_rows_in_every_epoch(model, sources) -> None:
    batches = builder(model, sources)
    steps = 2 * batches.stream.epoch_len // 6 + 1  # two epochs and a bit: every text and image seen again
    bad = {}
    for step in range(steps):
        item = batches[step]
        bad |= item.bad
        keys = batches.stream.step_rows(step, 3, 2)
        for rows, batch in zip(keys, item.batches, strict=True):
            good = [k for k in rows if k not in bad]
            # what the loop did before the pipeline: model.prepare of the step's usable rows
            expected = model.prepare([batches.conversation(step, k) for k in good], max_length=512)
            assert_same(batch, expected)
    assert list(bad) == [(0, 3)] and bad[(0, 3)][0] == "unreadable image"  # reported once, with its step
    assert len(batches.tokens) < steps * 6 and batches.pixels.entries  # texts and pixels were reused


def test_dataloader_workers_build_the_same_steps_in_order(model, sources) -> None:
    here = list(step_loader(builder(model, sources), 2, 7, workers=0))
    there = list(step_loader(builder(model, sources), 2, 7, workers=2))
    assert [i.step for i in there] == [2, 3, 4, 5, 6]
    # each worker finds a bad row itself (so may report it again); the run keeps one entry per row
    assert {k: v for i in here for k, v in i.bad.items()} == {k: v for i in there for k, v in i.bad.items()}
    for a, b in zip(here, there, strict=True):
        for x, y in zip(a.batches, b.batches, strict=True):
            assert_same(x, y)


def test_no_workers_on_the_cpu_and_one_for_a_stream() -> None:
    assert default_workers(torch.device("cpu"), streamed=False) == 0
    assert default_workers(torch.device("cuda"), streamed=True) == 1
    assert default_workers(torch.device("cuda"), streamed=False) >= 0


def test_the_forward_pass_with_cpu_positions_equals_the_one_that_finds_them(model, sources) -> None:
    batch = builder(model, sources)[0].batches[0]
    assert batch.pixel_values is not None and len(batch.learned_index) == batch.num_learned > 0
    plain = model(batch.input_ids, batch.attention_mask, batch.pixel_values, batch.labels, reduction="sum")
    indexed = model(
        batch.input_ids, batch.attention_mask, batch.pixel_values, batch.labels, reduction="sum",
        image_index=batch.image_index, learned_index=batch.learned_index, learned_targets=batch.learned_targets,
    )  # fmt: skip
    assert torch.equal(plain.logits, indexed.logits) and torch.equal(plain.loss, indexed.loss)
    embeds = model.embed(batch.input_ids, batch.pixel_values)
    assert torch.equal(
        embeds, model.embed(batch.input_ids, batch.pixel_values, image_index=batch.image_index)
    )
    with pytest.raises(ValueError, match="48 image tokens, but 16 image embeddings"):
        model.embed(batch.input_ids, batch.pixel_values[:1], image_index=batch.image_index)


def test_next_fit_packing_keeps_the_order() -> None:
    assert pack_rows([5, 3, 4, 2, 6, 1], 8) == [[0, 1], [2, 3], [4, 5]]
    assert pack_rows([8, 8], 8) == [[0], [1]]
    with pytest.raises(ValueError, match="9 tokens does not fit a packed row of 8"):
        pack_rows([3, 9], 8)


def test_packed_rows_learn_what_padded_rows_learn(model, sources) -> None:
    """Each step's conversations packed into rows (several to a row, a block-diagonal mask) give the padded
    batch's learned tokens, loss and gradients: no conversation sees another, and fewer positions are run."""
    lengths = [int(n) for item in (builder(model, sources)[s] for s in range(4)) for b in item.batches
               for n in b.attention_mask.sum(1)]  # fmt: skip
    width = max(lengths) + min(lengths)  # the shortest conversation fits beside the longest
    padded, packed = builder(model, sources, max_length=width), builder(model, sources, width, pack=True)
    shared = 0
    for step in range(4):
        for a, b in zip(padded[step].batches, packed[step].batches, strict=True):
            assert a.position_ids is None and b.position_ids is not None
            assert torch.equal(a.learned_targets, b.learned_targets) and torch.equal(
                a.pixel_values, b.pixel_values
            )
            if len(b.input_ids) < len(a.input_ids):  # a row holds several: without the restarts they would
                shared += 1  # see each other (one causal mask over the row), and the loss would move
                leaky = model(b.input_ids, b.attention_mask, b.pixel_values, b.labels, reduction="sum")
                assert not torch.allclose(leaky.loss, model(a.input_ids, a.attention_mask, a.pixel_values,
                                                            a.labels, reduction="sum").loss, rtol=1e-4)  # fmt: skip
            losses, grads = [], []
            for batch in (a, b):
                model.zero_grad()
                out = model(
                    batch.input_ids, batch.attention_mask, batch.pixel_values, batch.labels, reduction="sum",
                    image_index=batch.image_index, learned_index=batch.learned_index,
                    learned_targets=batch.learned_targets, position_ids=batch.position_ids,
                )  # fmt: skip
                out.loss.backward()
                losses.append(out.loss.detach())
                grads.append(torch.cat([p.grad.flatten() for p in model.projector.parameters()]))
            torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-5)
            scale = float(
                grads[0].abs().max()
            )  # float32 sums in another order: equal to ~1e-6 of the largest
            assert scale > 0
            torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-5 * scale)
    model.zero_grad()
    assert shared, "some row held more than one conversation"
    with pytest.raises(ValueError, match="give max_length"):
        builder(model, sources, max_length=None, pack=True)


@pytest.mark.gpu  # pinning needs a CUDA driver
def test_pinned_items_keep_their_values(model, sources) -> None:
    item = builder(model, sources)[0]
    for a, b in zip(item.batches, item.pin_memory().batches, strict=True):
        assert_same(a, b)


# -- prepared ahead: tokens and pixels on disk, for every builder and every later run ------------------------


def test_prepared_ahead_steps_equal_the_built_ones_and_a_later_run_computes_nothing(
    model, sources, tmp_path, monkeypatch
) -> None:
    """Two epochs of steps built from the prepared files equal those built from the rows, bit for bit (the bad row
    reported alike), in this process and from DataLoader workers; a later `prepare_ahead` opens the files without
    tokenising or decoding anything."""
    prepare_ahead(sources, model.preparer, 512, folder=tmp_path, num_proc=1)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 4 and all(name.endswith(("-tokens.arrow", "-pixels.arrow")) for name in files)

    encoded, processed = [], []
    real_encode, real_tiles = pipeline.encode, type(model.preparer.processor).tiles
    monkeypatch.setattr(pipeline, "encode", lambda *a, **k: encoded.append(1) or real_encode(*a, **k))
    monkeypatch.setattr(
        type(model.preparer.processor),
        "tiles",
        lambda self, image: processed.append(image) or real_tiles(self, image),
    )
    later = prepare_ahead(sources, model.preparer, 512, folder=tmp_path, num_proc=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == files and not encoded and not processed
    # each caption row's every prompt with each caption (3 x 2, the broken image's 3 x 1), the VQA rows' 6 texts
    # (3 questions, answered yes or no), every readable image
    assert len(later.token_index) == 3 * 3 * 2 + 3 * 1 + 6 and len(later.pixel_index) == 3

    built, read = builder(model, sources), builder(model, sources, prepared=later)
    steps = 2 * built.stream.epoch_len // 6 + 1
    bad_built, bad_read = {}, {}
    for step in range(steps):
        a, b = built[step], read[step]
        bad_built |= a.bad
        bad_read |= b.bad
        for x, y in zip(a.batches, b.batches, strict=True):
            assert_same(x, y)
    assert bad_read == bad_built and list(bad_read) == [(0, 3)]
    from_workers = list(step_loader(builder(model, sources, prepared=later), 0, 5, workers=2))
    for a, b in zip(from_workers, list(step_loader(built, 0, 5, workers=0)), strict=True):
        for x, y in zip(a.batches, b.batches, strict=True):
            assert_same(x, y)


def test_a_builder_of_prepared_sources_tokenises_nothing(model, sources, tmp_path, monkeypatch) -> None:
    """Two epochs from the prepared files: no conversation tokenised, no image decoded but the unreadable one
    (which no file holds, so the step that meets it reports it)."""
    prepared = prepare_ahead(sources, model.preparer, 512, folder=tmp_path, num_proc=1)
    read = builder(model, sources, prepared=prepared)
    processed = []
    real_tiles = type(model.preparer.processor).tiles
    monkeypatch.setattr(pipeline, "encode", lambda *a, **k: pytest.fail("tokenised a prepared conversation"))
    monkeypatch.setattr(
        type(model.preparer.processor),
        "tiles",
        lambda self, image: processed.append(image) or real_tiles(self, image),
    )
    for step in range(2 * read.stream.epoch_len // 6 + 1):
        read[step]
    assert processed and all(str(image).endswith("broken.png") for image in processed)


def test_capitalised_rows_are_prepared_in_both_forms(model, tmp_path, monkeypatch) -> None:
    """A source with `capitalise` is prepared with each row's question as written and capitalised, so steps
    built from the files tokenise nothing, whichever form a visit draws."""
    for name in ("red", "blue"):
        Image.new("RGB", (20, 12), (200, 20, 20) if name == "red" else (20, 20, 200)).save(
            tmp_path / f"{name}.png"
        )
    vqa = [{"image": f"{n}.png", "question": f"is it {m}?", "answers": ["yes" if n == m else "no"]}
           for n in ("red", "blue") for m in ("red", "blue")]  # fmt: skip
    (tmp_path / "vqa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in vqa))
    sources = [open_data(DataSpec("vqa", str(tmp_path / "vqa.jsonl"), capitalise=0.5))]
    prepared = prepare_ahead(sources, model.preparer, 512, folder=tmp_path / "prepared", num_proc=1)
    assert len(prepared.token_index) == 2 * 4  # 4 rows, each lower and upper case
    stream = Stream([len(sources[0])], [1.0], seed=3)
    read = StepBatches(sources, stream, model.preparer, batch_size=2, grad_accum=1, max_length=512, seed=3,
                       prepared=prepared)  # fmt: skip
    built = StepBatches(sources, stream, model.preparer, batch_size=2, grad_accum=1, max_length=512, seed=3)
    monkeypatch.setattr(pipeline, "encode", lambda *a, **k: pytest.fail("tokenised a prepared conversation"))
    questions = set()
    for step in range(8):
        for key in stream.step_rows(step, 2, 1)[0]:
            questions.add(read.conversation(step, key)[0]["content"][1]["text"])
        read[step]
    assert any(q[0].isupper() for q in questions) and any(q[0].islower() for q in questions)
    monkeypatch.undo()
    for step in range(8):
        assert_same(read[step].batches[0], built[step].batches[0])


def test_a_file_changed_since_it_was_prepared_is_read_again(model, tmp_path) -> None:
    image = tmp_path / "box.png"
    Image.new("RGB", (20, 12), (200, 20, 20)).save(image)
    (tmp_path / "rows.jsonl").write_text(
        json.dumps({"image": "box.png", "question": "Colour?", "answers": ["red"]})
    )
    rows = [open_data(DataSpec("vqa", str(tmp_path / "rows.jsonl")))]
    prepared = prepare_ahead(rows, model.preparer, 512, folder=tmp_path / "prepared", num_proc=1)
    before = image_digest(str(image))
    assert prepared.pixels(before) is not None
    Image.new("RGB", (20, 12), (20, 20, 200)).save(image)
    os.utime(image, ns=(1, 1))  # a file system with coarse times could keep the old one
    assert image_digest(str(image)) != before
    fresh = PixelCache(model.preparer, 1 << 20, prepared)(str(image))
    assert torch.equal(fresh.pixels, model.preparer.processor.tiles(str(image)).pixels)
    assert not torch.equal(fresh.pixels, prepared.pixels(before).pixels)


def test_prepared_for_another_max_length_is_refused(model, sources, tmp_path) -> None:
    prepared = prepare_ahead(sources, model.preparer, 512, folder=tmp_path, num_proc=1)
    with pytest.raises(ValueError, match="prepared ahead for max_length 512, not 64: prepare again"):
        builder(model, sources, max_length=64, prepared=prepared)


def test_prepared_ahead_under_image_splitting_with_chat_rows_of_two_images(
    smollm2_folder, sources, tmp_path, monkeypatch
) -> None:
    """With image splitting a conversation's tokens depend on its images' tile grids (so the stored tokens are
    keyed by them too), and a chat row holds several images: the steps read from the prepared files still equal
    the built ones, bit for bit, and nothing is tokenised again."""
    from hf_vlms import save_tiny_vlm

    folder = save_tiny_vlm(tmp_path / "split", "smolvlm", smollm2_folder, splitting=True, seed=1)
    model = VisionLanguageModel.from_pretrained(folder)
    assert model.preparer.processor.splitting
    root = sources[0].root
    chats = [
        {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                                  {"type": "text", "text": f"Which one is {c}?"}]},
                      {"role": "assistant", "content": answer}],
         "images": [str(root / "red.png"), str(root / "blue.png")]}
        for c, answer in (("red", "the first"), ("blue", "the second"))
    ]  # fmt: skip
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chats))
    data = [*sources, open_data(DataSpec("chat", str(tmp_path / "chat.jsonl")))]
    prepared = prepare_ahead(data, model.preparer, 512, folder=tmp_path / "prepared", num_proc=1)
    grids = {prepared.pixels(image_digest(str(root / f"{c}.png"))).grid for c in ("red", "green", "blue")}
    assert grids == {model.preparer.processor.tiles(str(root / "red.png")).grid} and (0, 0) not in grids

    def steps(prepared=None) -> StepBatches:
        stream = Stream([len(s) for s in data], [2.0, 1.0, 1.0], seed=5)
        return StepBatches(
            data, stream, model.preparer, batch_size=3, max_length=512, seed=5, prepared=prepared
        )

    built = steps()
    expected = [built[step] for step in range(2 * built.stream.epoch_len // 3 + 1)]
    monkeypatch.setattr(pipeline, "encode", lambda *a, **k: pytest.fail("tokenised a prepared conversation"))
    read = steps(prepared)
    for step, item in enumerate(expected):
        got = read[step]
        assert got.bad == item.bad
        for x, y in zip(item.batches, got.batches, strict=True):
            assert_same(x, y)
    assert any(b.pixel_values is not None and len(b.pixel_values) > 2 * len(b.input_ids) for i in expected
               for b in i.batches)  # fmt: skip  # several tiles an image


def test_a_source_with_no_usable_row_prepares_to_empty_files(model, tmp_path) -> None:
    """Nothing to compute (every row unusable, or every image unreadable) still writes the files (empty), and
    opening them again finds them."""
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (tmp_path / "empty.jsonl").write_text(
        json.dumps({"image": "broken.png", "question": "", "answers": ["x"]})
    )
    (tmp_path / "broken.jsonl").write_text(
        json.dumps({"image": "broken.png", "question": "Red?", "answers": ["x"]})
    )
    rows = [open_data(DataSpec("vqa", str(tmp_path / name))) for name in ("empty.jsonl", "broken.jsonl")]
    for _ in range(2):  # built, then opened
        prepared = prepare_ahead(rows, model.preparer, 512, folder=tmp_path / "prepared", num_proc=1)
        assert len(prepared.token_index) == 1 and not prepared.pixel_index  # the broken image's question only
    assert len(list((tmp_path / "prepared").glob("*.arrow"))) == 4
