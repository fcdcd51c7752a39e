"""Atomic file writes and the RNG state that a resumed run restores."""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import random
import tempfile
from pathlib import Path

import numpy as np
import torch


def current_umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


def use_default_mode(path) -> None:
    """Give a file made by mkstemp (always 0600) the mode open() would have: 0666 less the umask,
    so run files are as readable as any other file the user writes."""
    os.chmod(path, 0o666 & ~current_umask())


class RunFileWriteError(OSError):
    """A run file could not be written (a full disk, lost permissions); its previous version is intact."""


@contextlib.contextmanager
def _replaced_atomically(path):
    """Yield a temporary path in ``path``'s folder; on success fsync it and rename it over ``path``.

    An interrupted write never leaves a truncated file behind; a failed one leaves no temporary and
    raises :class:`RunFileWriteError`, which names the file."""
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        use_default_mode(tmp)
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError) and not isinstance(e, RunFileWriteError):
            raise RunFileWriteError(e.errno, f"could not write {path} ({e.strerror or e}); its previous version is intact") from None
        raise


def atomic_write_bytes(path, data: bytes) -> None:
    with _replaced_atomically(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def atomic_write_text(path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def finite_or_null(obj):
    """``obj`` with every non-finite float (NaN, +-inf) replaced by None, in dicts, lists and tuples.

    JSON has no NaN: Python writes the bare token ``NaN``, which ``jq``, JavaScript and most other
    readers refuse. An undefined number (the validation accuracy of a run without a validation split,
    a diverged loss) is written as null, which every reader here takes as "no value"."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_null(v) for v in obj]
    return obj


def has_value(v) -> bool:
    """Whether a number read from a run file has a value: null (:func:`finite_or_null`'s undefined
    number), and the NaN of files written before it, have none."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def json_text(obj, **kw) -> str:
    """``json.dumps`` of ``obj`` as strict JSON: non-finite numbers become null (:func:`finite_or_null`)."""
    return json.dumps(finite_or_null(obj), allow_nan=False, **kw)


def atomic_write_json(path, obj) -> None:
    atomic_write_text(path, json_text(obj, indent=2, sort_keys=False) + "\n")


def atomic_torch_save(obj, path) -> None:
    """torch.save, atomically (see :func:`_replaced_atomically`). Serialised in memory first: torch.save
    straight to a full disk raised an obscure RuntimeError ("enforce fail at inline_container.cc"),
    a plain write raises the OSError that says what happened."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getbuffer())


def rng_state() -> dict:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:  # a different number of visible GPUs: restore the current device's generator
            torch.cuda.set_rng_state(cuda[0])
