"""Loading a script of bench/ as a module, for the tests that call its main()."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def load_bench_script(path) -> object:
    """The script at ``path`` (a name in bench/ or a path) as a module. The environment is restored
    afterwards: the scripts set TRITON_INTERPRET=1 on import, which must not reach the GPU tests
    after the caller."""
    path = Path(path)
    if path.suffix != ".py":
        path = BENCH / f"{path}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    saved = os.environ.copy()
    try:
        spec.loader.exec_module(module)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return module
