"""Strict safetensors loading and saving with Hugging Face key names.

A checkpoint is a folder (or a hub id resolved to one) holding `config.json` and `model.safetensors`, or
shards listed in `model.safetensors.index.json`. Weights are read with `safetensors` only: pickle files
(`pytorch_model.bin`, `*.pt`) are refused, never unpickled, because unpickling runs arbitrary code.

Loading is "strip the prefix, strict `load_state_dict`" (big_vision's `merge_params` habit): a checkpoint
that does not fit raises one `CheckpointError` listing the missing keys, the unexpected keys and the shape
mismatches; what is skipped on purpose (a SigLIP text tower when only the vision tower is wanted) is named
in an explicit ignore list.

This layer sits above the towers: it builds them from files (`load_vision_encoder`, `load_siglip_model`) and
writes them back (`save_vision_encoder`, `save_siglip_model`), while the towers know nothing of files.

Everything `vlm` writes goes through here: output paths are checked before the work that produces them
(`check_output_file`, `check_output_folder`), and files and folders are written under a temporary name and
renamed into place (`atomic_file`, `atomic_folder`), so a failure never leaves a half-written result.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

# CheckpointError lives in vlm.checks, below the towers, whose config from_dicts raise it too.
from vlm.checks import CheckpointError, json_object
from vlm.siglip import SiglipVisionConfig, SiglipVisionEncoder
from vlm.siglip_model import SiglipConfig, SiglipModel

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

# Key prefixes of the vision tower in the checkpoints we read: `SiglipModel` and `SiglipVisionModel` as
# saved by transformers 4.x ("vision_model."), and `SiglipVisionModel` as saved by transformers 5 (none).
VISION_PREFIX = "vision_model."
# A `SiglipModel` checkpoint also holds these; a vision encoder skips them on purpose.
NOT_VISION = ("text_model.", "logit_scale", "logit_bias")
# Non-persistent buffers that older transformers versions wrote into some `SiglipModel` checkpoints; skipped on
# purpose (our position ids are implicit).
SIGLIP_IGNORED_KEYS = ("text_model.embeddings.position_ids", "vision_model.embeddings.position_ids")


def resolve_checkpoint(name_or_path: str | Path, allow_patterns: Iterable[str] | None = None) -> Path:
    """A local folder as is, or a hub id resolved to a local snapshot (cache first, network if allowed).

    Anything that looks like a filesystem path (absolute, `./`, `~`, or existing) is never sent to the hub,
    so a typo in a local path fails at once with a clear message instead of a network error."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{path} is a file, not a checkpoint folder (config.json + {SAFETENSORS})")
        return path
    text = str(name_or_path)
    if path.is_absolute() or text.startswith((".", "~")) or text.count("/") != 1:
        raise CheckpointError(f"no checkpoint folder at {text} (and it is not a hub id of the form org/name)")
    from huggingface_hub import snapshot_download

    patterns = list(allow_patterns or ["config.json", "*.safetensors", SAFETENSORS_INDEX])
    try:
        return Path(snapshot_download(text, allow_patterns=patterns))
    except Exception as err:  # offline, unknown repo, gated repo: all end the same way for the user
        raise CheckpointError(
            f"{text} is not a local folder and the hub could not provide it ({type(err).__name__}: {err}). "
            "Without a network, pass a local folder holding config.json + model.safetensors."
        ) from err


def read_config(folder: Path) -> dict[str, Any]:
    """The folder's `config.json` as a dict; a missing file, or one that is not a JSON object, is a
    `CheckpointError` naming the file."""
    return read_json(folder / "config.json", f"{folder} has no config.json")


def read_json(file: Path, missing: str) -> dict[str, Any]:
    """A JSON file that must hold an object; `missing` is the error's text when there is no such file."""
    if not file.is_file():
        raise CheckpointError(missing)
    try:
        return json_object(json.loads(file.read_text(encoding="utf-8")), str(file))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{file} is not valid JSON: {err}") from None


def safetensors_files(folder: Path) -> dict[str, Path] | list[Path]:
    """The weight files of a checkpoint: the index's key -> shard map when sharded, else one file."""
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        weight_map = read_json(index, "").get("weight_map")
        if not isinstance(weight_map, dict) or not all(
            isinstance(shard, str) and shard and Path(shard).name == shard for shard in weight_map.values()
        ):  # a shard name with a folder in it could point outside the checkpoint
            raise CheckpointError(f"{index}: weight_map must map each key to a shard file name in {folder}")
        return {key: folder / shard for key, shard in weight_map.items()}
    if (folder / SAFETENSORS).is_file():
        return [folder / SAFETENSORS]
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{folder} holds only pickle weights ({', '.join(pickles)}); vlm reads safetensors only and never "
            "unpickles files (that can run arbitrary code). Convert them once in a trusted environment, e.g. "
            "transformers' `Model.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)`."
        )
    raise CheckpointError(f"{folder} has no {SAFETENSORS} (nor {SAFETENSORS_INDEX})")


def read_safetensors(folder: Path, keep: Callable[[str], bool] = lambda key: True) -> dict[str, torch.Tensor]:
    """Read the tensors whose key passes `keep`, opening only the shards that hold such keys."""
    files = safetensors_files(folder)
    if isinstance(files, dict):
        shards = sorted({shard for key, shard in files.items() if keep(key)})
    else:
        shards = files
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        if not shard.is_file():
            raise CheckpointError(
                f"shard {shard.name} listed in {SAFETENSORS_INDEX} is missing from {folder}"
            )
        try:
            with safe_open(shard, framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                    if keep(key):
                        state[key] = f.get_tensor(key)
        except CheckpointError:
            raise
        except Exception as err:  # a header that does not parse, a truncated file
            raise CheckpointError(f"{shard} is not a readable safetensors file: {err}") from err
    return state


def load_strict(module: nn.Module, state: dict[str, torch.Tensor], what: str, assign: bool = False) -> None:
    """`load_state_dict(strict=True)` with one error that lists every problem at once, sorted. `assign`: the
    tensors become the module's (a module built on the meta device), each in the checkpoint's dtype."""
    check_fits({k: v.shape for k, v in module.state_dict().items()}, state, what)
    if assign:  # fresh allocations: a view into a safetensors file is not aligned as kernels expect, and a
        # matmul over it may round differently
        state = {k: v.clone() for k, v in state.items()}
    module.load_state_dict(state, strict=True, assign=assign)


def check_fits(expected: dict[str, torch.Size], state: dict[str, torch.Tensor], what: str) -> None:
    """One `CheckpointError` listing every key of `state` that does not fit the `expected` shapes: missing,
    unexpected and mis-shaped, sorted ("{what} does not fit the model: ...")."""
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    mismatched = sorted(
        f"{key}: checkpoint {tuple(state[key].shape)} vs model {tuple(expected[key])}"
        for key in expected.keys() & state.keys()
        if tuple(state[key].shape) != tuple(expected[key])
    )
    raise_problems(
        f"{what} does not fit the model:",
        [("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)],
    )


def raise_problems(header: str, problems: list[tuple[str, list[str]]]) -> None:
    """One `CheckpointError`: `header`, then a line per kind of problem that has items ("  missing (3): a, b,
    c"; the first 20 named); nothing when there are none."""
    lines = [header] + [
        f"  {title} ({len(items)}): " + ", ".join(items[:20]) + (" ..." if len(items) > 20 else "")
        for title, items in problems
        if items
    ]
    if len(lines) > 1:
        raise CheckpointError("\n".join(lines))


# --- the SigLIP vision tower: transformers' `SiglipVisionModel` (or the vision half of a `SiglipModel`) --------


# A vlm model folder's config.json "format" (`vlm.model.FORMAT`): here, below the model, so that the SigLIP
# loaders can name such a folder when it is given for a SigLIP one.
VLM_FORMAT = "vlm.VisionLanguageModel"


def not_siglip(config: dict[str, Any], folder: Path, expected: str) -> CheckpointError:
    """The error for a folder that is not the SigLIP checkpoint asked for: what it holds, then `expected`. A
    vlm model folder (which has no model_type) is named as one, with the SigLIP folder to give instead."""
    if config.get("format") == VLM_FORMAT:
        return CheckpointError(
            f"{folder} is a vlm model folder (a whole vision-language model), not a SigLIP checkpoint: give a "
            "SigLIP folder, e.g. the shipped vlm/default_siglip"
        )
    model_type = config.get("model_type")
    what = f"holds a {model_type!r} checkpoint" if model_type else "has no model_type in its config.json"
    return CheckpointError(f"{folder} {what}; {expected}")


def vision_config_from(config: dict[str, Any], folder: Path) -> SiglipVisionConfig:
    """The vision tower's config from a `SiglipModel` or `SiglipVisionModel` `config.json` dict."""
    if config.get("model_type") not in ("siglip", "siglip_vision_model"):
        raise not_siglip(
            config, folder, "expected a SigLIP one (model_type 'siglip' or 'siglip_vision_model')"
        )
    try:
        return SiglipVisionConfig.from_dict(config)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{folder}/config.json has an invalid vision config: {err}") from err


def vision_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """The vision tower's tensors with the checkpoint prefix stripped; text-tower keys skipped on purpose."""
    state = read_safetensors(folder, keep=lambda key: not key.startswith(NOT_VISION))
    if not any(key.startswith(VISION_PREFIX) for key in state):
        return state  # the transformers 5 `SiglipVisionModel` layout: keys equal ours
    stray = sorted(key for key in state if not key.startswith(VISION_PREFIX))
    if stray:  # a prefixed checkpoint with unprefixed extras: never let them shadow the real keys
        raise CheckpointError(
            f"{folder} mixes {VISION_PREFIX}* keys with unexpected ones: {', '.join(stray[:20])}"
        )
    return {key.removeprefix(VISION_PREFIX): value for key, value in state.items()}


def load_vision_encoder(
    name_or_path: str | Path,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> SiglipVisionEncoder:
    """Build a `SiglipVisionEncoder` from a `SiglipModel` or `SiglipVisionModel` checkpoint (hub id or local
    folder, e.g. `google/siglip-base-patch16-224`), strictly; a `SiglipModel`'s text tower is skipped."""
    folder = resolve_checkpoint(name_or_path)
    config = vision_config_from(read_config(folder), folder)
    encoder = SiglipVisionEncoder(config)
    load_strict(encoder, vision_state_dict(folder), f"the vision tower in {folder}")
    return encoder.to(device=device, dtype=dtype).eval()


def save_vision_encoder(encoder: SiglipVisionEncoder, directory: str | Path) -> Path:
    """Write the `SiglipVisionModel` format of transformers 5: `config.json` + unprefixed safetensors."""
    directory = Path(directory)
    config = {
        "architectures": ["SiglipVisionModel"],
        "model_type": "siglip_vision_model",
        "dtype": str(next(encoder.parameters()).dtype).removeprefix("torch."),
        **encoder.config.to_dict(),
    }
    state = {key: value.detach().contiguous().cpu() for key, value in encoder.state_dict().items()}
    save_checkpoint(directory, config, state)
    return directory


# --- the SigLIP dual encoder: transformers' `SiglipModel` format ----------------------------------------------


def siglip_config_from(config: dict[str, Any], folder: Path) -> SiglipConfig:
    """The dual encoder's config from a `SiglipModel` `config.json` dict (model_type "siglip")."""
    if config.get("model_type") != "siglip":
        raise not_siglip(
            config,
            folder,
            "a SigLIP dual encoder needs a 'siglip' one (a SiglipModel with text_config and vision_config)",
        )
    try:
        return SiglipConfig.from_dict(config)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{folder}/config.json has an invalid SigLIP config: {err}") from err


def load_siglip_model(
    name_or_path: str | Path,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> SiglipModel:
    """Build a `SiglipModel` from a transformers `SiglipModel` checkpoint (hub id or local folder, e.g.
    `google/siglip-base-patch16-224`): every key must fit, strictly."""
    folder = resolve_checkpoint(name_or_path)
    model = SiglipModel(siglip_config_from(read_config(folder), folder))
    state = read_safetensors(folder, keep=lambda key: key not in SIGLIP_IGNORED_KEYS)
    load_strict(model, state, f"the SigLIP model in {folder}")
    return model.to(device=device, dtype=dtype).eval()


def save_siglip_model(model: SiglipModel, directory: str | Path) -> Path:
    """Write transformers' `SiglipModel` format: `config.json` (model_type "siglip", text_config,
    vision_config) + `model.safetensors` with the full keys."""
    directory = Path(directory)
    config = model.config.to_dict()
    config["text_config"]["model_type"] = "siglip_text_model"
    config["vision_config"]["model_type"] = "siglip_vision_model"
    config |= {
        "architectures": ["SiglipModel"],
        "model_type": "siglip",
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "initializer_factor": 1.0,
    }
    state = {key: value.detach().contiguous().cpu() for key, value in model.state_dict().items()}
    save_checkpoint(directory, config, state)
    return directory


# --- writing ----------------------------------------------------------------------------------------------------


def save_checkpoint(directory: Path, config: dict[str, Any], state: dict[str, torch.Tensor]) -> None:
    """Write config.json + model.safetensors, each to a temporary name first and then renamed into place, so
    an interrupted save never leaves a half-written file under the real name."""
    with atomic_file(directory / SAFETENSORS) as tmp:
        save_file(state, tmp, metadata={"format": "pt"})
    with atomic_file(directory / "config.json") as tmp:
        tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def check_output_file(
    path: str | Path, what: str = "the output file", apart_from: Iterable[str | Path] = ()
) -> Path:
    """Refuse, before any work, a file path that cannot be written: an existing folder, a parent that is a
    file or not writable, or (with `apart_from`, the files the work reads) one of those files, which writing
    would replace. Nothing is created. Returns the path."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise ValueError(f"{what} {path} is a folder; give the path of a file")
    target = path.resolve()  # a link, or another spelling ("./x", "sub/../x"), names the same file
    for source in apart_from:
        if Path(source).expanduser().resolve() == target:
            raise ValueError(
                f"{what} {path} is the input file {source}; give another path (in place is refused)"
            )
    _check_creatable(path.parent, what, path)
    return path


def check_output_folder(
    path: str | Path,
    what: str = "the output folder",
    empty: bool = False,
    apart_from: str | Path | None = None,
) -> Path:
    """Refuse, before any work, a folder that cannot be written: an existing file, a non-empty folder when
    `empty` (its files would mix with the new ones), a parent that is a file or not writable, or (with
    `apart_from`, the folder the work reads) that folder itself, one inside it or one holding it. Nothing is
    created. Returns the path."""
    path = Path(path).expanduser()
    if apart_from is not None:
        source, target = Path(apart_from).expanduser().resolve(), path.resolve()
        if target == source:
            raise ValueError(
                f"{what} {path} is the input folder itself; give a new folder (in place is refused)"
            )
        if source in target.parents:
            raise ValueError(f"{what} {path} is inside the input folder {apart_from}; give one outside it")
        if target in source.parents:
            raise ValueError(f"{what} {path} holds the input folder {apart_from}; give a new folder")
    if path.exists() and not path.is_dir():
        raise ValueError(f"{what} {path} is a file, not a folder")
    if path.is_dir():
        if empty and any(path.iterdir()):
            raise ValueError(f"{what} {path} already exists and is not empty; choose a new folder")
        _check_creatable(path, what, path)
    else:
        _check_creatable(path.parent, what, path)
    return path


def _check_creatable(folder: Path, what: str, path: Path) -> None:
    """`folder` exists and is writable, or can be made: its nearest existing ancestor is a writable folder."""
    existing = folder.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"cannot write {what} {path}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write {what} {path}: {existing} is not writable")


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write to; on success it is renamed to `path` (readable like any
    new file), on failure removed, so `path` is never half-written. Parent folders are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a saved file should read like any other
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside `path` to fill; on success it becomes `path` (which must not exist, or
    be an empty folder), on failure it is removed with everything in it."""
    path = Path(path)
    check_output_folder(path, empty=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
        if path.is_dir():
            path.rmdir()  # empty (checked above); a file put there meanwhile makes this fail, not vanish
        os.rename(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
