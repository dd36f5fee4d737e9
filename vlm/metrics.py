"""Evaluation metrics: VQA accuracy (VQAv2's answer normalisation and soft score), captioning BLEU-4 and
CIDEr-D, and a per-type breakdown.

References
- VQA accuracy: Antol et al., "VQA: Visual Question Answering" (ICCV 2015) and the official evaluation code,
  `vqaEval.py` in github.com/GT-Vision-Lab/VQA (`processPunctuation`, `processDigitArticle`, and the accuracy
  min(#humans that gave the answer / 3, 1) averaged over the 10 subsets of 9 of the 10 annotators).
- BLEU-4 and CIDEr-D: the COCO caption evaluation code (`pycocoevalcap`, Chen et al. 2015; CIDEr by Vedantam
  et al. 2015). Its scorers are called as they are; only its tokenizer is replaced (below).

Deliberate deviations
- The official VQA code normalises the *prediction* fully but the human answers only by punctuation, because
  VQAv2's answers are already normalised by its collection pipeline. Here both sides get the full
  normalisation, so that other data sets ("Two" vs "2", "A circle" vs "circle") are judged alike; on VQAv2's
  own answers this changes nothing.
- The official contractions table has keys with capitals ("Im", "Ive") that can never match after its own
  lower-casing; ours is written lower-case (and covers the common contractions, not every entry).
- The official period rule is the regex `(?!<=\\d)(\\.)(?!\\d)`, a mistyped look-behind that in effect
  removes every period not followed by a digit, with `re.UNICODE` passed as the replacement *count* (32).
  We keep the effective behaviour (strip every period not followed by a digit) without the count limit.
- Soft score by answer-set size: 10 or more human answers use the official leave-one-out average; 2 to 9
  use min(count / 3, 1) directly (leave-one-out over 3 answers would cap a unanimous answer at 2/3); a
  single answer is exact match after normalisation (easy-VQA and other single-answer sets).
- Captions are tokenised in Python (`caption_tokens`: lower-case, clitics split as Penn Treebank does, the
  punctuation the COCO code removes removed), not by the Stanford PTBTokenizer, which needs Java. Scores can
  differ slightly from a Java-tokenised run on text with unusual punctuation.
"""

from __future__ import annotations

import contextlib
import io
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from typing import NamedTuple

# -- VQA answer normalisation (vqaEval.py) ----------------------------------------------------------------

# A user-facing subset of the official table, lower-case: the written-without-apostrophe form -> the usual one.
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldntve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hasnt": "hasn't", "havent": "haven't", "hed": "he'd", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "id've": "i'd've", "i'dve": "i'd've", "im": "i'm",
    "ive": "i've", "isnt": "isn't", "itd": "it'd", "itll": "it'll", "maam": "ma'am", "mightnt": "mightn't",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "oclock": "o'clock",
    "shant": "shan't", "shouldve": "should've", "shouldnt": "shouldn't", "somebodys": "somebody's",
    "someones": "someone's", "thats": "that's", "theres": "there's", "theyd": "they'd", "theyll": "they'll",
    "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", "weve": "we've",
    "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've",
    "whens": "when's", "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "yall": "y'all",
    "youd": "you'd", "youll": "you'll", "youre": "you're", "youve": "you've",
}  # fmt: skip
NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
ARTICLES = frozenset({"a", "an", "the"})
# The official list, in its order. Apostrophes, colons, '%', '$', '#', '&', '*' are kept on purpose.
PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]  # fmt: skip
_COMMA_IN_NUMBER = re.compile(r"(\d)(,)(\d)")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")


def process_punctuation(text: str) -> str:
    """`processPunctuation`: a mark touching a space, or any mark in a text with a comma inside a number
    ("1,000"), is deleted ("yes!" -> "yes", "1,000" -> "1000"); otherwise it becomes a space ("black/white"
    -> "black white"). Then every period not followed by a digit goes ("2.5" keeps its point)."""
    out = text
    number_with_comma = _COMMA_IN_NUMBER.search(text) is not None
    for mark in PUNCTUATION:
        if mark + " " in text or " " + mark in text or number_with_comma:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out)


def process_digit_article(text: str) -> str:
    """`processDigitArticle`: lower-case, number words to digits ("two" -> "2", "none" -> "0"), drop the
    articles a/an/the, restore apostrophes in contractions ("dont" -> "don't"), single spaces."""
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    return " ".join(CONTRACTIONS.get(word, word) for word in words if word not in ARTICLES)


def normalize_answer(text: str) -> str:
    """The VQAv2 answer normalisation: newlines/tabs to spaces, strip, punctuation, then digits/articles."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


def answer_counts(pairs: Iterable[tuple[str, str]]) -> dict[str, Counter[str]]:
    """(group, answer) pairs as each group's answers counted, normalised as scored ("One." is "1"): what a
    blind guess (`vlm.skills.blind_guess`) and an evaluation's answer spread read their commonest answers from."""
    counts: defaultdict[str, Counter[str]] = defaultdict(Counter)
    for group, answer in pairs:
        counts[group][normalize_answer(answer)] += 1
    return dict(counts)


# -- VQA scores --------------------------------------------------------------------------------------------


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when the normalised prediction equals any normalised answer, else 0.0."""
    predicted = normalize_answer(prediction)
    return float(any(predicted == normalize_answer(answer) for answer in answers))


def soft_score(prediction: str, answers: Sequence[str]) -> float:
    """min(#answers equal to the prediction / 3, 1), all normalised: the paper's formula."""
    predicted = normalize_answer(prediction)
    return min(sum(predicted == normalize_answer(a) for a in answers) / 3, 1.0)


def leave_one_out_soft_score(prediction: str, answers: Sequence[str]) -> float:
    """The official VQAv2 accuracy: min(#matches among the *other* answers / 3, 1) for each annotator left
    out in turn (the 10 subsets of 9 of 10 annotators), averaged.

    Example: 2 of 10 humans said "yes". Leaving out one of those two leaves 1 match (1/3); leaving out any of
    the other 8 leaves 2 (2/3); (2 * 1/3 + 8 * 2/3) / 10 = 0.6, where min(2/3, 1) alone gives 0.667."""
    if not answers:
        raise ValueError("leave_one_out_soft_score needs at least one human answer")
    predicted = normalize_answer(prediction)
    matches = sum(predicted == normalize_answer(a) for a in answers)
    # Leaving out a matching annotator leaves matches - 1, any other one leaves all of them.
    return (matches * min((matches - 1) / 3, 1.0) + (len(answers) - matches) * min(matches / 3, 1.0)) / len(
        answers
    )


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """The VQA score of one prediction against its human answers, by the size of the answer set: one answer
    -> exact match; 2-9 -> `soft_score`; 10 or more (VQAv2) -> `leave_one_out_soft_score`."""
    if not answers:
        raise ValueError("a VQA question needs at least one reference answer")
    if len(answers) == 1:
        return exact_match(prediction, answers)
    if len(answers) < 10:
        return soft_score(prediction, answers)
    return leave_one_out_soft_score(prediction, answers)


# -- per-type breakdown ------------------------------------------------------------------------------------


class GroupScore(NamedTuple):
    mean: float
    count: int


def breakdown(scores: Sequence[float], types: Sequence[str | None]) -> dict[str, GroupScore]:
    """Mean score per type, sorted by type name; items whose type is None are left out."""
    if len(scores) != len(types):
        raise ValueError(f"{len(scores)} scores but {len(types)} types")
    groups: dict[str, list[float]] = defaultdict(list)
    for score, kind in zip(scores, types, strict=True):
        if kind is not None:
            groups[str(kind)].append(score)
    return {kind: GroupScore(sum(v) / len(v), len(v)) for kind, v in sorted(groups.items())}


# -- captioning ---------------------------------------------------------------------------------------------

# What the COCO code removes after PTB tokenisation (its PUNCTUATIONS), plus the raw brackets and quotes that
# PTBTokenizer would have rewritten into the -LRB-/``/'' forms on that list.
CAPTION_PUNCTUATION = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"]
    + ["(", ")", "{", "}", "[", "]", '"']
)
_CLITIC = re.compile(r"(?<=\w)(n't|'s|'re|'ve|'ll|'d|'m)\b")
# a word (hyphens, inner periods, slashes and apostrophes kept, as PTB keeps "black-and-white" and "3.5"),
# a split-off clitic, a run of periods or dashes, or any other single mark
_CAPTION_TOKEN = re.compile(r"n't|'(?:s|re|ve|ll|d|m)\b|\w+(?:[-./']\w+)*|\.{2,}|-{2,}|\S")


def caption_tokens(text: str) -> str:
    """Lower-case, Penn-Treebank-like tokens joined by spaces, punctuation dropped, as the COCO caption
    evaluation feeds its scorers: "A dog's toy, on the grass." -> "a dog 's toy on the grass"."""
    text = _CLITIC.sub(r" \1", text.lower().replace("\n", " "))
    return " ".join(t for t in _CAPTION_TOKEN.findall(text) if t not in CAPTION_PUNCTUATION)


class CaptionScores(NamedTuple):
    bleu4: float  # corpus BLEU-4, "closest" reference length, as in the COCO evaluation
    cider: float  # CIDEr-D (the COCO code's "CIDEr"), the mean of `cider_per_item`
    bleu4_per_item: list[float]
    cider_per_item: list[float]


def caption_scores(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> CaptionScores:
    """BLEU-4 and CIDEr-D of predicted captions against each one's reference captions.

    CIDEr's n-gram weights (idf) come from the references of this very set, as in the COCO evaluation, so it
    is a corpus-level score: one item alone always scores 0 (every n-gram is in every "document")."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference sets")
    if not predictions:
        raise ValueError("caption_scores needs at least one prediction")
    if any(not refs for refs in references):
        raise ValueError("every prediction needs at least one reference caption")
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
    except ImportError:
        raise ImportError("captioning metrics need pycocoevalcap: pip install pycocoevalcap") from None
    res = {i: [caption_tokens(p)] for i, p in enumerate(predictions)}
    gts = {i: [caption_tokens(r) for r in refs] for i, refs in enumerate(references)}
    with contextlib.redirect_stdout(io.StringIO()):  # the BLEU scorer prints its length statistics
        bleu, bleu_items = Bleu(4).compute_score(gts, res, verbose=0)
    cider, cider_items = Cider().compute_score(gts, res)
    return CaptionScores(
        bleu4=float(bleu[3]),
        cider=float(cider),
        bleu4_per_item=[float(x) for x in bleu_items[3]],
        cider_per_item=[float(x) for x in cider_items],
    )


def mean(values: Iterable[float]) -> float:
    """The arithmetic mean; 0.0 for no values (an empty evaluation has nothing right)."""
    values = list(values)
    return sum(values) / len(values) if values else 0.0


__all__ = [
    "CaptionScores",
    "GroupScore",
    "breakdown",
    "caption_scores",
    "caption_tokens",
    "exact_match",
    "leave_one_out_soft_score",
    "mean",
    "normalize_answer",
    "process_digit_article",
    "process_punctuation",
    "soft_score",
    "vqa_accuracy",
]
