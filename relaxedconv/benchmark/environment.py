"""What a result was measured on: card, versions, commit, date."""
from __future__ import annotations

import datetime
import hashlib
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

import relaxedconv

PACKAGE_DIR = Path(relaxedconv.__file__).resolve().parent
REPO_DIR = PACKAGE_DIR.parent


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO_DIR), *args], capture_output=True, text=True, timeout=10, check=True
        )
    except Exception:
        return None
    return out.stdout.strip()


def source_hash() -> str:
    """sha256 over the package's and kernels' Python sources: identifies the code that ran even
    where there is no git checkout (a copied working tree)."""
    h = hashlib.sha256()
    roots = [PACKAGE_DIR]
    try:
        from relaxedconv import kernels

        roots.append(Path(kernels.__file__).resolve().parent)
    except Exception:
        pass
    for root in roots:
        for f in sorted(root.rglob("*.py")):
            if "__pycache__" in f.parts:
                continue
            h.update(str(f.relative_to(root.parent)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:
        return None


def collect(device: torch.device, commit_override: str | None = None) -> dict:
    commit = commit_override or os.environ.get("RELAXEDCONV_COMMIT") or _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no")
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device.type,
        "card": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU: {_cpu_name()}",
        "cpu": _cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "relaxedconv": relaxedconv.__version__,
        "commit": commit,
        "commit_dirty": None if status is None else bool(status),
        "source_hash": source_hash(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET"),
        # The switches that change what a row measures: which kernel net, pinned or recomputed kernels.
        "env": {k: os.environ[k] for k in sorted(os.environ) if k.startswith("RELAXEDCONV_") and k != "RELAXEDCONV_COMMIT"},
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        meta["card_memory_gib"] = round(props.total_memory / 2**30, 1)
        meta["card_capability"] = f"{props.major}.{props.minor}"
        meta["cudnn_benchmark"] = torch.backends.cudnn.benchmark
    return meta
