"""Packaging (issue 12, item 12): pyproject.toml declares the setuptools build backend beside setup.py,
so `pip install --no-deps --no-build-isolation -e .` is a PEP 660 editable build that needs nothing
from the network (without it pip runs the legacy `setup.py develop`, which setuptools >= 80 turns into
a nested, build-isolated `pip install` that fetches setuptools)."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_declares_the_setuptools_backend():
    tomllib = pytest.importorskip("tomllib")
    build = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]
    assert build["build-backend"] == "setuptools.build_meta"
    versions = [re.fullmatch(r"setuptools>=(\d+)", r.replace(" ", "")) for r in build["requires"]]
    assert any(m and int(m.group(1)) >= 64 for m in versions), build["requires"]  # PEP 660 editable builds


def _setuptools_can_build_editable() -> bool:
    try:
        import setuptools
    except ImportError:
        return False
    major_minor = tuple(int(p) for p in re.findall(r"\d+", setuptools.__version__)[:2])
    if major_minor < (64, 0):
        return False
    if major_minor < (70, 1):  # bdist_wheel came from the wheel package until setuptools 70.1
        try:
            import wheel  # noqa: F401
        except ImportError:
            return False
    return True


@pytest.mark.skipif(not _setuptools_can_build_editable(), reason="needs setuptools >= 64 (and wheel below 70.1) installed")
def test_offline_editable_install_without_build_isolation(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for pkg in ("relaxedconv", "kernels"):
        shutil.copytree(ROOT / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    prefix = tmp_path / "prefix"
    # --isolated: no pip configuration or environment (no index, no find-links); --no-index: offline;
    # --ignore-installed: leave the running environment's own relaxedconv install alone
    cmd = [sys.executable, "-m", "pip", "install", "--isolated", "--no-index", "--no-deps", "--no-build-isolation",
           "--ignore-installed", "--disable-pip-version-check", "--prefix", str(prefix), "-e", str(src)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    finders = list(prefix.rglob("__editable___relaxedconv_*finder.py"))
    assert len(finders) == 1, sorted(p.name for p in prefix.rglob("*"))
    text = finders[0].read_text()
    # the Triton kernels in kernels/ install as relaxedconv.kernels
    assert f"'relaxedconv.kernels': '{src / 'kernels'}'" in text
    assert f"'relaxedconv': '{src / 'relaxedconv'}'" in text
    # the environment running the tests still imports its own copy
    check = subprocess.run([sys.executable, "-c", "import relaxedconv.kernels"], capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stderr[-2000:]
