"""``backend="auto"`` by measurement, the way ``torch.backends.cudnn.benchmark`` chooses algorithms.

On the first call for a key, every backend that can run the call (:func:`dispatch.runnable`) is
timed on detached copies of the call's tensors and the fastest is kept for the process:

- key (:func:`choice_key`): device name (on the CPU its thread count), compute dtype (the autocast dtype under autocast; fp32
  with TF32 on counts apart), the layer geometry, translation non-stationarity, hidden width,
  bias or not, the input's height and width, its batch rounded up to a power of two
  (:func:`batch_bucket`), and what the call does (:func:`call_mode`, next). An empty batch is
  not measured (it runs the static rule's choice and keeps nothing).
- measuring draws its output gradient from a generator of its own: the caller's random stream
  is the same whether a choice was measured, read from the file or already made.
- what is timed (:func:`call_mode`): forward + backward to every input that needs a gradient
  (training); without gradients, the forward from prepared operands where the caller keeps them (a
  layer's inference cache, :mod:`relaxedconv.layers`), else what the call does every time:
  building the backend's operands (expand_conv's bank, materialize's kernel) and the forward
  (:func:`relaxedconv.functional.relaxed_conv`).
  One untimed trial call (where a refusal or out-of-memory shows), :data:`WARMUP_CALLS` untimed
  calls, then the median of :data:`TIMED_CALLS` calls, each ended by ``torch.cuda.synchronize``.
  ``(1 + WARMUP_CALLS + TIMED_CALLS)`` calls per runnable backend: the one-off cost of a new key
  (README.md, "backend='auto'").
- a backend that raises (out of memory, a refusal, anything) is skipped and its reason kept; if
  none runs, the static rule's choice is used.
- under DDP (``torch.distributed`` initialised, world > 1) rank 0 decides for calls that need
  gradients and broadcasts, so every rank trains with the same backend; the choice is made at the
  same call on every rank because training steps reach the same layers with the same shapes.
  Calls without gradients (evaluation, whose split over ranks may be uneven) are chosen per rank
  with no collective, so they can never wait on a rank that does not come.
- an optional file cache (:func:`set_cache_file`, or ``RELAXEDCONV_AUTO_CACHE=1`` (on/true/yes)
  for the default path under the user's cache directory, or ``=<file or directory>``; 0/off/
  false/no or unset: none) keeps choices across processes. It is
  keyed also by torch, Triton and relaxedconv versions, a hash of the backends' sources and the
  Triton switches set in the environment (:data:`BACKEND_SETTINGS_ENV`); a corrupt file or one
  written by other versions is ignored with a warning, never an error.
- under ``torch.compile`` nothing is timed: a choice already made in this process is used, else
  the static rule.

The timer is injectable (:func:`set_timer`) so the choice can be tested without a GPU.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import statistics
import time
import warnings
from pathlib import Path

import torch

from . import dispatch
from .reference import ConvGeometry

WARMUP_CALLS = 2
TIMED_CALLS = 5
CACHE_ENV = "RELAXEDCONV_AUTO_CACHE"
CACHE_FORMAT = "relaxedconv-auto-backend/2"


@dataclasses.dataclass(frozen=True)
class Choice:
    backend: str
    source: str  # "measured", "file", "rank 0", "static (nothing ran)"
    times_ms: dict  # backend -> median ms of the timed call
    skipped: dict  # backend -> why it did not run


_choices: dict[tuple, Choice] = {}
_timer = None
_cache_file: Path | None | bool = None  # None: follow the environment; False: off


# ---- configuration -----------------------------------------------------------------------------------
def set_timer(timer) -> None:
    """``timer(run, *, backend, device) -> seconds`` replaces the default timer (None restores it).
    ``run()`` performs one call; the default warms up and returns the median synchronised time."""
    global _timer
    _timer = timer


def set_cache_file(path) -> None:
    """Keep choices in ``path`` across processes (a directory: ``auto_backend.json`` in it; True:
    the default path; False: no file; None: follow ``RELAXEDCONV_AUTO_CACHE``)."""
    global _cache_file
    if not (path is None or isinstance(path, (bool, str, os.PathLike))):
        raise TypeError(f"set_cache_file takes a path, True, False or None, got {type(path).__name__}")
    _cache_file = Path(path).expanduser() if isinstance(path, (str, os.PathLike)) else path


def clear() -> None:
    """Forget every choice made in this process."""
    _choices.clear()


def choices() -> dict[tuple, Choice]:
    """The choices made in this process, by key."""
    return dict(_choices)


def default_cache_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "relaxedconv" / "auto_backend.json"


CACHE_OFF = ("", "0", "off", "false", "no")
CACHE_DEFAULT = ("1", "on", "true", "yes")


def cache_path() -> Path | None:
    """The file choices are kept in, or None: :func:`set_cache_file`'s, else ``RELAXEDCONV_AUTO_CACHE``'s
    (0/off/false/no or unset: none; 1/on/true/yes: the default path; else a file or a directory)."""
    if _cache_file is False:
        return None
    if _cache_file is True:
        return default_cache_path()
    path = _cache_file
    if path is None:
        env = os.environ.get(CACHE_ENV, "").strip()
        if env.lower() in CACHE_OFF:
            return None
        if env.lower() in CACHE_DEFAULT:
            return default_cache_path()
        path = Path(env).expanduser()
        if env.endswith(("/", os.sep)):
            return path / default_cache_path().name
    return path / default_cache_path().name if path.is_dir() else path


# ---- the key --------------------------------------------------------------------------------------------
def batch_bucket(batch: int) -> int:
    """The batch rounded up to a power of two: batches in one bucket share a choice."""
    return 1 << max(0, math.ceil(math.log2(max(1, batch))))


_DEVICE_NAMES: dict = {}


@torch.compiler.assume_constant_result
def _cpu_threads() -> int:
    """torch's intra-op thread count (Dynamo cannot trace the getter: a compiled graph takes the
    value it had when it was traced)."""
    return torch.get_num_threads()


def device_name(device: torch.device) -> str:
    """The card's name (the key's first part); looked up once per device, outside any compile.
    On the CPU its thread count, which the timings depend on as much as on the card."""
    if device.type == "cpu":
        return f"cpu/{_cpu_threads()} threads"
    if device.type != "cuda":
        return device.type
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _DEVICE_NAMES and not torch.compiler.is_compiling():
        _DEVICE_NAMES[index] = torch.cuda.get_device_name(index)
    return _DEVICE_NAMES.get(index, f"cuda:{index}")


def dtype_name(device: torch.device, dtype: torch.dtype) -> str:
    name = str(dtype).replace("torch.", "")
    if device.type == "cuda" and dtype == torch.float32 and dispatch.tf32_matmuls_allowed():
        name += "+tf32"
    return name


def needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def geometry_fields(g: ConvGeometry) -> tuple:
    """``dataclasses.astuple(g)``, spelt out: astuple copies recursively, 4 of the key's 8 us per
    call (every ``auto`` call under the measure policy builds the key)."""
    return (g.in_channels, g.out_channels, g.in_rotations, g.out_rotations, g.kernel_size, g.padding)


def call_mode(x, z, w_ext, bias, prepared: bool) -> str:
    """What one call does, hence what is timed: "fwd+bwd" when a gradient is needed, else "fwd"
    from operands the caller keeps (a layer's inference cache) or "prepare+fwd" (a functional
    call, which builds them every time: expand_conv's bank, materialize's kernel)."""
    if needs_grad(x, z, w_ext, bias):
        return "fwd+bwd"
    return "fwd" if prepared else "prepare+fwd"


def choice_key(x, z, bias, geometry: ConvGeometry, mode: str) -> tuple:
    dtype = dispatch.compute_dtype(x)
    return (
        device_name(x.device),
        dtype_name(x.device, dtype),
        geometry_fields(geometry),
        z.dim() == 4,
        int(z.shape[-1]),
        bias is not None,
        batch_bucket(x.shape[0]),
        int(x.shape[-2]),
        int(x.shape[-1]),
        mode,
    )


# ---- timing ---------------------------------------------------------------------------------------------
def default_timer(run, *, backend: str, device: torch.device) -> float:
    for _ in range(WARMUP_CALLS):
        run()
    times = []
    for _ in range(TIMED_CALLS):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _oom_types():
    types = [torch.cuda.OutOfMemoryError]
    if hasattr(torch, "OutOfMemoryError"):
        types.append(torch.OutOfMemoryError)
    return tuple(types)


def _too_big_for_memory(name: str, x, z, w_ext, geometry) -> str | None:
    """materialize builds the per-position kernel: skip it without trying when that alone (three
    copies: kernel, its gradient, the einsum's operand) would not fit in free CUDA memory."""
    if name != "materialize" or x.device.type != "cuda":
        return None
    n_kernel = z[..., 0].numel() * w_ext.shape[0] * w_ext.shape[1]
    need = 3 * n_kernel * x.element_size()
    free, _ = torch.cuda.mem_get_info(x.device)
    if need > free:
        return f"its per-position kernel needs ~{need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free"
    return None


def _runner(name: str, x, z, w_ext, bias, geometry, mode: str):
    """A zero-argument call of backend ``name`` on detached copies doing what the real call does
    (:func:`call_mode`: gradients as in the real call; the backend's operands built in every
    call unless the caller keeps them)."""
    from .functional import apply_backend, prepare_backend

    dtype = dispatch.compute_dtype(x)
    train = mode == "fwd+bwd"
    xs = x.detach().requires_grad_(x.requires_grad and train)
    zs = z.detach().requires_grad_(z.requires_grad and train)
    ws = w_ext.detach().requires_grad_(w_ext.requires_grad and train)
    bs = None if bias is None else bias.detach().requires_grad_(bias.requires_grad and train)
    leaves = [t for t in (xs, zs, ws, bs) if t is not None and t.requires_grad]
    if mode == "prepare+fwd":
        return lambda: apply_backend(name, xs, prepare_backend(name, zs, ws, bs, geometry, dtype), geometry)
    if mode == "fwd":
        with torch.no_grad():
            operands = prepare_backend(name, zs, ws, bs, geometry, dtype)
        return lambda: apply_backend(name, xs, operands, geometry)
    dy = None

    def run():
        nonlocal dy
        for t in leaves:
            t.grad = None
        y = apply_backend(name, xs, prepare_backend(name, zs, ws, bs, geometry, dtype), geometry)
        if dy is None:
            # From a generator of its own: measuring must not advance the caller's random stream
            # (a run would otherwise draw other numbers depending on whether a choice was cached).
            gen = torch.Generator(device=y.device)
            gen.manual_seed(0)
            dy = torch.randn(y.shape, generator=gen, device=y.device, dtype=y.dtype)
        y.backward(dy)

    return run


def measure(x, z, w_ext, bias, geometry: ConvGeometry, *, fallback: str, candidates=None,
            prepared: bool = True) -> Choice:
    """Time every candidate backend on this call and return the fastest (see the module docstring;
    ``prepared``: the caller keeps each backend's operands, :func:`call_mode`)."""
    mode = call_mode(x, z, w_ext, bias, prepared)
    train = mode == "fwd+bwd"
    if candidates is None:
        candidates = dispatch.runnable(device_type=x.device.type, dtype=dispatch.compute_dtype(x),
                                       per_position=z.dim() == 4, for_auto=True)
    timer = _timer or default_timer
    times, skipped = {}, {}
    for name in candidates:
        reason = _too_big_for_memory(name, x, z, w_ext, geometry)
        if reason:
            skipped[name] = reason
            continue
        run = None
        try:
            with torch.enable_grad() if train else torch.no_grad():
                run = _runner(name, x, z, w_ext, bias, geometry, mode)
                run()  # the trial call: compilation, refusals and out-of-memory show here
                times[name] = 1e3 * float(timer(run, backend=name, device=x.device))
        except _oom_types() as e:
            skipped[name] = f"out of memory: {str(e).splitlines()[0][:120] if str(e) else ''}"
        except Exception as e:  # noqa: BLE001 - a backend that cannot run is not a candidate
            skipped[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        finally:
            del run
            if x.device.type == "cuda" and name in skipped:
                torch.cuda.empty_cache()
    if not times:
        return Choice(fallback, "static (nothing ran)", times, skipped)
    return Choice(min(times, key=times.get), "measured", times, skipped)


# ---- the file cache -------------------------------------------------------------------------------------
def _versions() -> dict:
    import relaxedconv

    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # noqa: BLE001
        triton_version = None
    return {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "relaxedconv": relaxedconv.__version__,
        "sources": _source_hash(),
    }


_SOURCE_HASH = None


def _source_hash() -> str:
    """sha256 of the backends' sources (kernels and their Python wrappers): a kernel edited
    without a version bump makes old timings stale."""
    global _SOURCE_HASH
    if _SOURCE_HASH is None:
        h = hashlib.sha256()
        here = Path(__file__).resolve().parent
        files = [here / n for n in ("dispatch.py", "reference.py", "triton_conv.py", "functional.py")]
        try:
            from . import kernels

            files += sorted(Path(kernels.__file__).resolve().parent.glob("*.py"))
        except Exception:  # noqa: BLE001
            pass
        for f in files:
            if f.is_file():
                h.update(f.name.encode())
                h.update(f.read_bytes())
        _SOURCE_HASH = h.hexdigest()[:16]
    return _SOURCE_HASH


# Switches that change how the Triton backend runs, hence its time, at the same shapes
# (README.md, "The fused Triton path"): a choice measured under one setting is not another's.
BACKEND_SETTINGS_ENV = ("RELAXEDCONV_TRITON_INPUT_GRAD", "RELAXEDCONV_TRITON_RECOMPUTE_U",
                        "RELAXEDCONV_TRITON_STATIONARY_BACKWARD", "RELAXEDCONV_KERNEL_CONFIG", "RELAXEDCONV_AUTOTUNE")


def _key_string(key: tuple) -> str:
    """The file's key: the process key and the backend switches set in the environment."""
    settings = {name: os.environ[name] for name in BACKEND_SETTINGS_ENV if os.environ.get(name)}
    return json.dumps([key, settings], default=str)


def _read_file(path: Path) -> dict:
    """The file's choices for these versions; {} (with a warning) when missing, corrupt or stale."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("format") != CACHE_FORMAT or not isinstance(data.get("choices"), dict):
            raise ValueError("unknown format")
    except Exception as e:  # noqa: BLE001
        warnings.warn(f"relaxedconv: ignoring the auto-backend cache {path}: unreadable ({e}); it will be rewritten",
                      stacklevel=3)
        return {}
    now = _versions()
    if data.get("versions") != now:
        changed = [k for k in now if (data.get("versions") or {}).get(k) != now[k]]
        warnings.warn(f"relaxedconv: ignoring the auto-backend cache {path}: written with other versions "
                      f"({', '.join(changed)} changed); it will be rewritten", stacklevel=3)
        return {}
    return data["choices"]


def _write_file(path: Path, key: tuple, choice: Choice) -> None:
    try:
        existing = _read_file(path) if path.is_file() else {}
    except Exception:  # noqa: BLE001
        existing = {}
    existing[_key_string(key)] = {"backend": choice.backend, "times_ms": choice.times_ms, "skipped": choice.skipped}
    payload = {"format": CACHE_FORMAT, "versions": _versions(), "choices": existing}
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):  # no stray temporary file beside an unwritable target
            tmp.unlink()
        warnings.warn(f"relaxedconv: could not write the auto-backend cache {path}: {e}", stacklevel=3)


def _from_file(key: tuple) -> Choice | None:
    path = cache_path()
    if path is None:
        return None
    entry = _read_file(path).get(_key_string(key))
    if not isinstance(entry, dict) or entry.get("backend") not in dispatch.BACKEND_TABLE:
        return None
    return Choice(entry["backend"], "file", entry.get("times_ms") or {}, entry.get("skipped") or {})


# ---- the choice -------------------------------------------------------------------------------------------
def _distributed():
    try:
        import torch.distributed as dist
    except Exception:  # noqa: BLE001
        return None
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist
    return None


EMPTY_BATCH = "static (empty batch)"


def _decide(key, x, z, w_ext, bias, geometry, fallback, prepared) -> Choice:
    if x.shape[0] == 0:
        # An empty batch times nothing but launch overheads, and its choice would be kept for its
        # bucket, batch 1: it runs the static rule's choice and decides nothing.
        return Choice(fallback, EMPTY_BATCH, {}, {})
    choice = _from_file(key)
    if choice is None:
        choice = measure(x, z, w_ext, bias, geometry, fallback=fallback, prepared=prepared)
        path = cache_path()
        if path is not None and choice.source == "measured":
            _write_file(path, key, choice)
    return choice


def measured_choice(x, z, w_ext, bias, geometry: ConvGeometry, *, fallback: str, prepared: bool = True) -> str:
    """The backend ``auto`` runs this call with (the module docstring says how it is chosen;
    ``prepared``: whether the caller keeps the backend's operands across calls without gradients,
    as a layer's inference cache does)."""
    mode = call_mode(x, z, w_ext, bias, prepared)
    key = choice_key(x, z, bias, geometry, mode)
    hit = _choices.get(key)
    if hit is not None:
        return hit.backend
    if torch.compiler.is_compiling():
        return fallback
    # Training calls reach every rank with the same shapes (DDP steps in lockstep), so all ranks
    # miss the cache at the same call and meet in the broadcast. Inference calls need not (an
    # evaluation split unevenly over ranks has a last batch of another size on some ranks): they
    # are chosen per rank, without a collective that could wait forever.
    dist = _distributed() if mode == "fwd+bwd" else None
    if dist is None:
        choice = _decide(key, x, z, w_ext, bias, geometry, fallback, prepared)
    else:
        box = [None]
        if dist.get_rank() == 0:
            choice = _decide(key, x, z, w_ext, bias, geometry, fallback, prepared)
            box[0] = dataclasses.asdict(choice)
        dist.broadcast_object_list(box, src=0)
        choice = Choice(**box[0])
        if dist.get_rank() != 0 and choice.source != EMPTY_BATCH:
            choice = dataclasses.replace(choice, source="rank 0")
    if choice.source != EMPTY_BATCH:  # (on every rank: rank 0's empty batch decides nothing)
        _choices[key] = choice
    return choice.backend
