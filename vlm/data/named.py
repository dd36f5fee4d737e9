"""Data named the way a config names it: a packaged source, a hub id, a local folder or a file, of one kind
(`vqa`, `caption` or `chat`), read through `datasets` and served as conversations for training and as rows
for evaluation.

    rows = open_data(DataSpec("vqa", "my/vqa.parquet", columns={"answers": "multiple_choice_answer"}))
    rows.conversation(7, rng)   # [user(image + question), assistant(answer)]: what fine-tuning learns
    rows.eval_rows()            # [{"image", "question", "answers", ...}]: what `vlm.evaluate` scores

`name` is, in this order: a packaged source (`easy-vqa` for VQA; `emoji`, `flags`, ... for captions); a
`.jsonl`/`.json`/`.parquet`/`.csv` file; a folder (written by `save_to_disk`, or any folder `load_dataset`
reads: an imagefolder with `metadata.jsonl`, a folder of Parquet/JSON files); else a hub id. Files,
folders and hub ids all go through `datasets.load_dataset`, so they behave alike; only when a local JSON
file is no table Arrow can read (a malformed line, a column that is a string in one row and a list in the
next) is it read line by line instead, its bad lines counted.

The row formats each kind reads (our field names; `columns` maps them to the dataset's own):

| kind    | fields                                                                                     |
|---------|--------------------------------------------------------------------------------------------|
| vqa     | image, question, answers (a string, a list, or VQAv2's `{"answer": ...}` dicts; `answer`    |
|         | or `multiple_choice_answer` found when there is no `answers`), question_type, answer_type  |
| caption | image, text (one caption or several: training draws one per visit, evaluation scores all; |
|         | `captions` or `caption` found when there is no `text`)                                     |
| chat    | `messages`: transformers' chat format (`role`, `content` as a string or typed parts; image  |
|         | parts without data take the row's `images` in order), or `conversations`: LLaVA-Instruct  |
|         | (`from: human/gpt`, `<image>` where the image goes; `image` one path or a list), or        |
|         | `texts`: the Cauldron's `{user, assistant}` turns, the row's `images` in the first turn     |

An image is an `Image` feature, encoded bytes, or a path relative to the data file's folder (`image_root`
overrides it; hub datasets' paths are relative to the working directory). Images are read when a batch is
built (`vlm.processing.load_image`), so a bad one costs its row only. A row that does not fit its format
raises `BadRow` (a ValueError) from `conversation`, which the training loop counts and skips; `eval_rows`
counts and skips such rows itself. A dataset that cannot fit at all (a missing file, a column that does not
exist, a kind its columns do not fit) raises `DataError` when it is opened, before any model loads.

`capitalise` (a share, 0 to 1) starts that share of rows' user turns with a capital letter: drawn per visit in
training (`conversations` lists both forms for preparing ahead), fixed per row for evaluation.

`split` may be sliced as `datasets` slices one, for any source that is not generated: `"train[:5%]"`,
`"train[5%:]"`, `"train[-1000:]"`, `"train[:90%]+test"` (rows by position, percentages rounded to the closest
row, the same arithmetic as `datasets.ReadInstruction`). That is the validation set of data with no validation
split: `data.eval` reads `train[:5%]` while `data.train` reads `train[5%:]`. `limit` then samples the slice.

Streaming (`streaming=True`): the rows are read in order and never held; row i is the i-th of the stream
(the training loop asks for rows in order within an epoch, and restarts the stream for the next, or after a
resume, by skipping to the row it needs). Its length is `limit`, or the split's size when the dataset's card
states it. A stream is sliced by row numbers from its start only (`train[:1000]` to evaluate on, `train[1000:]`
to train on): a percentage or a negative index needs a length it does not know.
"""

from __future__ import annotations

import csv
import json
import logging
import random
import re
from collections import Counter
from collections.abc import Callable, Hashable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import datasets
from datasets import Image as ImageFeature

from vlm.checks import InvalidValue, share
from vlm.conversation import Message, user
from vlm.data.common import MALFORMED_LINE, SkipReport, random_sample, skip_report
from vlm.data.files import read_jsonl
from vlm.generation import image_key
from vlm.processing import ImageLoadError, load_image

logger = logging.getLogger(__name__)

Kind = Literal["vqa", "caption", "chat"]
KINDS: tuple[str, ...] = ("vqa", "caption", "chat")
FILE_TYPES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}

# Each kind's fields: required ones first. For chat, one of the three conversation fields is required.
FIELDS: dict[str, tuple[str, ...]] = {
    "vqa": ("image", "question", "answers", "question_type", "answer_type"),
    "caption": ("image", "text"),
    "chat": ("messages", "conversations", "texts", "images", "image"),
}
REQUIRED = {"vqa": ("image", "question", "answers"), "caption": ("image", "text"), "chat": ()}
CHAT_FORMATS = ("messages", "conversations", "texts")  # transformers chat, LLaVA-Instruct, the Cauldron
# Where a field is found when the dataset has no column of its name (and `columns` names none).
FALLBACKS = {"answers": ("answer", "multiple_choice_answer"), "text": ("captions", "caption")}
LLAVA_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}
IMAGE_TAG = "<image>"
CAPTION_PROMPTS = (  # a caption row's user turn: one of these, drawn per visit
    "Describe the image in one sentence.",
    "What is in this picture?",
    "Write a short caption for this image.",
)


class DataError(ValueError):
    """A data source that cannot be used at all: its message names the source and what to change."""


class BadRow(ValueError):
    """One row that does not fit its format; `reason` groups alike rows in a skip report."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class DataSpec:
    """One data source as a config names it (see the module docstring)."""

    kind: Kind
    name: str
    subset: str | None = None  # the hub dataset's configuration (`load_dataset(name, subset)`)
    split: str = "train"
    columns: Mapping[str, str] = field(default_factory=dict)  # our field -> the dataset's column
    limit: int | None = None  # map-style: a fixed random sample (by `seed`); streamed: the first rows
    streaming: bool = False
    image_root: str | None = None  # relative image paths start here (default: the data file's folder)
    seed: int = 0
    # The share of rows whose user turns start with a capital letter (a fresh draw each training visit; a fixed
    # draw per row for evaluation): easy-VQA's questions are all lower case, the ones people type are not.
    capitalise: float = 0.0

    def __post_init__(self) -> None:
        if self.limit is not None and (not isinstance(self.limit, int) or self.limit < 1):
            raise DataError(f"{self.name}: limit = {self.limit!r}: must be an integer >= 1")
        try:
            share(self.capitalise, "capitalise")
        except InvalidValue as err:
            raise DataError(f"{self.name}: {err}") from None
        if self.kind not in KINDS:
            raise DataError(f"{self.name}: kind {self.kind!r} is not one of {list(KINDS)}")
        if sliced(self.split):
            split_names(self.split, self.name)  # a slice that does not parse fails here, not mid-run
            if self.streaming:
                stream_slice(self.split, self.name)
        fields = FIELDS[self.kind]
        for ours, theirs in self.columns.items():
            if ours not in fields:
                raise DataError(
                    f"{self.name}: columns.{ours}: not a field of kind {self.kind!r}; its fields: {', '.join(fields)}"
                )
            if not isinstance(theirs, str) or not theirs:
                raise DataError(f"{self.name}: columns.{ours} = {theirs!r}: must be a column name")


# -- opening --------------------------------------------------------------------------------------------------


GENERATED = ("scenes", "sort-of-clevr", "sort_of_clevr")  # sources generated here from seeds, never looked up


def open_data(spec: DataSpec) -> Rows:
    """`spec`'s rows, checked to fit its kind; `DataError` if they cannot (see the module docstring)."""
    from vlm.data.easy_vqa import load_easy_vqa_rows
    from vlm.data.sources import SOURCES

    if spec.kind == "vqa" and spec.name in ("easy-vqa", "easy_vqa"):
        if sliced(spec.split):
            parts = _packaged_splits(spec, lambda name: datasets.Dataset.from_list(load_easy_vqa_rows(name)))
            return Rows(spec, _sample(spec, _slice(spec, parts)), Path.cwd())
        rows = load_easy_vqa_rows(spec.split, limit=spec.limit, seed=spec.seed)
        return Rows(spec, datasets.Dataset.from_list(rows), Path.cwd())
    if spec.name in GENERATED:
        from vlm.data import scenes, sort_of_clevr

        if sliced(spec.split):
            raise DataError(
                f"{spec.name}: split {spec.split!r}: a generated source is not sliced; its train and test "
                "splits never share an image, and limit says how many rows to take"
            )
        generator = scenes if spec.name == "scenes" else sort_of_clevr
        try:  # `subset`: the skills to keep ("count,position")
            built = generator.load_rows(spec.kind, spec.split, limit=spec.limit, subset=spec.subset)
        except ValueError as err:
            raise DataError(f"{spec.name}: {err}") from None
        return Rows(spec, built, Path.cwd(), report=skip_report(built))
    if spec.kind == "caption" and spec.name in SOURCES:
        if sliced(spec.split):
            parts = _packaged_splits(spec, lambda name: SOURCES[spec.name](split=name))
            report = SkipReport(spec.name)  # what the builds of the splits skipped (unreadable files)
            for part in parts.values():
                if (part_report := skip_report(part)) is not None:
                    report.merge(part_report)
            return Rows(spec, _sample(spec, _slice(spec, parts)), Path.cwd(), report=report)
        built = SOURCES[spec.name](split=spec.split, limit=spec.limit)
        return Rows(spec, built, Path.cwd(), report=skip_report(built))
    if spec.name in SOURCES:  # not to be looked up on the hub under the same name
        kinds = "vqa or caption" if spec.name in ("easy-vqa", "easy_vqa") else "caption"
        raise DataError(f"{spec.name}: a packaged source of kind {kinds}, not {spec.kind}")
    if spec.streaming and sliced(spec.split):  # rows from the stream's start: skip, then take
        name, start, stop = stream_slice(spec.split, spec.name)
        dataset, root, report = _load(replace(spec, split=name))
        dataset = dataset.skip(start) if start else dataset
        dataset = dataset.take(stop - start) if stop is not None else dataset
    else:
        dataset, root, report = _load(spec)
    return Rows(
        spec,
        _sample(spec, dataset),
        Path(spec.image_root).expanduser() if spec.image_root else root,
        report=report,
    )


def _sample(
    spec: DataSpec, dataset: datasets.Dataset | datasets.IterableDataset
) -> datasets.Dataset | datasets.IterableDataset:
    """`spec.limit` rows: a fixed random sample by `spec.seed` (a stream: its first rows)."""
    if spec.limit is None:
        return dataset
    if isinstance(dataset, datasets.IterableDataset):
        return dataset.take(spec.limit)
    return dataset.select(random_sample(range(len(dataset)), spec.limit, spec.seed))


# -- sliced splits ("train[:5%]") -----------------------------------------------------------------------------


def sliced(split: str) -> bool:
    """Whether a split names a slice or several splits rather than one whole split."""
    return "[" in split or "+" in split


def split_names(split: str, source: str = "") -> list[str]:
    """The splits a sliced split reads, in order ("train[:90%]+test" -> train, test); `DataError` if `datasets`
    cannot parse it."""
    try:
        datasets.ReadInstruction.from_spec(split)
    except (ValueError, AssertionError) as err:
        raise DataError(
            f"{source}: split {split!r}: {err} (a slice reads like 'train[:5%]', 'train[100:]' or 'train+test')"
        ) from None
    return [part.split("[", 1)[0].strip() for part in split.split("+")]


_STREAM_SLICE = re.compile(r"^\s*([\w.]+)\[\s*(\d*)\s*:\s*(\d*)\s*\]\s*$")


def stream_slice(split: str, source: str = "") -> tuple[str, int, int | None]:
    """A streamed split's slice as (split, first row, row after the last or None): a stream is read from its
    start, so it is sliced by row numbers from there ("train[:1000]", "train[1000:]"); `DataError` for a
    percentage, a negative index or several splits, which need lengths a stream does not know."""
    if not sliced(split):
        return split, 0, None
    found = _STREAM_SLICE.match(split)
    if found is None:
        raise DataError(
            f"{source}: split {split!r}: a stream is sliced by rows from its start ('train[:1000]', "
            "'train[1000:]'); percentages, negative indices and several splits need its length: read it "
            "without streaming"
        )
    name, start, stop = found[1], int(found[2] or 0), int(found[3]) if found[3] else None
    if stop is not None and stop <= start:
        raise DataError(f"{source}: split {split!r} selects no row")
    return name, start, stop


def reads_rows_of(spec: DataSpec, whole: DataSpec) -> bool:
    """Whether `spec` reads rows that `whole` reads too, said from the specs alone: the same data (kind, name,
    subset, columns, image root), `whole` one unsliced split, and `spec` reading from it. An evaluation set
    that shares rows with a training source scores rows the model learns; two slices of one split are taken to
    be apart (their lengths decide, and the user chose them)."""
    same = (spec.kind, spec.name, spec.subset, dict(spec.columns), spec.image_root) == (
        whole.kind, whole.name, whole.subset, dict(whole.columns), whole.image_root
    )  # fmt: skip
    if not same or sliced(whole.split) or spec.name in GENERATED:  # generated: limit decides, never a slice
        return False
    from vlm.data.sources import SOURCES

    if (
        whole.split == "all" and spec.name in SOURCES
    ):  # a packaged source's "all" is its train and test splits
        return True
    return whole.split in (split_names(spec.split, spec.name) if sliced(spec.split) else [spec.split])


def _slice(spec: DataSpec, parts: Mapping[str, datasets.Dataset]) -> datasets.Dataset:
    """The rows `spec.split` selects from its whole splits `parts`, as `datasets` would select them."""
    lengths = {name: len(part) for name, part in parts.items()}
    # `to_absolute` clamps a start past the end to the length ("train[10:]" of 4 rows: 4 to 4), which `select`
    # refuses even for an empty range: such a piece selects no row, as `datasets` reads it.
    pieces = [
        parts[i.splitname].select(range(i.from_, i.to) if i.from_ < i.to else [])
        for i in datasets.ReadInstruction.from_spec(spec.split).to_absolute(lengths)
    ]
    rows = pieces[0] if len(pieces) == 1 else datasets.concatenate_datasets(pieces)
    if len(rows) == 0:
        sizes = ", ".join(f"{name} {n:,} rows" for name, n in lengths.items())
        raise DataError(f"{spec.name}: split {spec.split!r} selects no row ({sizes})")
    return rows


def _packaged_splits(spec: DataSpec, read: Callable[[str], datasets.Dataset]) -> dict[str, datasets.Dataset]:
    """Each whole split a sliced `spec.split` names of a packaged source, by `read(split)`."""
    parts = {}
    for name in split_names(spec.split, spec.name):
        try:
            parts[name] = read(name)
        except ValueError as err:  # a split the source does not have
            raise DataError(f"{spec.name}: split {spec.split!r}: {err}") from None
    return parts


def _load(spec: DataSpec) -> tuple[datasets.Dataset | datasets.IterableDataset, Path, SkipReport | None]:
    """The dataset `spec.name` names, the folder its relative image paths start from, and (for a JSON file
    read line by line) the report of its unreadable lines."""
    path = Path(spec.name).expanduser()
    looks_local = path.suffix.lower() in FILE_TYPES or spec.name.startswith((".", "/", "~"))
    if path.is_file():
        builder = FILE_TYPES.get(path.suffix.lower())
        if builder is None:
            raise DataError(f"{spec.name}: a data file must be one of {', '.join(FILE_TYPES)}")
        if sliced(spec.split):  # a file is one split, whatever it is called: read it whole, then slice it
            whole = _one_split(spec)
            data, root, report = _load(replace(spec, split=whole))
            return _slice(spec, {whole: data}), root, report
        try:
            data = _load_dataset(spec, builder, data_files={spec.split: str(path)})
            if not spec.streaming:
                return data, path.parent, None
            _peek(data)  # a file Arrow cannot read fails here, not mid-run
            return data, path.parent, None
        except (DataError, datasets.exceptions.DatasetGenerationError) as err:
            if builder != "json":
                raise DataError(f"{spec.name}: cannot be read as {builder}: {_cause(err)}") from None
            logger.warning(
                "%s: not a table datasets can read (%s); reading it line by line", path, _cause(err)
            )
            rows, report = _read_json_rows(path)  # the bad lines counted
            data = datasets.Dataset.from_dict({_JSON: [json.dumps(r) for r in rows]})
            return (data.to_iterable_dataset() if spec.streaming else data), path.parent, report
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():  # save_to_disk
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                names = split_names(spec.split, spec.name) if sliced(spec.split) else [spec.split]
                if missing := [name for name in names if name not in loaded]:
                    raise DataError(f"{spec.name}: no split {missing[0]!r}; splits are {list(loaded)}")
                parts = {name: loaded[name] for name in names}
            else:  # one saved Dataset is one split, whatever it is called
                parts = {_one_split(spec) if sliced(spec.split) else spec.split: loaded}
            if sliced(spec.split):
                return _slice(spec, parts), path, None
            loaded = parts[spec.split]
            return (loaded.to_iterable_dataset() if spec.streaming else loaded), path, None
        return _load_dataset(spec, str(path)), path, None
    if looks_local:
        raise DataError(f"{spec.name}: no such file or folder")
    return _load_dataset(spec, spec.name), Path.cwd(), None


def _one_split(spec: DataSpec) -> str:
    """The one split a sliced split of a file or of a saved Dataset may name (it has no other)."""
    names = split_names(spec.split, spec.name)
    if len(set(names)) > 1:
        raise DataError(
            f"{spec.name}: split {spec.split!r}: names {len(set(names))} splits; this data is one"
        )
    return names[0]


_JSON = "vlm_json"  # the one column of a JSON file read line by line: each row as JSON text


def _load_dataset(
    spec: DataSpec, path: str, data_files: dict[str, str] | None = None
) -> datasets.Dataset | datasets.IterableDataset:
    options: dict[str, Any] = {}
    if path == "csv" and data_files:  # every cell as written: pandas would read an answer "2" as 2.0
        with open(data_files[spec.split], encoding="utf-8", newline="") as f:
            header = next(csv.reader(f), [])
        options["features"] = datasets.Features({name: datasets.Value("string") for name in header})
    try:
        return datasets.load_dataset(
            path, spec.subset, data_files=data_files, split=spec.split, streaming=spec.streaming, **options
        )
    except datasets.exceptions.DatasetGenerationError:
        raise
    except Exception as err:  # no such hub id, no network, no such split or subset: all one message
        where = "the hub" if data_files is None and not Path(path).exists() else path
        raise DataError(f"{spec.name}: cannot load from {where}: {_cause(err)}") from None


def _cause(err: BaseException) -> str:
    """The innermost message of an exception chain, on one line."""
    while err.__cause__ is not None or err.__context__ is not None:
        err = err.__cause__ or err.__context__
    return " ".join(f"{type(err).__name__}: {err}".split())[:300]


def _peek(data: datasets.IterableDataset) -> dict[str, Any] | None:
    try:
        return next(iter(data.take(1)), None)
    except Exception as err:
        raise DataError(_cause(err)) from None


def _read_json_rows(path: Path) -> tuple[list[dict[str, Any]], SkipReport]:
    """A `.jsonl` (one object a line) or `.json` (an array of objects, or columns of one length) file's rows,
    the bad ones counted."""
    report = SkipReport(path.name)
    try:  # a .jsonl is JSON Lines (a one-line file is no table by columns); a .json that does not parse, too
        whole = None if path.suffix.lower() == ".jsonl" else json.loads(path.read_text("utf-8", "replace"))
    except json.JSONDecodeError:
        whole = None
    if whole is None:  # line by line, as the caption readers do
        items = list(read_jsonl(path))
    else:
        if isinstance(whole, dict) and _columnar(whole):  # {"image": [...], "question": [...]}
            whole = [dict(zip(whole, values, strict=True)) for values in zip(*whole.values(), strict=True)]
        items = list(enumerate(whole if isinstance(whole, list) else [whole]))
    ref = "line" if whole is None else "item"
    rows: list[dict[str, Any]] = []
    for number, item in items:
        if isinstance(item, dict):
            rows.append(item)
        else:  # read_jsonl's reason, or a value that is no object
            why = item if whole is None else f"expected a JSON object, got {type(item).__name__}"
            report.add(MALFORMED_LINE, f"{ref} {number}: {why}")
    report.total += len(rows)
    if not rows:
        raise DataError(f"{path}: no JSON object in it ({report.summary()})")
    return rows, report


def _columnar(table: dict[str, Any]) -> bool:
    """Whether a JSON object is a table by columns: lists of one length."""
    lengths = {len(v) if isinstance(v, list) else -1 for v in table.values()}
    return len(lengths) == 1 and -1 not in lengths


# -- rows -----------------------------------------------------------------------------------------------------


class Rows:
    """A source's rows (map-style or streamed) with its format resolved: `conversation(i, rng)` for training,
    `eval_rows()` for evaluation. `report` counts the rows lost before this point (unreadable lines)."""

    def __init__(
        self,
        spec: DataSpec,
        dataset: datasets.Dataset | datasets.IterableDataset,
        root: Path,
        report: SkipReport | None = None,
    ) -> None:
        self.spec, self.root = spec, root
        self.report = report
        self.eval_report: SkipReport | None = None  # what `eval_rows` kept and skipped
        self.streaming = isinstance(dataset, datasets.IterableDataset)
        self.dataset = _undecoded(dataset)
        self.columns = self._resolve_columns()
        self.format = self._format()
        self._length = self._measure()
        self._iterator: Iterator[dict[str, Any]] | None = None
        self._position = 0  # the stream's next row
        self._read = 0  # rows read since the stream last (re)started
        self._readable: set[Hashable] = set()  # images `eval_rows` has read, by `image_key`

    # The dataset's own columns: from its features, or (a stream of JSON) from its first row.
    def _dataset_columns(self) -> list[str]:
        if not self.streaming and _JSON in (self.dataset.column_names or []):
            keys: dict[str, None] = {}
            for text in self.dataset[:1000][_JSON]:
                keys |= dict.fromkeys(json.loads(text))
            return list(keys)
        if self.dataset.column_names is not None and _JSON not in self.dataset.column_names:
            return list(self.dataset.column_names)
        first = _peek(self.dataset)
        if first is None:
            return []
        return list(json.loads(first[_JSON])) if _JSON in first else list(first)

    def _resolve_columns(self) -> dict[str, str]:
        """Our field -> the dataset's column, for every field the dataset has; `DataError` when a mapped
        column does not exist or a required field is missing."""
        spec, have = self.spec, self._dataset_columns()
        missing_mapped = [
            f"columns.{ours} = {theirs!r}" for ours, theirs in spec.columns.items() if theirs not in have
        ]
        if missing_mapped:
            raise DataError(
                f"{spec.name}: no such column: {'; '.join(missing_mapped)}. Its columns: {', '.join(have) or 'none'}"
            )
        resolved = {f: spec.columns.get(f, f) for f in FIELDS[spec.kind] if spec.columns.get(f, f) in have}
        for name, others in FALLBACKS.items():
            fallback = next((c for c in others if c in have), None)
            if name in FIELDS[spec.kind] and name not in resolved and fallback is not None:
                resolved[name] = fallback
        needed = REQUIRED[spec.kind]
        absent = [f for f in needed if f not in resolved]
        if spec.kind == "chat" and not any(f in resolved for f in CHAT_FORMATS):
            absent = [" or ".join(CHAT_FORMATS)]
        if absent:
            hint = ", ".join(f"{f}: <column>" for f in needed if f not in resolved) or "messages: <column>"
            raise DataError(
                f"{spec.name}: kind {spec.kind!r} needs the field(s) {', '.join(absent)}, which the dataset "
                f"lacks (its columns: {', '.join(have) or 'none'}); name its columns with columns: {{{hint}}}"
                + _kind_hint(spec.kind, have)
            )
        return resolved

    def _format(self) -> str:
        if self.spec.kind != "chat":
            return self.spec.kind
        return next(f for f in CHAT_FORMATS if f in self.columns)

    def _measure(self) -> int:
        if not self.streaming:
            return len(self.dataset)
        name, start, stop = stream_slice(self.spec.split, self.spec.name)
        known = [n for n in (self.spec.limit, None if stop is None else stop - start) if n is not None]
        if known:  # `limit` past the end wraps around (`row`), so the card does not cap it
            return min(known)
        splits = self.dataset.info.splits if self.dataset.info else None
        if splits and name in splits and splits[name].num_examples:
            if splits[name].num_examples <= start:
                raise DataError(
                    f"{self.spec.name}: split {self.spec.split!r} selects no row ({name} has "
                    f"{splits[name].num_examples:,})"
                )
            return splits[name].num_examples - start
        raise DataError(
            f"{self.spec.name}: a streamed dataset of unknown length: set limit (the rows to read from it)"
        )

    def __len__(self) -> int:
        return self._length

    # -- access ---------------------------------------------------------------------------------------------

    def row(self, index: int) -> dict[str, Any]:
        """Row `index` as a plain dict of the dataset's columns. Streamed: read in order (asking for an
        earlier row restarts the stream, skipping to it); the stream wraps around at its end."""
        raw = self._stream_row(index) if self.streaming else self.dataset[index]
        return json.loads(raw[_JSON]) if _JSON in raw else raw

    def _stream_row(self, index: int) -> dict[str, Any]:
        if self._iterator is None or index < self._position:
            self._iterator, self._position, self._read = iter(self.dataset.skip(index)), index, 0
        while True:
            try:
                raw = next(self._iterator)
            except StopIteration:
                # Shorter than `limit`: its true length (counted when a skip ran past the end), then wrap.
                length = self._position if self._read else sum(1 for _ in self.dataset)
                if length == 0:
                    raise DataError(f"{self.spec.name}: the stream is empty") from None
                self._length, self._iterator = min(self._length, length), None
                return self._stream_row(index % self._length)
            except Exception as err:
                raise DataError(
                    f"{self.spec.name}: the stream broke at row {self._position}: {_cause(err)}"
                ) from None
            self._position += 1
            self._read += 1
            if self._position - 1 == index:
                return raw

    def conversation(self, index: int, rng: random.Random | None = None) -> list[Message]:
        """Row `index` as the conversation fine-tuning learns from; `BadRow` if it does not fit its format.
        `rng` draws a caption prompt, one caption of several, and whether the user turns are capitalised."""
        rng = rng or random.Random(f"{self.spec.seed}:{index}")
        conversation = self._conversation(self.row(index), rng)
        # No draw when the option is off, so that a source without it sees the draws it always saw.
        if self.spec.capitalise and rng.random() < self.spec.capitalise:
            return capitalised(conversation)
        return conversation

    def conversations(self, index: int) -> list[list[Message]]:
        """Every conversation `conversation(index, rng)` can give, whatever `rng` draws: a caption row's every
        prompt with each of its captions, any other row's one conversation, and each of those capitalised when
        `capitalise` may draw it. (What `vlm.pipeline.prepare_ahead` tokenises ahead of training, so that no
        draw misses.)"""
        row = self.row(index)
        if self.format != "caption":
            found = [self._conversation(row, random.Random(0))]  # draws nothing
        else:
            image, captions = self._image(row), self._captions(row)
            found = [
                [user(prompt, [image]), _assistant(caption)]
                for prompt in CAPTION_PROMPTS
                for caption in captions
            ]
        if self.spec.capitalise:
            found += [upper for upper in map(capitalised, found) if upper not in found]
        return found

    def _conversation(self, row: dict[str, Any], rng: random.Random) -> list[Message]:
        if self.format == "vqa":
            question, answers = self._question(row), self._answers(row)
            answer = Counter(answers).most_common(1)[0][0]
            return [user(question, [self._image(row)]), _assistant(answer)]
        if self.format == "caption":
            prompt, captions = rng.choice(CAPTION_PROMPTS), self._captions(row)
            caption = captions[0] if len(captions) == 1 else rng.choice(captions)  # one per visit
            return [user(prompt, [self._image(row)]), _assistant(caption)]
        return self._chat(row)

    def eval_rows(self) -> list[dict[str, Any]]:
        """Every usable row for `vlm.evaluate`: vqa {image, question, answers, question_type?, answer_type?},
        caption {image, captions}, chat {messages (up to the last user turn), reference (the last assistant
        turn)}. Rows that do not fit are counted into `self.report` (logged) and skipped."""
        report = SkipReport(self.spec.name)
        out = []
        for index in range(len(self)):
            try:
                out.append(self._eval_row(index))
            except BadRow as err:
                report.add(err.reason, f"row {index}: {err}")
        report.total += len(out)
        if self.report is not None:  # lines lost while reading the file
            report.total += self.report.skipped
            report.reasons.update(self.report.reasons)
            for reason, details in self.report.examples.items():
                report.examples.setdefault(reason, details)
        report.log()
        self.eval_report = report
        if not out:
            raise DataError(f"{self.spec.name}: no usable row ({report.summary()})")
        return out

    def _eval_row(self, index: int) -> dict[str, Any]:
        """Row `index` for evaluation, its images read once here so that an unreadable one costs its row."""
        row = self._eval_fields(index)
        images = [row["image"]] if "image" in row else [
            part["image"] for m in row["messages"] if isinstance(m["content"], list)
            for part in m["content"] if part["type"] == "image"
        ]  # fmt: skip
        for image in images:
            key = image_key(image)
            if key in self._readable:
                continue
            try:
                load_image(image)
            except ImageLoadError as err:
                raise BadRow("unreadable image", str(err)) from None
            self._readable.add(key)
        return row

    def _eval_fields(self, index: int) -> dict[str, Any]:
        row = self.row(index)
        # One fixed draw a row (not the training draw): the same rows are capitalised in every evaluation.
        upper = (
            self.spec.capitalise
            and random.Random(f"{self.spec.seed}:{index}").random() < self.spec.capitalise
        )
        if self.format == "vqa":
            question = _upper_first(self._question(row)) if upper else self._question(row)
            out = {"image": self._image(row), "question": question, "answers": self._answers(row)}
            for key in ("question_type", "answer_type"):
                if key in self.columns and row.get(self.columns[key]) not in (None, ""):
                    out[key] = str(row[self.columns[key]])
            return out
        if self.format == "caption":
            return {"image": self._image(row), "captions": self._captions(row)}
        messages = capitalised(self._chat(row)) if upper else self._chat(row)
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        if not any(m["role"] == "user" for m in messages[:last]):
            raise BadRow("no user turn", "nothing is asked before the last answer")
        return {"messages": messages[:last], "reference": messages[last]["content"]}

    # -- fields -----------------------------------------------------------------------------------------

    def _value(self, row: dict[str, Any], name: str) -> Any:
        column = self.columns.get(name)
        return row.get(column) if column is not None else None

    def _image(self, row: dict[str, Any], value: Any = None, name: str = "image") -> Any:
        value = self._value(row, name) if value is None else value
        return image_source(value, self.root)

    def _question(self, row: dict[str, Any]) -> str:
        question = self._value(row, "question")
        # a number or a list is no empty question: more likely columns mixed up
        if question is not None and not isinstance(question, str):
            raise BadRow("question not text", repr(question)[:80])
        if question is None or not question.strip():
            raise BadRow("empty question", repr(question)[:80])
        return question.strip()

    def _answers(self, row: dict[str, Any]) -> list[str]:
        answers = answer_strings(_maybe_json_list(self._value(row, "answers")))
        if not answers:
            raise BadRow("no answer", repr(self._value(row, "answers"))[:80])
        return answers

    def _captions(self, row: dict[str, Any]) -> list[str]:
        value = _maybe_json_list(self._value(row, "text"))
        values = value if isinstance(value, (list, tuple)) else [value]
        texts = [" ".join(v.split()) for v in values if isinstance(v, str) and v.strip()]
        if not texts:
            raise BadRow("empty caption", repr(value)[:80])
        return texts

    def _row_images(self, row: dict[str, Any]) -> list[Any]:
        """The row's images column (`images`, else `image`): one or a list, as image sources."""
        value = self._value(row, "images")
        if value is None:
            value = self._value(row, "image")
        value = _maybe_json_list(value)
        if value is None:
            return []
        values = value if isinstance(value, (list, tuple)) else [value]
        return [image_source(v, self.root) for v in values]

    def _chat(self, row: dict[str, Any]) -> list[Message]:
        images = self._row_images(row)
        if self.format == "messages":
            messages = chat_messages(self._value(row, "messages"), images, self.root)
        elif self.format == "conversations":
            messages = llava_messages(self._value(row, "conversations"), images)
        else:
            messages = cauldron_messages(self._value(row, "texts"), images)
        if not any(m["role"] == "assistant" for m in messages):
            raise BadRow("no assistant turn")
        return messages


def capitalised(conversation: list[Message]) -> list[Message]:
    """`conversation` with each user turn's text starting with a capital letter (its first text part)."""
    out = []
    for message in conversation:
        content = message.get("content")
        if message.get("role") == "user" and isinstance(content, str):
            message = {**message, "content": _upper_first(content)}
        elif message.get("role") == "user" and isinstance(content, list):
            parts = list(content)
            for i, part in enumerate(parts):
                if isinstance(part, dict) and part.get("type") == "text" and part.get("text"):
                    parts[i] = {**part, "text": _upper_first(part["text"])}
                    message = {**message, "content": parts}
                    break
        out.append(message)
    return out


def _upper_first(text: str) -> str:
    return text[:1].upper() + text[1:]


def _assistant(text: str) -> Message:
    return {"role": "assistant", "content": text}


def _kind_hint(kind: str, have: list[str]) -> str:
    """A nudge when the columns look like another kind's."""
    for other in KINDS:
        if other != kind and all(c in have for c in REQUIRED[other] or ("messages",)):
            return f" (they look like kind {other!r})"
    return ""


def _undecoded(dataset: datasets.Dataset | datasets.IterableDataset) -> Any:
    """Image columns (alone or in a list) left encoded: `load_image` decodes them when a batch is built."""
    features = dataset.features
    if not features:
        return dataset
    for name, feature in features.items():
        if isinstance(feature, ImageFeature) and feature.decode:
            dataset = dataset.cast_column(name, ImageFeature(decode=False))
        elif isinstance(feature, (datasets.List, datasets.Sequence)) and isinstance(
            getattr(feature, "feature", None), ImageFeature
        ):
            dataset = dataset.cast_column(name, datasets.List(ImageFeature(decode=False)))
    return dataset


def _maybe_json_list(value: Any) -> Any:
    """A CSV cell holding a JSON list (`["a", "b"]`) as that list; any other value as it is."""
    if isinstance(value, str) and value.startswith("[") and value.endswith("]"):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            return value
        return parsed if isinstance(parsed, list) else value
    return value


def answer_strings(value: Any) -> list[str]:
    """A string, a list of strings, or VQAv2's list of {"answer": ...} dicts -> non-empty answer strings."""
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, (list, tuple)):
        return []
    out = [a.get("answer") if isinstance(a, dict) else a for a in value]
    return [str(a).strip() for a in out if isinstance(a, (str, int, float)) and str(a).strip()]


_REMOTE = re.compile(r"^[a-z][a-z0-9+.-]*://", re.IGNORECASE)


def image_source(value: Any, root: Path) -> str | bytes | Any:
    """An image cell -> what `load_image` reads: encoded bytes, a path (relative ones start at `root`), or a
    PIL image. `BadRow` for a cell with no image in it or a URL (nothing is fetched)."""
    if isinstance(value, dict):  # an undecoded Image feature: {"bytes", "path"}
        if isinstance(value.get("bytes"), (bytes, bytearray)) and value["bytes"]:
            return bytes(value["bytes"])
        value = value.get("path")
    if isinstance(value, (bytes, bytearray)) and value:
        return bytes(value)
    if isinstance(value, str) and value.strip():
        if _REMOTE.match(value.strip()):
            raise BadRow("remote image", f"{value[:80]}: images are read from files, never fetched")
        return str(root / Path(value.strip()).expanduser())  # `/` keeps an absolute path
    if hasattr(value, "mode") and hasattr(value, "size"):  # a PIL image
        return value
    raise BadRow("no image", repr(value)[:80])


# -- chat formats -----------------------------------------------------------------------------------------


def chat_messages(value: Any, images: list[Any], root: Path) -> list[Message]:
    """transformers' chat format -> our messages. Image parts carry their image (`image`, `path`) or take the
    row's `images` in order; images left over (no image parts at all) go first in the first user turn."""
    if not isinstance(value, (list, tuple)) or not value:
        raise BadRow("no messages", repr(value)[:80])
    pending = list(images)
    messages: list[Message] = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant"):
            raise BadRow("bad message", f"message {i}: {repr(message)[:80]}")
        content = message.get("content")
        if isinstance(content, str):
            messages.append({"role": message["role"], "content": content})
            continue
        if not isinstance(content, (list, tuple)):
            raise BadRow("bad message", f"message {i}: content is {type(content).__name__}")
        parts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                parts.append({"type": "text", "text": str(part.get("text") or "")})
            elif kind == "image":
                data = part.get("image") or part.get("path")
                if data is None:
                    if not pending:
                        raise BadRow(
                            "images do not match", f"message {i} has more image parts than the row has images"
                        )
                    data = pending.pop(0)
                else:
                    data = image_source(data, root)
                parts.append({"type": "image", "image": data})
            else:
                raise BadRow("bad message", f"message {i}: unknown part {repr(part)[:80]}")
        if message["role"] == "assistant" and any(p["type"] == "image" for p in parts):
            raise BadRow("bad message", f"message {i}: an image in an assistant turn")
        if message["role"] == "assistant":  # our assistant turns are text: the template renders them so
            messages.append(
                {"role": "assistant", "content": "\n".join(p["text"] for p in parts if p["type"] == "text")}
            )
        else:
            messages.append({"role": message["role"], "content": parts})
    if pending and len(pending) != len(images):
        raise BadRow(
            "images do not match", f"{len(pending)} of the row's {len(images)} images have no image part"
        )
    return _images_first(messages, pending)


def llava_messages(value: Any, images: list[Any]) -> list[Message]:
    """LLaVA-Instruct's `conversations` -> our messages, each `<image>` tag where its image goes (in order);
    with no tag, the images go first in the first human turn (as LLaVA does)."""
    if not isinstance(value, (list, tuple)) or not value:
        raise BadRow("no conversation", repr(value)[:80])
    tags = sum(str(t.get("value", "")).count(IMAGE_TAG) for t in value if isinstance(t, dict))
    if tags and tags != len(images):
        raise BadRow("images do not match", f"{tags} {IMAGE_TAG} tags for {len(images)} images")
    pending = list(images)
    messages: list[Message] = []
    for i, turn in enumerate(value):
        speaker = turn.get("from") if isinstance(turn, dict) else None
        role = LLAVA_ROLES.get(speaker) if isinstance(speaker, str) else None
        text = turn.get("value") if isinstance(turn, dict) else None
        if role is None or not isinstance(text, str):
            raise BadRow("bad message", f"turn {i}: {repr(turn)[:80]}")
        if IMAGE_TAG not in text:
            messages.append({"role": role, "content": text})
            continue
        parts: list[dict[str, Any]] = []
        for j, piece in enumerate(text.split(IMAGE_TAG)):
            if j > 0:
                parts.append({"type": "image", "image": pending.pop(0)})
            if piece.strip():
                parts.append({"type": "text", "text": piece.strip()})
        messages.append({"role": role, "content": parts})
    return _images_first(messages, pending if not tags else [])


def cauldron_messages(value: Any, images: list[Any]) -> list[Message]:
    """The Cauldron's `texts` ([{"user": ..., "assistant": ...}]) -> our messages, the images in the first
    user turn."""
    if not isinstance(value, (list, tuple)) or not value:
        raise BadRow("no conversation", repr(value)[:80])
    messages: list[Message] = []
    for i, turn in enumerate(value):
        if (
            not isinstance(turn, dict)
            or not isinstance(turn.get("user"), str)
            or not isinstance(turn.get("assistant"), str)
        ):
            raise BadRow("bad message", f"turn {i}: {repr(turn)[:80]}")
        messages += [{"role": "user", "content": turn["user"]}, _assistant(turn["assistant"])]
    return _images_first(messages, images)


def _images_first(messages: list[Message], images: list[Any]) -> list[Message]:
    """`images` put before the text of the first user turn."""
    if not images:
        return messages
    first = next((i for i, m in enumerate(messages) if m["role"] == "user"), None)
    if first is None:
        raise BadRow("images do not match", "images but no user turn")
    content = messages[first]["content"]
    parts = [{"type": "text", "text": content}] if isinstance(content, str) else list(content)
    messages[first] = {
        "role": "user",
        "content": [*({"type": "image", "image": im} for im in images), *parts],
    }
    return messages
