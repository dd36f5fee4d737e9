"""National flags captioned "the flag of France", named by ISO 3166 (iso-codes).

Packages: iso-flags-png-320x240 and iso-codes. 224 train / 32 test pairs. The 320 x 240 PNGs are squashed
to the square like any photo the SigLIP processor sees.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

import datasets
from datasets import Features, Value

from vlm.data import common

FLAGS_DIR = "/usr/share/iso-flags-png-320x240"
ISO_3166 = "/usr/share/iso-codes/json/iso_3166-1.json"
_VERSION = 1
FEATURES = Features({**common.PAIR_FEATURES, "code": Value("string")})

# ISO's reference names are for sorting ("Korea, Republic of"); iso-codes' `common_name` fixes most, these
# the rest. Flags in the package that are not countries are named here too; the others (a generic flag,
# "zz", ...) are skipped.
_FLAG_NAMES = {
    "cd": "the Democratic Republic of the Congo",
    "cg": "the Republic of the Congo",
    "fm": "Micronesia",
    "ps": "Palestine",
    "vg": "the British Virgin Islands",
    "vi": "the U.S. Virgin Islands",
    "fk": "the Falkland Islands",
    "va": "Vatican City",
    "eu": "the European Union",
    "_united_nations": "the United Nations",
    "_scotland": "Scotland",
    "_wales": "Wales",
    "_catalonia": "Catalonia",
    "_galicia": "Galicia",
    "_basque": "the Basque Country",
}
_NEEDS_THE = re.compile(
    r"\b(Republic|Islands|Kingdom|States|Emirates|Federation|Union|Netherlands|Philippines|Bahamas|Gambia|"
    r"Maldives|Comoros|Seychelles|Holy See|Territory|Territories)\b"
)


def build(
    split: common.Split = "train", size: int | None = 64, limit: int | None = None, *, cache: bool = True
) -> datasets.Dataset:
    """The flags, squashed to `size` x `size` (None: kept 320 x 240).

    249 of the 262 files are named; the rest are not flags of a place and are skipped. Held out by the
    file's bytes, so identical flags (Norway and Svalbard) stay on one side. Columns: image, text, source,
    code (ISO alpha-2, lower case)."""
    folder = common.require(FLAGS_DIR, "iso-flags-png-320x240")
    table = json.loads(common.require(ISO_3166, "iso-codes").read_text(encoding="utf-8"))["3166-1"]
    names = {e["alpha_2"].lower(): e.get("common_name", e["name"]) for e in table} | _FLAG_NAMES
    files = common.held_out(
        sorted(folder.glob("*.png")), split, lambda f: hashlib.sha1(f.read_bytes()).hexdigest()
    )
    items = [
        {"code": f.stem, "path": str(f), "text": flag_caption(names[f.stem]) if f.stem in names else ""}
        for f in common.hash_sample(files, lambda f: f.stem, limit)
    ]
    return common.build_rows("flags", items, _read, FEATURES, version=_VERSION, cache=cache, size=size)


def flag_caption(name: str) -> str:
    """ "France" -> "the flag of France", "United States" -> "the flag of the United States"."""
    if not name.startswith("the ") and _NEEDS_THE.search(name):
        name = f"the {name}"
    return f"the flag of {name}"


def _read(item: dict[str, Any], size: int | None) -> dict[str, Any]:
    if not item["text"]:
        raise common.Skip("no name", item["path"])
    return {**item, "image": common.read_image(item["path"], item["code"], size), "source": "flags"}
