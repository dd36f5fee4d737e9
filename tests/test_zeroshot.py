"""vlm.zeroshot: sigmoid zero-shot probabilities with prompt ensembling, retrieval, and the `vlm zeroshot`
pieces, on tiny dual encoders (random, and one trained for a few steps to tell red from blue)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from vlm import zeroshot
from vlm.losses import sigmoid_loss
from vlm.siglip import SiglipVisionConfig
from vlm.siglip_model import SiglipConfig, SiglipModel
from vlm.siglip_text import SiglipTextConfig
from vlm.weights import save_siglip_model
from vlm.zeroshot import format_scores, label_embeddings, parse_labels, retrieval, tokenize, zero_shot

WORDS = ["a", "photo", "of", "red", "blue", "green", "cat", "dog", "picture", "an", "image"]
LENGTH = 8


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over `WORDS`: <pad> 0, </s> 1 appended, <unk> 2 (no training needed)."""
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )


def tiny_model(vocab_size: int, length: int = LENGTH) -> SiglipModel:
    vision = SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=8
    )  # fmt: skip
    text = SiglipTextConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=length, pad_token_id=0, bos_token_id=None, eos_token_id=1, projection_size=32,
    )  # fmt: skip
    return SiglipModel(SiglipConfig(text_config=text, vision_config=vision)).eval()


def solid(colour: tuple[int, int, int], size: int = 16) -> Image.Image:
    return Image.new("RGB", (size, size), colour)


RED, BLUE, GREEN = (230, 20, 20), (20, 40, 230), (20, 200, 40)


def test_probabilities_have_the_right_shape_and_range(tokenizer) -> None:
    model = tiny_model(len(tokenizer))
    with torch.no_grad():  # a visible bias, so probabilities are not all ~sigmoid(-10)
        model.logit_bias.fill_(0.0)
    probs = zero_shot(model, tokenizer, [solid(RED), solid(BLUE), solid(GREEN)], ["a cat", "a dog"])
    assert probs.shape == (3, 2) and probs.dtype == torch.float32
    assert ((probs > 0) & (probs < 1)).all()
    assert not torch.allclose(probs.sum(-1), torch.ones(3))  # sigmoid: labels judged one by one, no softmax


def test_one_template_is_the_models_own_zero_shot_and_several_are_averaged(tokenizer) -> None:
    model = tiny_model(len(tokenizer))
    images = [solid(RED), solid(BLUE)]
    labels = ["a cat", "a dog", "a red picture"]
    pixels = zeroshot.SiglipImageProcessor(16)(images)
    ids = tokenize(tokenizer, [f"a photo of {label}." for label in labels], LENGTH)
    torch.testing.assert_close(zero_shot(model, tokenizer, images, labels), model.zero_shot(pixels, ids))
    torch.testing.assert_close(zero_shot(model, tokenizer, pixels, labels), model.zero_shot(pixels, ids))

    templates = ("a photo of {}", "an image of {}")
    with torch.no_grad():
        each = [F.normalize(model.get_text_features(tokenize(tokenizer, [t.format(x) for x in labels], LENGTH)), dim=-1) for t in templates]  # fmt: skip
        classes = F.normalize((each[0] + each[1]) / 2, dim=-1)  # CLIP's prompt ensembling
        images_ = F.normalize(model.get_image_features(pixels), dim=-1)
        want = torch.sigmoid(images_ @ classes.T * model.logit_scale.exp() + model.logit_bias)
    torch.testing.assert_close(label_embeddings(model, tokenizer, labels, templates), classes)
    torch.testing.assert_close(zero_shot(model, tokenizer, images, labels, templates), want)
    with pytest.raises(ValueError, match="needs \\{\\} where the label goes"):
        zero_shot(model, tokenizer, images, labels, ("no slot",))


def test_a_model_trained_on_red_and_blue_tells_them_apart(tokenizer) -> None:
    """A known answer: a few sigmoid-loss steps on (red square, "red"), (blue square, "blue"), (green, "green")
    pairs; zero-shot and retrieval must then pick each colour's own word, for new shades of the colours."""
    torch.manual_seed(0)
    # 4 positions: the pooled last one is a pad token whose state starts nearly the same for every text
    # (the word is one of the few tokens it attends to); with fewer pads the towers separate in fewer steps
    model = tiny_model(len(tokenizer), length=4).train()
    pixels = zeroshot.SiglipImageProcessor(16)([solid(RED), solid(BLUE), solid(GREEN)])
    ids = tokenize(tokenizer, ["red", "blue", "green"], 4)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(40):
        out = model(input_ids=ids, pixel_values=pixels + 0.05 * torch.randn_like(pixels))
        loss = sigmoid_loss(out.image_embeds, out.text_embeds, model.logit_scale, model.logit_bias)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    shades = [solid((200, 40, 30)), solid((40, 20, 200)), solid((30, 170, 60))]
    probs = zero_shot(model, tokenizer, shades, ["green", "red", "blue"], templates=("{}",))
    assert probs.argmax(-1).tolist() == [1, 2, 0]
    recall = retrieval(model, tokenizer, shades, ["red", "blue", "green"])
    assert recall["image_to_text@1"] == recall["text_to_image@1"] == 1.0
    with pytest.raises(ValueError, match="matching pairs"):
        retrieval(model, tokenizer, shades, ["red"])


@pytest.mark.parametrize(
    "template,words",
    [
        ("{} {}", "has 2 places for the label"),
        ("{} {x}", "names {x}"),
        ("{} {", "Single '{'"),
        ("a photo", "needs {}"),
        ("{:d}", "Unknown format code 'd'"),
    ],
)
def test_a_template_that_does_not_take_one_label_is_named(tokenizer, template, words) -> None:
    """A ValueError naming the template and what is wrong, not IndexError or KeyError from formatting."""
    model = tiny_model(len(tokenizer))
    with pytest.raises(ValueError) as refused:
        zero_shot(model, tokenizer, [solid(RED)], ["a cat"], templates=["a photo of {}", template])
    assert str(refused.value).startswith(f"template {template!r}") and words in str(refused.value)


def test_a_template_may_number_its_label_and_double_its_braces(tokenizer) -> None:
    model, labels = tiny_model(len(tokenizer)), ["a cat", "a dog"]
    for template in ("a photo of {0}", "{{a}} {!s}"):  # {{a}}: the literal "{a}"
        texts = [template.format(label) for label in labels]
        torch.testing.assert_close(
            label_embeddings(model, tokenizer, labels, [template]),
            zeroshot.embed_texts(model, tokenizer, texts),
        )


def test_one_image_label_or_template_given_alone_is_one_not_its_letters(tokenizer) -> None:
    model, image = tiny_model(len(tokenizer)), solid(RED)
    want = zero_shot(model, tokenizer, [image], ["a cat"], templates=["a photo of {}"])
    torch.testing.assert_close(zero_shot(model, tokenizer, image, "a cat", templates="a photo of {}"), want)
    assert want.shape == (1, 1)


def test_labels_table_and_loading(tmp_path, tokenizer, monkeypatch) -> None:
    assert parse_labels(" a cat, a dog,,a cat ,") == ["a cat", "a dog"]
    with pytest.raises(ValueError, match="comma-separated"):
        parse_labels(" , ")
    table = format_scores(["a cat", "a dog"], torch.tensor([0.25, 0.75])).splitlines()
    assert table[0].split() == ["label", "probability"]
    assert [line.split()[-1] for line in table[1:]] == ["0.7500", "0.2500"] and "a dog" in table[1]

    model = tiny_model(len(tokenizer))
    save_siglip_model(model, tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, loaded_tokenizer = zeroshot.load_dual_encoder(tmp_path)
    image = [solid(RED)]
    torch.testing.assert_close(
        zero_shot(loaded, loaded_tokenizer, image, ["a cat"]), zero_shot(model, tokenizer, image, ["a cat"])
    )
    monkeypatch.setattr(zeroshot, "DEFAULT_SIGLIP_DIR", tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="pass --model"):
        zeroshot.load_dual_encoder(None)


def test_cli(tmp_path, tokenizer, capsys) -> None:
    from vlm import cli

    save_siglip_model(tiny_model(len(tokenizer)), tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    solid(RED).save(tmp_path / "red.png")
    argv = ["zeroshot", str(tmp_path / "red.png"), "--labels", "a cat, a dog", "--model", str(tmp_path / "m")]
    assert cli.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["label", "probability"] and {line.rsplit(maxsplit=1)[0] for line in lines[1:]} == {"a cat", "a dog"}  # fmt: skip
    assert cli.main(["zeroshot", str(tmp_path / "missing.png"), "--labels", "a cat", "--model", str(tmp_path / "m")]) == 2  # fmt: skip


def test_load_tokenizer_equals_auto_tokenizer_without_its_warnings(tmp_path, tokenizer) -> None:
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path)
    save_siglip_model(tiny_model(len(tokenizer)), tmp_path)  # config.json beside it, as shipped
    texts = ["a photo of a cat.", "red blue green", "an unknown word"]
    for folder in (tmp_path, zeroshot.DEFAULT_SIGLIP_DIR):
        ours, auto = zeroshot.load_tokenizer(folder), AutoTokenizer.from_pretrained(folder)
        assert isinstance(ours, PreTrainedTokenizerFast)
        torch.testing.assert_close(tokenize(ours, texts, LENGTH), tokenize(auto, texts, LENGTH))
        assert (ours.pad_token_id, ours.eos_token_id) == (auto.pad_token_id, auto.eos_token_id)


# -- the shipped dual encoder, stored in float16 -----------------------------------------------------------------


def fp16_rounding_error(weights: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random error that float16 storage would erase: `weights + error` rounds back to `weights` in float16
    (uniform within half a float16 step each way; the step below a power of two is half the one above)."""
    r = (torch.rand(weights.shape, generator=generator) - 0.5) * 0.999  # clear of the round-to-even ties
    mantissa, exponent = torch.frexp(weights)
    normal = weights.abs() >= 2.0**-14
    step = torch.where(normal, torch.exp2((exponent - 11).float()), 2.0**-24)
    step = torch.where(normal & (mantissa.abs() == 0.5) & (r * weights.sign() < 0), step / 2, step)
    return r * step


def test_the_shipped_float16_weights_pick_the_labels_any_float32_original_would() -> None:
    """vlm/default_siglip/README.md: "Stored in float16 (...; loads as float32)". The float32 weights it was
    trained to are not shipped, so their logits cannot be compared here; what can be: any float32 weights that
    store to this file name the same labels for the example images."""
    import copy
    import json
    import struct

    from vlm.data import EASY_VQA_COLORS, EASY_VQA_SHAPES

    with open(zeroshot.DEFAULT_SIGLIP_DIR / "model.safetensors", "rb") as f:
        header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"F16"}
    model, tokenizer = zeroshot.load_dual_encoder(None)
    assert {p.dtype for p in model.parameters()} == {torch.float32}

    examples = sorted((zeroshot.DEFAULT_SIGLIP_DIR.parents[1] / "demo" / "examples").glob("easyvqa_*.png"))
    labels = [f"a {c} {s}" for c in EASY_VQA_COLORS for s in EASY_VQA_SHAPES]
    shipped = zero_shot(model, tokenizer, examples, labels, ["{}"])
    assert [labels[i] for i in shipped.argmax(-1)] == [
        "a {} {}".format(*p.stem.split("_")[2:])
        for p in examples  # easyvqa_<id>_<colour>_<shape>.png
    ]
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        original = copy.deepcopy(model)
        with torch.no_grad():
            for p in original.parameters():
                p += fp16_rounding_error(p, generator)
        pairs = zip(original.parameters(), model.parameters(), strict=True)
        assert all(torch.equal(a.half(), b.half()) for a, b in pairs)  # each stores to the shipped file
        probs = zero_shot(original, tokenizer, examples, labels, ["{}"])
        assert torch.equal(probs.argmax(-1), shipped.argmax(-1))
        torch.testing.assert_close(probs, shipped, atol=2e-3, rtol=0)
