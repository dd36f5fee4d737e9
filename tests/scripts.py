"""Import the scripts in train/ (plain files, not a package) from tests."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str) -> ModuleType:
    """train/{name}.py as a module, registered in sys.modules: its dataclasses need their module there."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "train" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
