"""Scripts under scripts/ that tests reuse (the synthetic-checkpoint builders of bench_memory.py), loaded by path:
scripts/ is not a package."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
