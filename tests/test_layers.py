"""The shape of the library (ARCHITECTURE.md): imports point one way, layer by layer, with no circles (lazy,
function-level imports included); `import vlm` is light and its public names load on first use; commands
start quietly (no warnings from libraries about things the user did not do)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "vlm"

# ARCHITECTURE.md's layers, lowest first: a module may import from its own layer and the ones below it.
LAYERS = ("towers", "weights", "processing", "assembly", "data", "training", "cli")
MODULE_LAYER = {
    "vlm.siglip": "towers",
    "vlm.siglip_text": "towers",
    "vlm.siglip_model": "towers",
    "vlm.losses": "towers",
    "vlm.checks": "towers",  # plain-Python value checkers (and CheckpointError): the tower configs use them
    "vlm.devices": "towers",  # "auto"/"cuda:N" -> a torch.device that is here, and its default dtype
    "vlm.weights": "weights",
    "vlm.processing": "processing",
    "vlm.conversation": "processing",
    "vlm.projector": "assembly",
    "vlm.lm": "assembly",
    "vlm.transformers_format": "assembly",  # SmolVLM / Idefics3 / LLaVA checkpoints in and out: key maps
    "vlm.nanovlm": "assembly",  # nanoVLM checkpoints in: a key map, its tokenizer, pixels and prompts
    "vlm.lora": "assembly",
    "vlm.model": "assembly",
    "vlm.serving": "assembly",
    "vlm.generation": "assembly",  # stopping, image-embedding cache, shared prefix: used by model.py
    "vlm.embeddings": "assembly",  # the tower's embeddings of image files
    "vlm.zeroshot": "assembly",  # the dual encoder with its tokenizer
    "vlm.viz": "assembly",  # pictures of the tower's weights and attention
    "vlm.data": "data",  # and every module under vlm/data/
    "vlm.config": "training",  # typed YAML configs of the training scripts
    "vlm.metrics": "training",
    "vlm.training": "training",
    "vlm.pipeline": "training",  # fine-tuning's input pipeline: steps -> prepared batches
    "vlm.evaluate": "training",
    "vlm.siglip_eval": "training",
    "vlm.cli": "cli",
    "vlm": "cli",  # the package facade: lazy re-exports of everything above
}
# Never imported while `import vlm` runs: heavy or optional, and loaded by the code that needs them.
NOT_ON_IMPORT = ("torch", "transformers", "peft", "bitsandbytes", "gradio", "datasets")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> str | None:
    """The module's layer: its own entry, else its package's (vlm.data.pairs -> vlm.data)."""
    while module not in MODULE_LAYER and "." in module:
        module = module.rpartition(".")[0]
    return MODULE_LAYER.get(module) if module != "vlm" or module in MODULES else None


def lazy_exports() -> dict[str, str]:
    """vlm/__init__.py's `_EXPORTS` (public name -> defining module), read without importing vlm."""
    for node in ast.walk(ast.parse((PACKAGE / "__init__.py").read_text())):
        targets = node.targets if isinstance(node, ast.Assign) else []
        if any(isinstance(t, ast.Name) and t.id == "_EXPORTS" for t in targets):
            return ast.literal_eval(node.value)
    return {}


def imports_of(module: str) -> set[str]:
    """The vlm modules `module` imports anywhere in its file: top level, in functions, under TYPE_CHECKING."""
    path, found = MODULES[module], set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    exports = lazy_exports()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x / from .pairs import y
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in MODULES:  # from vlm.data import pairs: the submodule
                    found.add(sub)
                elif base == "vlm" and alias.name in exports:  # from vlm import X: X's own module
                    found.add(exports[alias.name])
                else:
                    found.add(base)
    return {name for name in found if name in MODULES and name != module}


GRAPH = {module: imports_of(module) for module in MODULES}


def test_every_module_has_a_layer() -> None:
    missing = sorted(module for module in MODULES if layer_of(module) is None)
    assert not missing, f"add these modules to MODULE_LAYER (and ARCHITECTURE.md): {missing}"


def test_the_graph_sees_function_level_imports() -> None:
    # A guard on the parser itself: vlm/cli.py imports its commands inside functions.
    assert {"vlm.embeddings", "vlm.zeroshot", "vlm.weights"} <= GRAPH["vlm.cli"]


def test_no_import_cycles() -> None:
    cycles, done = [], set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            cycles.append(" -> ".join(path[path.index(module) :] + [module]))
            return
        if module in done:
            return
        for target in sorted(GRAPH[module]):
            visit(target, path + [module])
        done.add(module)

    for module in sorted(GRAPH):
        visit(module, [])
    assert not cycles, "import cycles (a lazy import does not make a circle acceptable):\n" + "\n".join(
        cycles
    )


def test_imports_point_down_the_layers() -> None:
    rank = {layer: i for i, layer in enumerate(LAYERS)}
    upward = [
        f"{module} ({layer_of(module)}) imports {target} ({layer_of(target)})"
        for module, targets in sorted(GRAPH.items())
        for target in sorted(targets)
        if layer_of(module) and layer_of(target) and rank[layer_of(target)] > rank[layer_of(module)]
    ]
    assert not upward, "imports against the layer order of ARCHITECTURE.md:\n" + "\n".join(upward)


def test_the_towers_import_only_torch_and_each_other() -> None:
    # "Plain torch; they know nothing of LMs, datasets, files or argv."
    # (time: the tower picks its CPU kernel by timing the candidates, vlm.siglip.kernel_choice)
    allowed = {"__future__", "collections", "dataclasses", "math", "time", "typing", "torch"}
    for module, layer in MODULE_LAYER.items():
        if layer != "towers":
            continue
        for node in ast.walk(ast.parse(MODULES[module].read_text())):
            names = (
                [alias.name for alias in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            for name in names:
                top = name.split(".")[0]
                assert top in allowed or MODULE_LAYER.get(name) == "towers", f"{module} imports {name}"


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300, check=True
    )


def test_import_vlm_is_light() -> None:
    code = f"import json, sys, vlm; print(json.dumps([m for m in {NOT_ON_IMPORT!r} if m in sys.modules]))"
    assert json.loads(run_python(code).stdout) == []


def test_public_names_load_lazily() -> None:
    code = (
        "import json, sys\n"
        "from vlm import VisionLanguageModel, load_default_model, Chat\n"
        "import vlm.model\n"
        "assert (VisionLanguageModel, load_default_model, Chat) == "
        "(vlm.model.VisionLanguageModel, vlm.model.load_default_model, vlm.model.Chat)\n"
        "print(json.dumps([m for m in ('gradio', 'vlm.data', 'vlm.zeroshot') if m in sys.modules]))"
    )
    # Only what was asked for is imported: the VLM needs neither the data builders, zero-shot nor gradio.
    assert json.loads(run_python(code).stdout) == []


def test_every_public_name_resolves() -> None:
    import vlm

    exports = lazy_exports()
    assert sorted(vlm.__all__) == sorted(exports) and set(exports) <= set(dir(vlm))
    for name, module in exports.items():
        assert getattr(vlm, name) is getattr(sys.modules[module], name), name
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        vlm.nothing_here  # noqa: B018


# -- a quiet start ------------------------------------------------------------------------------------------------

# Lines libraries print about things the user did not do: bitsandbytes' CPU kernel probe (imported by peft
# even when nothing is quantised) and transformers' complaint about SigLIP's class defaults (transformers#47612).
NOISE = (
    "gemm_4bit_forward",
    "kernels-community",
    "bos_token_id",
    "eos_token_id",
    "[transformers]",
    "Warning",
)


def vlm_command(*args: str) -> subprocess.CompletedProcess[str]:
    script = Path(sys.executable).parent / "vlm"
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "vlm.cli"]
    return subprocess.run(command + list(args), cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    "args",
    [
        ("zeroshot", "demo/examples/chelsea.jpg", "--labels", "a cat,a dog"),
        ("ask", "--help"),
    ],
    ids=["zeroshot", "ask-help"],
)
def test_commands_start_quietly(args: tuple[str, ...]) -> None:
    done = vlm_command(*args)
    assert done.returncode == 0, done.stderr
    noise = [line for line in done.stderr.splitlines() if any(word in line for word in NOISE)]
    assert not noise, "\n".join(noise)


def test_zeroshot_imports_neither_peft_nor_bitsandbytes() -> None:
    code = (
        "import contextlib, io, json, sys\n"
        "from vlm.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    rc = main(['zeroshot', 'demo/examples/chelsea.jpg', '--labels', 'a cat,a dog'])\n"
        "print(json.dumps([rc] + [m for m in ('peft', 'bitsandbytes', 'gradio') if m in sys.modules]))"
    )
    assert json.loads(run_python(code).stdout.splitlines()[-1]) == [0]
