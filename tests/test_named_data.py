"""`vlm.data.named`: users' own datasets, named as a config names them, read into our conversations and eval rows.

Every test builds a tiny dataset in `tmp_path` (16x16 PNGs of distinct colours) and checks the exact
conversations and eval rows that come out of it, for each file type (.jsonl, .json, .parquet, .csv), each
folder kind (imagefolder with metadata.jsonl, `save_to_disk`) and each row format (VQA, captions,
LLaVA-Instruct `conversations`, transformers' `messages`, the Cauldron's `texts`). It proves that:

- relative image paths start at the data file's folder (or `image_root`), Image-feature bytes come through as
  bytes, and VQA answers in every accepted shape give the most common answer for training and all of them
  for evaluation;
- several captions are drawn one per visit (each one seen, reproducible by the rng), all kept for evaluation;
- chat rows keep their turns in order with each image where its tag or part puts it, and an eval row is the
  conversation up to the last user turn with the last assistant turn as its reference;
- a bad row costs that row only: `conversation` raises `BadRow` (never another exception) and `eval_rows`
  counts it by reason, and a JSON file Arrow cannot read is read line by line, its bad lines counted;
- a dataset that cannot fit at all (no file, wrong type, a wrong column mapping, the wrong kind, an unknown
  hub id offline) fails with `DataError` when it is opened;
- streamed rows equal the map-style ones, restart when an earlier row is asked for, and wrap at `limit`;
  `limit` on map-style data is a fixed sample by seed;
- a split sliced as `datasets` slices one ("train[:10%]") selects the rows `load_dataset` selects, for files,
  saved folders and packaged sources, and a slice that cannot be taken fails when opened.

Nothing touches the network or ~/.cache.
"""

import io
import json
import random
import re
import time
from collections import Counter
from pathlib import Path
from typing import Any

import datasets
import pytest
from PIL import Image

from vlm.data.named import CAPTION_PROMPTS, BadRow, DataError, DataSpec, Rows, open_data, reads_rows_of

datasets.disable_progress_bars()


def _png(colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), colour).save(buffer, format="PNG")
    return buffer.getvalue()


RED, GREEN, BLUE = _png((255, 0, 0)), _png((0, 255, 0)), _png((0, 0, 255))
TRUNCATED = RED[:50]  # a PNG cut off inside its pixel data


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`load_dataset` caches what it builds under tmp_path, not ~/.cache."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets-cache")
    monkeypatch.setenv("VLM_CACHE", str(tmp_path / "vlm-cache"))


@pytest.fixture
def data(tmp_path: Path) -> Path:
    """A data folder with img/red.png, img/green.png, img/blue.png and a 0-byte img/empty.png."""
    folder = tmp_path / "data"
    (folder / "img").mkdir(parents=True)
    for name, content in (("red", RED), ("green", GREEN), ("blue", BLUE), ("empty", b"")):
        (folder / "img" / f"{name}.png").write_bytes(content)
    return folder


# -- helpers --------------------------------------------------------------------------------------------------


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_parquet(path: Path, columns: dict[str, list[Any]], **features: Any) -> Path:
    dataset = datasets.Dataset.from_dict(columns)
    for name, feature in features.items():
        dataset = dataset.cast_column(name, feature)
    dataset.to_parquet(str(path))
    return path


def open_(kind: str, path: Path | str, **kwargs: Any) -> Rows:
    return open_data(DataSpec(kind, str(path), **kwargs))


def at(folder: Path, relative: str) -> str:
    """What the relative image path `relative` resolves to: the data file's folder joined with it."""
    return str(folder / relative)


def im(image: Any) -> dict[str, Any]:
    return {"type": "image", "image": image}


def tx(text: str) -> dict[str, str]:
    return {"type": "text", "text": text}


def u(*parts: Any) -> dict[str, Any]:
    return {"role": "user", "content": list(parts)}


def a(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def outcome(rows: Rows, index: int) -> Any:
    """Row `index`'s conversation, or its BadRow's reason: any other exception fails the test."""
    try:
        return rows.conversation(index, random.Random(0))
    except BadRow as err:
        assert isinstance(err, ValueError)
        return ("BadRow", err.reason)


def image_paths(conversation: list[dict[str, Any]]) -> list[Any]:
    return [
        part["image"]
        for m in conversation
        if isinstance(m["content"], list)
        for part in m["content"]
        if part["type"] == "image"
    ]


# -- VQA ------------------------------------------------------------------------------------------------------


def test_vqa_jsonl_answers_in_every_shape(data: Path) -> None:
    path = write_jsonl(
        data / "vqa.jsonl",
        [
            {
                "image": "img/red.png",
                "question": " What colour? ",
                "answers": "red",
                "question_type": "what color",
                "answer_type": "other",
            },
            {"image": "img/green.png", "question": "Colour?", "answers": ["lime", "green", "green"]},
            {
                "image": "img/blue.png",
                "question": "Which?",
                "answers": [{"answer": "navy", "answer_id": 1}, {"answer": "blue"}, {"answer": "blue"}],
            },
            {"image": "img/red.png", "question": "How many?", "answers": 2},
        ],
    )
    rows = open_("vqa", path)
    assert (rows.format, len(rows), rows.report) == ("vqa", 4, None)
    assert rows.columns == {
        "image": "image",
        "question": "question",
        "answers": "answers",
        "question_type": "question_type",
        "answer_type": "answer_type",
    }
    red, green, blue = at(data, "img/red.png"), at(data, "img/green.png"), at(data, "img/blue.png")
    assert [rows.conversation(i) for i in range(4)] == [
        [u(im(red), tx("What colour?")), a("red")],
        [u(im(green), tx("Colour?")), a("green")],  # the most common answer
        [u(im(blue), tx("Which?")), a("blue")],
        [u(im(red), tx("How many?")), a("2")],
    ]
    assert all(Path(p).is_file() for i in range(4) for p in image_paths(rows.conversation(i)))
    assert rows.eval_rows() == [
        {
            "image": red,
            "question": "What colour?",
            "answers": ["red"],
            "question_type": "what color",
            "answer_type": "other",
        },
        {"image": green, "question": "Colour?", "answers": ["lime", "green", "green"]},
        {"image": blue, "question": "Which?", "answers": ["navy", "blue", "blue"]},
        {"image": red, "question": "How many?", "answers": ["2"]},
    ]
    report = rows.eval_report
    assert (report.total, report.skipped, report.reasons) == (4, 0, Counter())


def test_vqa_json_array_column_mapping_and_answer_fallback(data: Path) -> None:
    path = data / "vqa.json"
    path.write_text(
        json.dumps(
            [
                {"image": "img/red.png", "q": "Colour?", "multiple_choice_answer": "red"},
                {"image": "img/blue.png", "q": "And this?", "multiple_choice_answer": "blue"},
            ]
        )
    )
    rows = open_("vqa", path, columns={"question": "q"})
    assert rows.columns == {"image": "image", "question": "q", "answers": "multiple_choice_answer"}
    assert rows.conversation(1) == [u(im(at(data, "img/blue.png")), tx("And this?")), a("blue")]
    assert rows.eval_rows() == [
        {"image": at(data, "img/red.png"), "question": "Colour?", "answers": ["red"]},
        {"image": at(data, "img/blue.png"), "question": "And this?", "answers": ["blue"]},
    ]


def test_vqa_image_root_overrides_the_data_files_folder(tmp_path: Path, data: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    path = write_jsonl(elsewhere / "vqa.jsonl", [{"image": "img/green.png", "question": "Q?", "answer": "g"}])
    rows = open_("vqa", path, image_root=str(data))
    assert rows.conversation(0) == [u(im(at(data, "img/green.png")), tx("Q?")), a("g")]
    assert len(rows.eval_rows()) == 1


def test_vqa_parquet_with_image_feature_bytes(data: Path) -> None:
    path = write_parquet(
        data / "vqa.parquet",
        {
            "image": [RED, BLUE],
            "question": ["Colour?", "And this?"],
            "answer": ["red", "blue"],
            "question_type": ["what color", "what color"],
        },
        image=datasets.Image(),
    )
    rows = open_("vqa", path)
    assert rows.columns == {
        "image": "image",
        "question": "question",
        "answers": "answer",
        "question_type": "question_type",
    }
    assert rows.conversation(0) == [u(im(RED), tx("Colour?")), a("red")]
    assert rows.eval_rows() == [
        {"image": RED, "question": "Colour?", "answers": ["red"], "question_type": "what color"},
        {"image": BLUE, "question": "And this?", "answers": ["blue"], "question_type": "what color"},
    ]


def test_vqa_parquet_with_image_paths(data: Path) -> None:
    path = write_parquet(
        data / "vqa.parquet",
        {
            "image": ["img/green.png", "img/red.png"],
            "question": ["Colour?", "Again?"],
            "answers": [["green", "lime", "green"], ["red"]],
        },
    )
    rows = open_("vqa", path)
    assert rows.conversation(0) == [u(im(at(data, "img/green.png")), tx("Colour?")), a("green")]
    assert rows.eval_rows()[0]["answers"] == ["green", "lime", "green"]
    assert Path(rows.eval_rows()[1]["image"]).read_bytes() == RED


def test_vqa_csv_with_json_list_cells(data: Path) -> None:
    path = data / "vqa.csv"
    path.write_text(
        "image,question,answers,question_type,answer_type\n"
        'img/red.png,What colour?,"[""red"", ""crimson"", ""red""]",what color,other\n'
        "img/blue.png,Is it blue?,yes,is it,yes/no\n"
    )
    rows = open_("vqa", path)
    assert rows.conversation(0) == [u(im(at(data, "img/red.png")), tx("What colour?")), a("red")]
    assert rows.conversation(1) == [u(im(at(data, "img/blue.png")), tx("Is it blue?")), a("yes")]
    assert rows.eval_rows() == [
        {
            "image": at(data, "img/red.png"),
            "question": "What colour?",
            "answers": ["red", "crimson", "red"],
            "question_type": "what color",
            "answer_type": "other",
        },
        {
            "image": at(data, "img/blue.png"),
            "question": "Is it blue?",
            "answers": ["yes"],
            "question_type": "is it",
            "answer_type": "yes/no",
        },
    ]


def test_csv_numeric_answers_stay_as_written(data: Path) -> None:
    path = data / "count.csv"
    path.write_text("image,question,answers\nimg/red.png,How many?,2\nimg/red.png,How many?,\n")
    rows = open_("vqa", path)
    assert outcome(rows, 1) == ("BadRow", "no answer")
    assert rows.conversation(0)[1] == a("2")


# -- captions -------------------------------------------------------------------------------------------------


def test_captions_one_or_several_drawn_per_visit(data: Path) -> None:
    path = write_jsonl(
        data / "captions.jsonl",
        [
            {"image": "img/red.png", "text": "A red  square."},
            {"image": "img/blue.png", "text": ["A blue square.", "Blue.", "Something blue."]},
        ],
    )
    rows = open_("caption", path)
    assert (rows.format, rows.columns) == ("caption", {"image": "image", "text": "text"})
    assert rows.eval_rows() == [
        {"image": at(data, "img/red.png"), "captions": ["A red square."]},
        {"image": at(data, "img/blue.png"), "captions": ["A blue square.", "Blue.", "Something blue."]},
    ]
    one = rows.conversation(0, random.Random(3))
    assert one[0]["content"][0] == im(at(data, "img/red.png"))
    assert one[0]["content"][1] == tx(one[0]["content"][1]["text"])
    assert one[0]["content"][1]["text"] in CAPTION_PROMPTS
    assert one[1] == a("A red square.")

    drawn = Counter(rows.conversation(1, random.Random(seed))[1]["content"] for seed in range(60))
    assert set(drawn) == {"A blue square.", "Blue.", "Something blue."}
    assert rows.conversation(1, random.Random(7)) == rows.conversation(1, random.Random(7))
    assert rows.conversation(1) == rows.conversation(1)  # no rng: fixed by (seed, index)


def test_captions_csv_json_list_cell(data: Path) -> None:
    path = data / "captions.csv"
    path.write_text('image,text\nimg/red.png,"[""a red square"", ""red""]"\nimg/blue.png,a blue square\n')
    rows = open_("caption", path)
    assert rows.eval_rows() == [
        {"image": at(data, "img/red.png"), "captions": ["a red square", "red"]},
        {"image": at(data, "img/blue.png"), "captions": ["a blue square"]},
    ]
    drawn = {rows.conversation(0, random.Random(seed))[1]["content"] for seed in range(40)}
    assert drawn == {"a red square", "red"}


def test_imagefolder_with_metadata_as_captions(tmp_path: Path) -> None:
    folder = tmp_path / "pictures"
    folder.mkdir()
    (folder / "a.png").write_bytes(RED)
    (folder / "b.png").write_bytes(BLUE)
    write_jsonl(
        folder / "metadata.jsonl",
        [{"file_name": "a.png", "text": "a red square"}, {"file_name": "b.png", "text": "a blue square"}],
    )
    rows = open_("caption", folder)
    assert (len(rows), rows.format, rows.columns) == (2, "caption", {"image": "image", "text": "text"})
    by_image = {Path(r["image"]).name: r for r in rows.eval_rows()}
    assert by_image == {
        "a.png": {"image": str(folder / "a.png"), "captions": ["a red square"]},
        "b.png": {"image": str(folder / "b.png"), "captions": ["a blue square"]},
    }
    conversation = rows.conversation(0, random.Random(0))
    assert Path(conversation[0]["content"][0]["image"]).read_bytes() in (RED, BLUE)


def test_save_to_disk_folders(tmp_path: Path) -> None:
    one = tmp_path / "saved"
    datasets.Dataset.from_dict({"image": [RED, GREEN], "text": ["red", "green"]}).cast_column(
        "image", datasets.Image()
    ).save_to_disk(str(one))
    rows = open_("caption", one)
    assert rows.eval_rows() == [{"image": RED, "captions": ["red"]}, {"image": GREEN, "captions": ["green"]}]
    assert rows.conversation(1, random.Random(0))[1] == a("green")

    splits = tmp_path / "saved-splits"
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"image": [RED], "question": ["Q?"], "answers": [["red"]]}),
            "test": datasets.Dataset.from_dict({"image": [BLUE], "question": ["Q?"], "answers": [["blue"]]}),
        }
    ).cast_column("image", datasets.Image()).save_to_disk(str(splits))
    assert open_("vqa", splits, split="test").eval_rows() == [
        {"image": BLUE, "question": "Q?", "answers": ["blue"]}
    ]
    with pytest.raises(DataError, match="validation"):
        open_("vqa", splits, split="validation")


# -- chat: LLaVA-Instruct -------------------------------------------------------------------------------------


def _turns(*pairs: tuple[str, str]) -> list[dict[str, str]]:
    return [{"from": who, "value": text} for who, text in pairs]


def test_llava_image_tags(data: Path) -> None:
    path = data / "llava.json"
    path.write_text(
        json.dumps(
            [
                {
                    "image": "img/red.png",
                    "conversations": _turns(("human", "<image>\nWhat colour?"), ("gpt", "Red.")),
                },
                {
                    "image": "img/red.png",
                    "conversations": _turns(("human", "Look at <image> closely."), ("gpt", "Ok.")),
                },
                {
                    "image": "img/blue.png",
                    "conversations": _turns(
                        ("human", "Hi"),
                        ("gpt", "Hello."),
                        ("human", "What is this? <image>"),
                        ("gpt", "Blue."),
                    ),
                },
                {
                    "image": "img/green.png",
                    "conversations": _turns(
                        ("human", "What colour?"), ("gpt", "Green."), ("human", "Sure?"), ("gpt", "Yes.")
                    ),
                },
                {
                    "image": ["img/red.png", "img/blue.png"],
                    "conversations": _turns(("human", "<image> or <image>?"), ("gpt", "Both.")),
                },
                {
                    "image": "img/red.png",
                    "conversations": _turns(("human", "<image><image> twice?"), ("gpt", "No.")),
                },
            ]
        )
    )
    rows = open_("chat", path)
    assert rows.format == "conversations"
    red, green, blue = at(data, "img/red.png"), at(data, "img/green.png"), at(data, "img/blue.png")
    assert [outcome(rows, i) for i in range(len(rows))] == [
        [u(im(red), tx("What colour?")), a("Red.")],  # tag at the start
        [u(tx("Look at"), im(red), tx("closely.")), a("Ok.")],  # in the middle of a turn
        [
            {"role": "user", "content": "Hi"},
            a("Hello."),
            u(tx("What is this?"), im(blue)),
            a("Blue."),
        ],  # later turn
        [
            u(im(green), tx("What colour?")),
            a("Green."),
            {"role": "user", "content": "Sure?"},
            a("Yes."),
        ],  # no tag
        [u(im(red), tx("or"), im(blue), tx("?")), a("Both.")],  # two images, in order
        ("BadRow", "images do not match"),  # two tags, one image
    ]
    evals = rows.eval_rows()
    assert evals[2] == {
        "messages": [{"role": "user", "content": "Hi"}, a("Hello."), u(tx("What is this?"), im(blue))],
        "reference": "Blue.",
    }
    assert evals[3] == {
        "messages": [u(im(green), tx("What colour?")), a("Green."), {"role": "user", "content": "Sure?"}],
        "reference": "Yes.",
    }
    assert [e["reference"] for e in evals] == ["Red.", "Ok.", "Blue.", "Yes.", "Both."]
    report = rows.eval_report
    assert (report.total, report.skipped, report.reasons) == (6, 1, Counter({"images do not match": 1}))


# -- chat: transformers' messages -----------------------------------------------------------------------------

IMG = {"type": "image"}


def test_messages_parquet_with_image_list(data: Path) -> None:
    messages = [
        [u(IMG, tx("What colour?")), {"role": "assistant", "content": [tx("Red.")]}],
        [u(IMG, tx("and"), IMG, tx("differ?")), {"role": "assistant", "content": [tx("Yes.")]}],
        [
            u(tx("Hi")),
            {"role": "assistant", "content": [tx("Hello.")]},
            u(IMG, tx("This?")),
            {"role": "assistant", "content": [tx("Blue.")]},
        ],
        [u(IMG, IMG, tx("Two?")), {"role": "assistant", "content": [tx("No.")]}],  # one image only
    ]
    path = write_parquet(
        data / "chat.parquet",
        {"messages": messages, "images": [[RED], [RED, BLUE], [BLUE], [GREEN]]},
        images=datasets.List(datasets.Image()),
    )
    rows = open_("chat", path)
    assert (rows.format, rows.columns) == ("messages", {"messages": "messages", "images": "images"})
    assert [outcome(rows, i) for i in range(len(rows))] == [
        [u(im(RED), tx("What colour?")), a("Red.")],
        [u(im(RED), tx("and"), im(BLUE), tx("differ?")), a("Yes.")],
        [u(tx("Hi")), a("Hello."), u(im(BLUE), tx("This?")), a("Blue.")],
        ("BadRow", "images do not match"),
    ]
    assert rows.eval_rows() == [
        {"messages": [u(im(RED), tx("What colour?"))], "reference": "Red."},
        {"messages": [u(im(RED), tx("and"), im(BLUE), tx("differ?"))], "reference": "Yes."},
        {"messages": [u(tx("Hi")), a("Hello."), u(im(BLUE), tx("This?"))], "reference": "Blue."},
    ]
    assert rows.eval_report.reasons == Counter({"images do not match": 1})


def test_messages_jsonl_with_paths(data: Path) -> None:
    path = write_jsonl(
        data / "chat.jsonl",
        [
            # an image part carrying its own path
            {"messages": [u({"type": "image", "path": "img/blue.png"}, tx("Colour?")), a("Blue.")]},
            # image parts taking the row's images in order; a string assistant turn
            {
                "messages": [u(IMG, tx("First")), a("Red."), u(IMG, tx("Second")), a("Green.")],
                "images": ["img/red.png", "img/green.png"],
            },
            # no image part at all: the row's image goes first in the first user turn
            {
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Colour?"},
                    a("Red."),
                ],
                "images": ["img/red.png"],
            },
            {"messages": [u(IMG, IMG, tx("Two?")), a("No.")], "images": ["img/red.png"]},
            {"messages": [u(IMG, tx("One?")), a("Yes.")], "images": ["img/red.png", "img/blue.png"]},
        ],
    )
    rows = open_("chat", path)
    assert rows.format == "messages"
    red, green, blue = at(data, "img/red.png"), at(data, "img/green.png"), at(data, "img/blue.png")
    assert [outcome(rows, i) for i in range(len(rows))] == [
        [u(im(blue), tx("Colour?")), a("Blue.")],
        [u(im(red), tx("First")), a("Red."), u(im(green), tx("Second")), a("Green.")],
        [{"role": "system", "content": "Be brief."}, u(im(red), tx("Colour?")), a("Red.")],
        ("BadRow", "images do not match"),  # more image parts than images
        ("BadRow", "images do not match"),  # an image with no part to go in
    ]
    evals = rows.eval_rows()
    assert evals[1] == {
        "messages": [u(im(red), tx("First")), a("Red."), u(im(green), tx("Second"))],
        "reference": "Green.",
    }
    assert evals[2] == {
        "messages": [{"role": "system", "content": "Be brief."}, u(im(red), tx("Colour?"))],
        "reference": "Red.",
    }
    assert rows.eval_report.reasons == Counter({"images do not match": 2})


def test_capitalise_starts_a_share_of_user_turns_upper_case(data: Path) -> None:
    """`capitalise`: training draws per visit whether a row's user turns start upper-case (each turn's first text,
    nothing else changed), `conversations` lists both forms for preparing ahead, evaluation capitalises the same
    rows every time; 0 draws nothing, so a source without it sees the draws it always saw."""
    vqa = write_jsonl(
        data / "vqa.jsonl",
        [
            {"image": "img/red.png", "question": f"what color is shape {i}?", "answers": "red"}
            for i in range(40)
        ],
    )
    rows = open_("vqa", vqa, capitalise=0.5)
    visits = [rows.conversation(0, random.Random(seed))[0]["content"][1]["text"] for seed in range(60)]
    assert set(visits) == {"what color is shape 0?", "What color is shape 0?"}
    assert 15 < visits.count("What color is shape 0?") < 45
    assert rows.conversation(3, random.Random(5)) == rows.conversation(3, random.Random(5))
    assert [c[0]["content"][1]["text"] for c in rows.conversations(0)] == [
        "what color is shape 0?",
        "What color is shape 0?",
    ]
    assert rows.conversations(0)[1][0]["content"][0] == im(at(data, "img/red.png"))
    questions = [row["question"] for row in rows.eval_rows()]
    assert questions == [row["question"] for row in open_("vqa", vqa, capitalise=0.5).eval_rows()]
    assert 10 < sum(q[0].isupper() for q in questions) < 30
    assert all(q[0].isupper() for q in (r["question"] for r in open_("vqa", vqa, capitalise=1).eval_rows()))

    plain = open_("vqa", vqa)
    assert plain.conversations(0) == [plain.conversation(0)]
    rng = random.Random(9)
    plain.conversation(0, rng)
    assert rng.random() == random.Random(9).random()  # no draw taken
    assert not any(row["question"][0].isupper() for row in plain.eval_rows())

    chat = write_jsonl(
        data / "chat.jsonl",
        [{"messages": [u(IMG, tx("colour?")), a("red."), {"role": "user", "content": "and size?"}, a("small.")],
          "images": ["img/red.png"]}],
    )  # fmt: skip
    upper = open_("chat", chat, capitalise=1.0).conversation(0, random.Random(0))
    assert upper == [
        u(im(at(data, "img/red.png")), tx("Colour?")),
        a("red."),
        {"role": "user", "content": "And size?"},
        a("small."),
    ]
    assert open_("chat", chat, capitalise=1.0).eval_rows()[0]["messages"][2] == {
        "role": "user",
        "content": "And size?",
    }
    for bad in (-0.1, 1.5, "half"):
        with pytest.raises(DataError, match="capitalise"):
            DataSpec("vqa", str(vqa), capitalise=bad)


# -- chat: the Cauldron ---------------------------------------------------------------------------------------


def test_cauldron_texts(data: Path) -> None:
    path = write_parquet(
        data / "cauldron.parquet",
        {
            "images": [[RED], [RED, BLUE]],
            "texts": [
                [{"user": "Colour?", "assistant": "Red.", "source": "s"}],
                [
                    {"user": "Compare.", "assistant": "They differ.", "source": "s"},
                    {"user": "Sure?", "assistant": "Yes.", "source": "s"},
                ],
            ],
        },
        images=datasets.List(datasets.Image()),
    )
    rows = open_("chat", path)
    assert (rows.format, rows.columns) == ("texts", {"texts": "texts", "images": "images"})
    assert rows.conversation(0) == [u(im(RED), tx("Colour?")), a("Red.")]
    assert rows.conversation(1) == [
        u(im(RED), im(BLUE), tx("Compare.")),
        a("They differ."),
        {"role": "user", "content": "Sure?"},
        a("Yes."),
    ]
    assert rows.eval_rows()[1] == {
        "messages": [
            u(im(RED), im(BLUE), tx("Compare.")),
            a("They differ."),
            {"role": "user", "content": "Sure?"},
        ],
        "reference": "Yes.",
    }


# -- bad rows -------------------------------------------------------------------------------------------------


def test_vqa_bad_rows_jsonl(data: Path) -> None:
    good = {"image": "img/red.png", "question": "Q?", "answers": ["red"]}
    path = data / "vqa.jsonl"
    lines = [
        json.dumps(good),
        json.dumps({**good, "image": "img/missing.png"}),  # no such file: found when the image is read
        json.dumps({**good, "image": "img/empty.png"}),  # a 0-byte file
        json.dumps({**good, "question": "  "}),
        json.dumps({**good, "question": 5}),
        json.dumps({**good, "answers": []}),
        json.dumps({**good, "answers": [{"answer": ""}]}),
        json.dumps({**good, "image": "https://example.com/a.png"}),
        json.dumps({**good, "image": ""}),
        "{not json",  # a malformed line: Arrow cannot read the file, so it is read line by line
        json.dumps({**good, "image": "img/blue.png", "answers": "blue"}),
    ]
    path.write_text("\n".join(lines) + "\n")
    rows = open_("vqa", path)
    assert len(rows) == 10
    assert rows.report.reasons == Counter({"malformed line": 1})
    assert [outcome(rows, i) for i in range(3, 9)] == [
        ("BadRow", "empty question"),
        ("BadRow", "question not text"),
        ("BadRow", "no answer"),
        ("BadRow", "no answer"),
        ("BadRow", "remote image"),
        ("BadRow", "no image"),
    ]
    assert outcome(rows, 9) == [u(im(at(data, "img/blue.png")), tx("Q?")), a("blue")]
    assert image_paths(outcome(rows, 1)) == [at(data, "img/missing.png")]  # read later, with the batch
    assert rows.eval_rows() == [
        {"image": at(data, "img/red.png"), "question": "Q?", "answers": ["red"]},
        {"image": at(data, "img/blue.png"), "question": "Q?", "answers": ["blue"]},
    ]
    report = rows.eval_report
    assert report.total == 11 and report.skipped == 9
    assert report.reasons == Counter(
        {
            "unreadable image": 2,
            "empty question": 1,
            "question not text": 1,
            "no answer": 2,
            "remote image": 1,
            "no image": 1,
            "malformed line": 1,
        }
    )


def test_jsonl_answers_string_in_one_row_list_in_another(data: Path) -> None:
    """Older `datasets` cannot make one Arrow column of a string and a list (newer ones make a Json column);
    either way the rows come out whole. With a malformed line as well, the line-by-line reading is sure."""
    rows_in = [
        {"image": "img/red.png", "question": "Q1?", "answers": "red"},
        {"image": "img/green.png", "question": "Q2?", "answers": ["green", "lime", "green"]},
        {"image": "img/blue.png", "question": "Q3?", "answers": [{"answer": "blue"}]},
    ]
    expected = [
        {"image": at(data, "img/red.png"), "question": "Q1?", "answers": ["red"]},
        {"image": at(data, "img/green.png"), "question": "Q2?", "answers": ["green", "lime", "green"]},
        {"image": at(data, "img/blue.png"), "question": "Q3?", "answers": ["blue"]},
    ]
    clean = open_("vqa", write_jsonl(data / "mixed.jsonl", rows_in))
    assert clean.eval_rows() == expected
    assert clean.conversation(1)[1] == a("green")
    assert clean.report is None or clean.report.skipped == 0

    broken = data / "mixed-broken.jsonl"
    broken.write_text("\n".join([json.dumps(rows_in[0]), '{"image": ', *map(json.dumps, rows_in[1:])]) + "\n")
    rows = open_("vqa", broken)
    assert rows.report is not None and rows.report.reasons == Counter({"malformed line": 1})
    assert rows.eval_rows() == expected
    assert [rows.conversation(i)[1] for i in range(3)] == [a("red"), a("green"), a("blue")]
    assert (rows.eval_report.total, rows.eval_report.skipped) == (4, 1)


def test_vqa_bad_image_bytes_parquet(data: Path) -> None:
    path = write_parquet(
        data / "vqa.parquet",
        {
            "image": [RED, TRUNCATED, b"", BLUE],
            "question": ["Q?"] * 4,
            "answers": [["a"], ["b"], ["c"], [""]],
        },
        image=datasets.Image(),
    )
    rows = open_("vqa", path)
    assert outcome(rows, 1)[0]["content"][0] == im(TRUNCATED)  # decoded only when the batch is built
    assert outcome(rows, 2) == ("BadRow", "no image")
    assert outcome(rows, 3) == ("BadRow", "no answer")
    assert rows.eval_rows() == [{"image": RED, "question": "Q?", "answers": ["a"]}]
    assert rows.eval_report.reasons == Counter({"unreadable image": 1, "no image": 1, "no answer": 1})
    assert rows.eval_report.total == 4


def test_caption_bad_rows(data: Path) -> None:
    path = write_jsonl(
        data / "captions.jsonl",
        [
            {"image": "img/red.png", "text": "red"},
            {"image": "img/red.png", "text": ""},
            {"image": "img/red.png", "text": ["", "  "]},
            {"image": "img/red.png", "text": None},
            {"image": "img/missing.png", "text": "gone"},
            {"image": "http://example.com/x.png", "text": "far"},
            {"image": None, "text": "none"},
        ],
    )
    rows = open_("caption", path)
    assert [outcome(rows, i)[1] for i in (1, 2, 3, 5, 6)] == [
        "empty caption",
        "empty caption",
        "empty caption",
        "remote image",
        "no image",
    ]
    assert rows.eval_rows() == [{"image": at(data, "img/red.png"), "captions": ["red"]}]
    report = rows.eval_report
    assert (report.total, report.skipped) == (7, 6)
    assert report.reasons == Counter(
        {"empty caption": 3, "unreadable image": 1, "remote image": 1, "no image": 1}
    )


def test_chat_bad_rows(data: Path) -> None:
    path = write_jsonl(
        data / "chat.jsonl",
        [
            {"messages": [u(IMG, tx("Q")), a("A")], "images": ["img/red.png"]},
            {"messages": [u(IMG, tx("Q")), a("A")], "images": ["img/missing.png"]},
            {"messages": [u(IMG, tx("Q")), a("A")], "images": ["img/empty.png"]},
            {"messages": [u(tx("Q"))]},
            {"messages": "hello"},
            {"messages": []},
            {"messages": [{"role": "robot", "content": "beep"}, a("A")]},
            {"messages": [u({"type": "image_url", "url": "x"}), a("A")]},
            {"messages": [{"role": "user", "content": 5}, a("A")]},
            {"messages": [u({"type": "image", "image": "https://example.com/a.png"}), a("A")]},
            {"messages": [u(IMG, tx("Q")), a("A")], "images": [None]},
        ],
    )
    rows = open_("chat", path)
    outcomes = [outcome(rows, i) for i in range(len(rows))]
    assert outcomes[:3] == [
        [u(im(at(data, "img/red.png")), tx("Q")), a("A")],
        [u(im(at(data, "img/missing.png")), tx("Q")), a("A")],
        [u(im(at(data, "img/empty.png")), tx("Q")), a("A")],
    ]
    assert outcomes[3:] == [
        ("BadRow", "no assistant turn"),
        ("BadRow", "no messages"),
        ("BadRow", "no messages"),
        ("BadRow", "bad message"),
        ("BadRow", "bad message"),
        ("BadRow", "bad message"),
        ("BadRow", "remote image"),
        ("BadRow", "no image"),
    ]
    assert rows.eval_rows() == [{"messages": [u(im(at(data, "img/red.png")), tx("Q"))], "reference": "A"}]
    assert rows.eval_report.total == 11
    assert rows.eval_report.reasons == Counter(
        {
            "unreadable image": 2,
            "no assistant turn": 1,
            "no messages": 2,
            "bad message": 3,
            "remote image": 1,
            "no image": 1,
        }
    )


def test_chat_parquet_unreadable_image_bytes(data: Path) -> None:
    path = write_parquet(
        data / "chat.parquet",
        {
            "messages": [[u(IMG, tx("Q")), {"role": "assistant", "content": [tx("A")]}]] * 2,
            "images": [[TRUNCATED], [GREEN]],
        },
        images=datasets.List(datasets.Image()),
    )
    rows = open_("chat", path)
    assert rows.conversation(0) == [u(im(TRUNCATED), tx("Q")), a("A")]
    assert rows.eval_rows() == [{"messages": [u(im(GREEN), tx("Q"))], "reference": "A"}]
    assert rows.eval_report.reasons == Counter({"unreadable image": 1})


def test_llava_and_cauldron_bad_rows(data: Path) -> None:
    llava = write_jsonl(
        data / "llava.jsonl",
        [
            {"image": "img/red.png", "conversations": _turns(("human", "<image> Q"), ("gpt", "A"))},
            {"image": "img/red.png", "conversations": _turns(("human", "<image> Q"))},
            {"image": "img/red.png", "conversations": _turns(("alien", "Q"), ("gpt", "A"))},
            {
                "image": "img/red.png",
                "conversations": [{"from": "human", "value": 5}, {"from": "gpt", "value": "A"}],
            },
            {"image": "img/red.png", "conversations": "Q"},
            {"image": None, "conversations": _turns(("human", "<image> Q"), ("gpt", "A"))},
            {"image": "img/red.png", "conversations": _turns(("gpt", "A"))},
        ],
    )
    rows = open_("chat", llava)
    assert [outcome(rows, i)[1] for i in range(1, 7)] == [
        "no assistant turn",
        "bad message",
        "bad message",
        "no conversation",
        "images do not match",
        "images do not match",  # an image but no user turn to put it in
    ]
    assert len(rows.eval_rows()) == 1 and rows.eval_report.skipped == 6

    cauldron = write_jsonl(
        data / "cauldron.jsonl",
        [
            {"images": ["img/red.png"], "texts": [{"user": "Q", "assistant": "A"}]},
            {"images": ["img/red.png"], "texts": [{"user": "Q"}]},
            {"images": ["img/red.png"], "texts": []},
            {"images": ["ftp://example.com/a.png"], "texts": [{"user": "Q", "assistant": "A"}]},
        ],
    )
    rows = open_("chat", cauldron)
    assert [outcome(rows, i)[1] for i in range(1, 4)] == ["bad message", "no conversation", "remote image"]
    assert rows.eval_rows() == [{"messages": [u(im(at(data, "img/red.png")), tx("Q"))], "reference": "A"}]
    assert rows.eval_report.reasons == Counter({"bad message": 1, "no conversation": 1, "remote image": 1})


def test_image_dict_with_text_bytes_is_a_bad_row(data: Path) -> None:
    path = write_jsonl(
        data / "vqa.jsonl",
        [
            {"image": "img/red.png", "question": "Q?", "answers": "a"},
            {"image": {"bytes": "iVBORw0KGgo=", "path": None}, "question": "Q?", "answers": "a"},
        ],
    )
    rows = open_("vqa", path)
    assert outcome(rows, 1)[0] == "BadRow"
    assert len(rows.eval_rows()) == 1 and rows.eval_report.skipped == 1


def test_llava_unhashable_role_is_a_bad_row(data: Path) -> None:
    path = write_jsonl(
        data / "llava.jsonl",
        [
            {"image": "img/red.png", "conversations": _turns(("human", "<image> Q"), ("gpt", "A"))},
            {"image": "img/red.png", "conversations": [{"from": ["human"], "value": "<image> Q"}]},
        ],
    )
    rows = open_("chat", path)
    assert outcome(rows, 1)[0] == "BadRow"
    assert len(rows.eval_rows()) == 1 and rows.eval_report.skipped == 1


def test_eval_row_without_a_user_turn_before_the_reference_is_skipped(data: Path) -> None:
    path = write_jsonl(
        data / "chat.jsonl",
        [
            {"messages": [{"role": "user", "content": "Q"}, a("A")]},
            {"messages": [a("Hello, ask me anything."), {"role": "user", "content": "Q"}]},
        ],
    )
    rows = open_("chat", path)
    evals = rows.eval_rows()
    assert all(e["messages"] and e["messages"][-1]["role"] == "user" for e in evals)
    assert rows.eval_report.skipped == 1


# -- open-time errors -----------------------------------------------------------------------------------------


def test_open_time_errors(data: Path) -> None:
    vqa = write_jsonl(data / "vqa.jsonl", [{"image": "img/red.png", "question": "Q?", "answers": "a"}])

    with pytest.raises(DataError, match="no such file") as err:
        open_("vqa", data / "missing.jsonl")
    assert "missing.jsonl" in str(err.value)

    (data / "notes.txt").write_text("image,question,answers\n")
    with pytest.raises(DataError, match=r"\.jsonl, \.json, \.parquet, \.csv"):
        open_("vqa", data / "notes.txt")

    with pytest.raises(DataError) as err:
        open_("vqa", vqa, columns={"question": "prompt"})
    assert "columns.question = 'prompt'" in str(err.value)
    assert "image, question, answers" in str(err.value)

    with pytest.raises(DataError, match="columns.text: not a field of kind 'vqa'"):
        open_("vqa", vqa, columns={"text": "question"})

    with pytest.raises(DataError) as err:
        open_("caption", vqa)
    message = str(err.value)
    assert "text" in message and "image, question, answers" in message and str(vqa) in message

    with pytest.raises(DataError, match="messages or conversations or texts"):
        open_("chat", vqa)

    (data / "broken.parquet").write_bytes(b"PAR1 not really parquet")
    with pytest.raises(DataError, match="broken.parquet"):
        open_("vqa", data / "broken.parquet")

    with pytest.raises(DataError, match="kind"):
        DataSpec("detection", str(vqa))


def test_unknown_hub_id_offline_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # read once, at import
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    start = time.monotonic()
    with pytest.raises(DataError) as err:
        open_("vqa", "nobody-at-all/no-such-dataset-xyz")
    assert time.monotonic() - start < 30
    assert "nobody-at-all/no-such-dataset-xyz" in str(err.value)


# -- streaming and limit --------------------------------------------------------------------------------------


def _six_rows(data: Path, kind: str) -> Path:
    questions = [f"q{i}?" for i in range(6)]
    answers = [f"a{i}" for i in range(6)]
    if kind == "parquet":
        return write_parquet(
            data / "six.parquet",
            {"image": [RED, GREEN, BLUE] * 2, "question": questions, "answers": answers},
            image=datasets.Image(),
        )
    images = ["img/red.png", "img/green.png", "img/blue.png"] * 2
    return write_jsonl(
        data / "six.jsonl",
        [
            {"image": i, "question": q, "answers": x}
            for i, q, x in zip(images, questions, answers, strict=True)
        ],
    )


@pytest.mark.parametrize("kind", ["parquet", "jsonl"])
def test_streaming_reads_in_order_restarts_and_wraps(data: Path, kind: str) -> None:
    path = _six_rows(data, kind)
    # Before any map-style read: that one caches the split's size, which a later stream then knows.
    with pytest.raises(DataError, match="limit"):
        open_("vqa", path, streaming=True)

    mapped = open_("vqa", path)
    stream = open_("vqa", path, streaming=True, limit=4)
    assert stream.streaming and not mapped.streaming
    assert len(stream) == 4
    assert [stream.row(i) for i in range(4)] == [mapped.row(i) for i in range(4)]
    assert [stream.conversation(i) for i in range(4)] == [mapped.conversation(i) for i in range(4)]
    assert stream.row(1)["question"] == "q1?"  # earlier: the stream restarts at row 1
    assert stream.row(2)["question"] == "q2?"
    assert stream.row(4)["question"] == "q0?"  # row `len` wraps around
    assert stream.row(9)["question"] == "q1?"
    assert stream.row(0) == mapped.row(0)
    assert [e["question"] for e in stream.eval_rows()] == ["q0?", "q1?", "q2?", "q3?"]


@pytest.mark.parametrize("kind", ["parquet", "jsonl"])
def test_a_stream_is_sliced_by_rows_from_its_start(data: Path, kind: str) -> None:
    """A hub set too big to download with no validation split: evaluate on its first rows, train on the rest."""
    path = _six_rows(data, kind)
    head = open_("vqa", path, streaming=True, split="train[:2]")
    assert head.streaming and len(head) == 2
    assert [e["question"] for e in head.eval_rows()] == ["q0?", "q1?"]
    with pytest.raises(DataError, match="limit"):  # the rest of a stream of unknown length
        open_("vqa", path, streaming=True, split="train[2:]")
    rest = open_("vqa", path, streaming=True, split="train[2:]", limit=3)
    assert len(rest) == 3 and [rest.row(i)["question"] for i in range(3)] == ["q2?", "q3?", "q4?"]
    assert rest.row(1)["question"] == "q3?"  # an earlier row restarts the stream at the slice's row 1
    mapped = open_("vqa", path)  # caches the split's size, which the stream's card then states
    rest = open_("vqa", path, streaming=True, split="train[2:]")
    assert len(rest) == 4 and [rest.row(i) for i in range(4)] == [mapped.row(i) for i in range(2, 6)]
    assert rest.row(4)["question"] == "q2?"  # past the end: wraps to the slice's start
    with pytest.raises(DataError, match="selects no row"):
        open_("vqa", path, streaming=True, split="train[6:]")


def test_streaming_json_read_line_by_line(data: Path) -> None:
    path = data / "six.jsonl"
    rows_in = [{"image": "img/red.png", "question": f"q{i}?", "answers": f"a{i}"} for i in range(3)]
    path.write_text("\n".join([json.dumps(rows_in[0]), "{oops", *map(json.dumps, rows_in[1:])]) + "\n")
    stream = open_("vqa", path, streaming=True, limit=3)
    assert stream.report.reasons == Counter({"malformed line": 1})
    assert [stream.conversation(i)[1] for i in range(3)] == [a("a0"), a("a1"), a("a2")]
    assert [e["answers"] for e in stream.eval_rows()] == [["a0"], ["a1"], ["a2"]]


def test_streaming_limit_beyond_the_end_wraps_when_read_in_order(data: Path) -> None:
    stream = open_("vqa", _six_rows(data, "jsonl"), streaming=True, limit=10)
    assert [stream.row(i)["question"] for i in range(8)] == [f"q{i % 6}?" for i in range(8)]
    assert len(stream) == 6


def test_streaming_limit_beyond_the_end_wraps_when_skipping(data: Path) -> None:
    stream = open_("vqa", _six_rows(data, "jsonl"), streaming=True, limit=10)
    assert stream.row(7)["question"] == "q1?"
    assert len(stream) == 6


def test_limit_on_map_style_is_a_fixed_sample(data: Path) -> None:
    path = write_jsonl(
        data / "twenty.jsonl",
        [{"image": "img/red.png", "question": f"q{i}?", "answers": f"a{i}"} for i in range(20)],
    )

    def questions(rows: Rows) -> list[str]:
        return [rows.row(i)["question"] for i in range(len(rows))]

    first = open_("vqa", path, limit=5, seed=3)
    again = open_("vqa", path, limit=5, seed=3)
    other = open_("vqa", path, limit=5, seed=4)
    assert len(first) == 5
    assert questions(first) == questions(again)
    assert questions(first) != questions(other)
    assert len(set(questions(first))) == 5 and set(questions(first)) <= {f"q{i}?" for i in range(20)}
    assert [first.conversation(i) for i in range(5)] == [again.conversation(i) for i in range(5)]
    assert len(open_("vqa", path, limit=50)) == 20  # more than there are: all of them


# -- sliced splits: a validation set out of a training split ---------------------------------------------------


def _questions(rows: Rows) -> list[str]:
    return [rows.row(i)["question"] for i in range(len(rows))]


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_a_sliced_split_selects_the_rows_datasets_would(data: Path, suffix: str) -> None:
    """`train[:10%]` / `train[10%:]` of one file: the rows `datasets` itself selects for the same slice (its
    rounding, its negative indices), the two sides disjoint and together the whole, in order."""
    table = {"image": ["img/red.png"] * 23, "question": [f"q{i}?" for i in range(23)], "answers": ["a"] * 23}
    path = data / f"q{suffix}"
    if suffix == ".jsonl":
        write_jsonl(
            path, [dict(zip(table, values, strict=True)) for values in zip(*table.values(), strict=True)]
        )
    elif suffix == ".csv":
        datasets.Dataset.from_dict(table).to_csv(str(path), index=False)
    else:
        write_parquet(path, table)
    builder = {".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}[suffix]
    slices = ("train[:10%]", "train[10%:]", "train[-5:]", "train[3:7]+train[:1]", "train[:33%]")
    for split in (*slices, "train[20:]+train[30:40]"):  # a piece past the end adds no row
        expected = datasets.load_dataset(builder, data_files={"train": str(path)}, split=split)["question"]
        assert _questions(open_("vqa", path, split=split)) == expected, split
    held, rest = open_("vqa", path, split="train[:10%]"), open_("vqa", path, split="train[10%:]")
    assert (len(held), len(rest)) == (2, 21)  # 2.3 rows rounds to 2
    assert _questions(held) + _questions(rest) == table["question"]
    assert held.eval_rows()[0] == {"image": at(data, "img/red.png"), "question": "q0?", "answers": ["a"]}
    sample = open_("vqa", path, split="train[10%:]", limit=5, seed=1)  # limit samples the slice
    assert len(sample) == 5 and set(_questions(sample)) <= set(_questions(rest))
    assert _questions(sample) == _questions(open_("vqa", path, split="train[10%:]", limit=5, seed=1))


def test_sliced_splits_of_folders(tmp_path: Path) -> None:
    """A `save_to_disk` DatasetDict (several splits joined by "+"), one saved Dataset, and a Parquet folder
    (sliced by `datasets.load_dataset` itself)."""
    splits = tmp_path / "saved-splits"
    parts = {
        name: datasets.Dataset.from_dict(
            {"image": [RED] * n, "question": [f"{name}{i}?" for i in range(n)], "answers": [["x"]] * n}
        )
        for name, n in (("train", 10), ("validation", 4))
    }
    datasets.DatasetDict(parts).cast_column("image", datasets.Image()).save_to_disk(str(splits))
    assert _questions(open_("vqa", splits, split="train[:20%]+validation[-1:]")) == [
        "train0?",
        "train1?",
        "validation3?",
    ]
    with pytest.raises(DataError, match="no split 'test'"):
        open_("vqa", splits, split="train[:50%]+test")
    one = tmp_path / "saved-one"
    parts["train"].save_to_disk(str(one))
    assert _questions(open_("vqa", one, split="train[-2:]")) == ["train8?", "train9?"]
    folder = tmp_path / "parquet-folder"
    folder.mkdir()
    parts["train"].to_parquet(str(folder / "train.parquet"))
    assert _questions(open_("vqa", folder, split="train[:30%]")) == ["train0?", "train1?", "train2?"]


def test_packaged_sources_slice_their_splits() -> None:
    """easy-VQA's training questions as training and validation rows: disjoint, the whole split together,
    and (its questions listed image by image) sharing at most the one image at the cut."""
    whole = open_data(DataSpec("vqa", "easy-vqa", split="train"))
    held = open_data(DataSpec("vqa", "easy-vqa", split="train[:5%]"))
    rest = open_data(DataSpec("vqa", "easy-vqa", split="train[5%:]"))
    assert len(held) == round(0.05 * len(whole)) and len(held) + len(rest) == len(whole)
    assert [held.row(i) for i in (0, len(held) - 1)] == [whole.row(0), whole.row(len(held) - 1)]
    assert rest.row(0) == whole.row(len(held))
    images = [{row["image"] for row in rows.eval_rows()} for rows in (held, rest)]
    assert len(images[0] & images[1]) <= 1
    with pytest.raises(DataError, match="not 'validation'"):
        open_data(DataSpec("vqa", "easy-vqa", split="validation[:5%]"))


def test_bad_slices_fail_when_opened(data: Path) -> None:
    path = write_jsonl(data / "q.jsonl", [{"image": "img/red.png", "question": "q?", "answers": "a"}] * 3)
    with pytest.raises(DataError, match="a slice reads like"):
        DataSpec("vqa", str(path), split="train[:five%]")
    for split in ("train[:50%]", "train[-2:]", "train[:1]+train[2:]"):
        with pytest.raises(DataError, match="a stream is sliced by rows from its start"):
            DataSpec("vqa", str(path), split=split, streaming=True)
    with pytest.raises(DataError, match="selects no row"):
        DataSpec("vqa", str(path), split="train[2:2]", streaming=True)
    with pytest.raises(DataError, match="selects no row"):
        open_("vqa", path, split="train[:10%]")  # 0.3 rows rounds to none
    for split in ("train[3:]", "train[5:]", "train[10:20]"):  # starts at or past the end of 3 rows
        with pytest.raises(DataError, match=re.escape(f"split {split!r} selects no row (train 3 rows)")):
            open_("vqa", path, split=split)
    with pytest.raises(DataError, match="names 2 splits"):
        open_("vqa", path, split="train[:1]+test[:1]")  # a file is one split
    with pytest.raises(DataError, match="generated source is not sliced"):
        open_data(DataSpec("vqa", "scenes", split="train[:5%]"))


def test_an_eval_set_inside_a_training_source_is_told_from_the_specs() -> None:
    def spec(name: str = "d.jsonl", split: str = "train", **kw: Any) -> DataSpec:
        return DataSpec("vqa", name, split=split, **kw)

    whole = spec()
    assert reads_rows_of(spec(), whole)
    assert reads_rows_of(spec(split="train[:5%]", limit=10), whole)  # a slice or a sample of the same split
    assert not reads_rows_of(spec(split="train[:5%]"), spec(split="train[5%:]"))  # the user cut them apart
    assert not reads_rows_of(spec(split="test"), whole)
    assert reads_rows_of(spec(split="train[:5%]+test"), whole)  # its train rows are trained on
    assert not reads_rows_of(spec(split="test[:5%]"), whole)
    assert not reads_rows_of(spec("other.jsonl"), whole)
    assert not reads_rows_of(spec(columns={"question": "q"}), whole)
    assert not reads_rows_of(DataSpec("caption", "d.jsonl"), whole)
    assert not reads_rows_of(spec("scenes", split="train"), spec("scenes", split="train", limit=5))
    flags = DataSpec("caption", "flags", split="test")  # a packaged source's "all" holds its test split
    assert reads_rows_of(flags, DataSpec("caption", "flags", split="all"))
    assert not reads_rows_of(spec(split="test"), spec(split="all"))  # a file's "all" is only a name
