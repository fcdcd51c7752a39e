"""Export a relaxed model to plain PyTorch modules for deployment (and from there to ONNX).

``export(model, input_size)`` returns a ``torch.fx.GraphModule`` that computes what ``model`` computes
in eval mode, built only from ``torch.nn`` modules and the small modules of
:mod:`relaxedconv.deploy` (a file that imports nothing from relaxedconv):

- translation-stationary layers (strict or rotation-relaxed) -> ``nn.Conv2d`` holding the generated
  kernel bank ``[C_out*N, C_in*N_in, K, K]`` and the bias (what escnn's ``R2Conv.export()`` does);
- translation-relaxed layers -> ``PerPositionConv2d`` (a kernel per output position) or
  ``FactoredPerPositionConv2d`` (the factors Z, W of design.md §2), whichever holds fewer numbers,
  for one input size (another size is refused with the size it accepts);
- the library's norms and pool -> their eval-mode equivalents: ``GroupBatchNorm`` -> ``nn.BatchNorm2d``
  over C*N channels (statistics repeated over rotations), ``GroupLayerNorm`` -> ``nn.GroupNorm(1, C*N)``,
  ``RotationSubset`` -> the kept rotations as a 1x1 depthwise ``nn.Conv2d`` (``nn.Identity`` when all
  are kept), ``InvariantPool`` -> ``RotationSpacePool``; ``torch.nn`` modules are copied unchanged.

The wiring (residual additions, activations, reshapes) comes from tracing ``model.forward`` with
torch.fx, treating the modules above as leaves, so any block built from these pieces exports.
:func:`save` writes the model as a plain description plus ``state_dict``, which
``relaxedconv.deploy.load`` rebuilds without relaxedconv. ``relaxedconv export RUN_DIR`` does it all
for a training run (:func:`main`).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import numbers
import sys
from pathlib import Path

import torch
from torch import fx, nn

from . import deploy
from .layers import GroupConv, InvariantPool, LiftingConv
from .models import GroupBatchNorm, GroupLayerNorm, RotationSubset
from .reference import expand_kernel_bank

RELAXED_LAYERS = (LiftingConv, GroupConv)  # PointwiseGroupConv is a GroupConv
_LIBRARY_LEAVES = (LiftingConv, GroupConv, InvariantPool, GroupBatchNorm, GroupLayerNorm, RotationSubset)
FORMS = ("auto", "bank", "factored")


# ---- checks ---------------------------------------------------------------------------------------
def check_exportable(model: nn.Module) -> None:
    """Refuse a model whose state cannot give a meaningful export, saying what to fix."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"export takes an nn.Module, got {type(model).__name__}")
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    meta = [name for name, t in tensors if t.device.type == "meta"]
    if meta:
        raise ValueError(
            f"export: {len(meta)} parameter(s)/buffer(s) are on the meta device (no values), e.g. {meta[:3]}; "
            "load real weights (load_state_dict(..., assign=True) or to_empty() and a checkpoint) before exporting"
        )
    devices = sorted({str(t.device) for _, t in tensors})
    if len(devices) > 1:
        raise ValueError(f"export: the model's tensors are on several devices {devices}; move it to one with model.to(device)")
    bad = [name for name, t in tensors if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise ValueError(f"export: non-finite values (NaN/inf) in {bad[:3]}; the model is not in a usable state")
    for name, m in model.named_modules():
        if isinstance(m, RELAXED_LAYERS):
            net = m.kernel_net
            if net.out.out_features != m.out_channels * m.in_channels or (
                m.bias is not None and tuple(m.bias.shape) != (m.out_channels,)
            ):
                raise ValueError(
                    f"export: layer {name or type(m).__name__} has in/out channels {m.in_channels}/{m.out_channels} "
                    f"but its kernel net makes {net.out.out_features} values (bias {None if m.bias is None else tuple(m.bias.shape)}); "
                    "its parameters were replaced by ones of another shape"
                )
        if isinstance(m, GroupBatchNorm) and (m.bn.running_mean is None or m.bn.running_var is None):
            raise ValueError(
                f"export: {name} keeps no running statistics, so in eval mode it normalises with each batch's "
                "statistics; the exported model needs fixed ones (track_running_stats=True)"
            )


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    """Every module in eval mode inside the block; the caller's train/eval flags restored after."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def _spatial(input_size) -> tuple[int, int] | None:
    """None | H | (H, W) | (C, H, W) -> (H, W)."""
    if input_size is None:
        return None
    items = (input_size,) * 2 if isinstance(input_size, numbers.Integral) else input_size
    # Only whole numbers: a string would be read character by character, a float truncated.
    if isinstance(items, (str, bytes)) or not hasattr(items, "__len__") or not all(
        isinstance(s, numbers.Integral) and not isinstance(s, bool) for s in items
    ):
        raise ValueError(f"input_size must be H, (H, W) or (C, H, W) with positive int sizes, got {input_size!r}")
    size = tuple(int(s) for s in items)
    if len(size) == 3:
        size = size[1:]
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"input_size must be H, (H, W) or (C, H, W) with positive sizes, got {input_size!r}")
    return size


def _param_of(m: nn.Module) -> torch.Tensor:
    return next(m.parameters())


# ---- one layer --------------------------------------------------------------------------------------
def _sizes(layer, out_hw) -> dict:
    """Numbers each exported form of ``layer`` holds at output size ``out_hw`` (weights only)."""
    g, n, k = layer.geometry, layer.group_order, layer.kernel_size
    j = g.window
    bank_stationary = layer.out_channels * n * layer.in_channels * layer.in_rotations * k * k
    if not layer.translation_nonstationary:
        return {"conv": bank_stationary}
    p = out_hw[0] * out_hw[1]
    h = layer.kernel_net.hidden_channels + 1
    return {"bank": p * bank_stationary, "factored": n * p * j * h + layer.out_channels * layer.in_channels * h}


def _check_form(form) -> None:
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")


def _choose_form(layer, out_hw, form: str) -> str:
    _check_form(form)
    if not layer.translation_nonstationary:
        return "conv"
    if form != "auto":
        return form
    s = _sizes(layer, out_hw)
    return "bank" if s["bank"] <= s["factored"] else "factored"


def export_layer(layer, input_size=None, form: str = "auto") -> nn.Module:
    """One relaxed layer as plain PyTorch, computing what it computes (with ``torch.no_grad``).

    Translation-stationary: an ``nn.Conv2d`` with the generated bank (``input_size`` is not needed).
    Translation-relaxed: ``PerPositionConv2d`` (``form="bank"``) or ``FactoredPerPositionConv2d``
    (``"factored"``) for inputs of spatial size ``input_size`` (H or (H, W)); ``"auto"`` picks the
    smaller. An ``InvariantPool`` becomes ``RotationSpacePool``.
    """
    if isinstance(layer, InvariantPool):
        return deploy.RotationSpacePool(layer.group_order, layer.over, layer.reduce)
    if not isinstance(layer, RELAXED_LAYERS):
        raise TypeError(f"export_layer takes a LiftingConv, GroupConv, PointwiseGroupConv or InvariantPool, got {type(layer).__name__}")
    check_exportable(layer)
    _check_form(form)  # refused for a stationary layer too (which has one form), as for a model
    hw = _spatial(input_size)  # a malformed size is refused even where the layer does not need one
    w = _param_of(layer)
    factory = dict(device=w.device, dtype=w.dtype)
    g, n = layer.geometry, layer.group_order
    has_bias = layer.bias is not None
    with torch.no_grad():
        if not layer.translation_nonstationary:
            bank = expand_kernel_bank(layer.full_kernel((1, 1)), g)  # out size is unused when stationary
            conv = nn.Conv2d(g.in_channels * g.in_rotations, g.out_channels * n, g.kernel_size, padding=g.padding, bias=has_bias, **factory)
            conv.weight.copy_(bank)
            if has_bias:
                conv.bias.copy_(layer.bias.repeat_interleave(n))
            return conv
        if hw is None:
            raise ValueError(
                f"{type(layer).__name__} is translation non-stationary: its kernel differs at every output position, so "
                "export needs the input size it will run at (input_size=H or (H, W))"
            )
        out_hw = g.out_size(*hw)
        if min(out_hw) < 1:
            raise ValueError(f"input size {hw[0]}x{hw[1]} is too small for {type(layer).__name__} (kernel {g.kernel_size}, padding {g.padding})")
        geometry = dict(
            in_channels=g.in_channels, out_channels=g.out_channels, in_rotations=g.in_rotations,
            out_rotations=n, kernel_size=g.kernel_size, padding=g.padding, input_size=hw, bias=has_bias,
        )
        chosen = _choose_form(layer, out_hw, form)
        if chosen == "bank":
            kernel = layer.full_kernel(out_hw)  # [N, P, J, C_out, C_in]
            out = deploy.PerPositionConv2d(**geometry).to(**factory)
            # -> [P, C_in*J, C_out*N]: row i*J + j, column o*N + n (the feature-map channel order)
            out.weight.copy_(kernel.permute(1, 4, 2, 3, 0).reshape(out.weight.shape))
        else:
            z, w_ext = layer.factored_kernel(out_hw)
            out = deploy.FactoredPerPositionConv2d(**geometry, hidden=w_ext.shape[-1]).to(**factory)
            out.z.copy_(z)
            out.w.copy_(w_ext)
        if has_bias:
            out.bias.copy_(layer.bias.repeat_interleave(n))
        return out


# ---- the library's other leaves -----------------------------------------------------------------------
def _batch_norm(m: GroupBatchNorm) -> nn.BatchNorm2d:
    """Eval-mode GroupBatchNorm: per-channel statistics shared over rotations = BatchNorm2d(C*N) with
    each channel's statistics repeated N times (the same per-element arithmetic)."""
    bn, n = m.bn, m.group_order
    w = bn.running_mean
    out = nn.BatchNorm2d(m.channels * n, eps=bn.eps, momentum=bn.momentum, affine=bn.affine, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        out.running_mean.copy_(bn.running_mean.repeat_interleave(n))
        out.running_var.copy_(bn.running_var.repeat_interleave(n))
        out.num_batches_tracked.copy_(bn.num_batches_tracked)
        if bn.affine:
            out.weight.copy_(bn.weight.repeat_interleave(n))
            out.bias.copy_(bn.bias.repeat_interleave(n))
    return out


def _layer_norm(m: GroupLayerNorm) -> nn.GroupNorm:
    """GroupLayerNorm normalises each sample over (C*N, H, W) with a per-channel affine: GroupNorm with one group."""
    n = m.group_order
    out = nn.GroupNorm(1, m.channels * n, eps=m.eps, device=m.weight.device, dtype=m.weight.dtype)
    with torch.no_grad():
        out.weight.copy_(m.weight.repeat_interleave(n))
        out.bias.copy_(m.bias.repeat_interleave(n))
    return out


def _rotation_subset(m: RotationSubset) -> nn.Module:
    """The eval-mode subset: a fixed 0/1 mask per channel c*N + n (a 1x1 depthwise conv multiplies by it)."""
    with torch.no_grad(), _eval_mode(m):
        keep = m.mask().repeat(m.channels)
    if bool((keep == 1).all()):
        return nn.Identity()
    c = keep.numel()
    out = nn.Conv2d(c, c, 1, groups=c, bias=False, device=keep.device, dtype=keep.dtype)
    with torch.no_grad():
        out.weight.copy_(keep[:, None, None, None])
    return out


def _is_torch_nn(m: nn.Module) -> bool:
    return getattr(nn, type(m).__name__, None) is type(m)


def _plain(m: nn.Module, name: str, input_sizes: dict, form: str) -> nn.Module:
    if isinstance(m, (RELAXED_LAYERS + (InvariantPool,))):
        return export_layer(m, input_sizes.get(name), form)
    if isinstance(m, GroupBatchNorm):
        return _batch_norm(m)
    if isinstance(m, GroupLayerNorm):
        return _layer_norm(m)
    if isinstance(m, RotationSubset):
        return _rotation_subset(m)
    if _is_torch_nn(m):
        return copy.deepcopy(m)
    raise TypeError(f"export: no plain equivalent for {name} ({type(m).__module__}.{type(m).__name__})")


# ---- the whole model ------------------------------------------------------------------------------------
class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, _LIBRARY_LEAVES) or super().is_leaf_module(m, qualname)


def _input_channels(model: nn.Module, input_size) -> int | None:
    """C of ``input_size`` when given, else the first relaxed layer's input channels (None without one)."""
    if input_size is not None and not isinstance(input_size, numbers.Integral) and len(tuple(input_size)) == 3:
        return int(tuple(input_size)[0])
    for m in model.modules():
        if isinstance(m, RELAXED_LAYERS):
            return m.in_channels * m.in_rotations
    return None


def layer_input_sizes(model: nn.Module, input_size) -> dict[str, tuple[int, int]]:
    """The spatial size each relaxed layer of ``model`` sees for inputs of ``input_size``.

    Runs ``model`` once on zeros with every relaxed layer replaced by a stand-in that only returns
    zeros of the right shape, so it costs a few cheap ops however large the layers are.
    """
    hw = _spatial(input_size)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, RELAXED_LAYERS)}
    seen: dict[str, tuple[int, int]] = {}

    def stand_in(name, layer):
        def forward(x, *args, **kwargs):
            hw_here = (int(x.shape[-2]), int(x.shape[-1]))
            if seen.setdefault(name, hw_here) != hw_here:
                raise ValueError(f"layer {name} runs at two input sizes, {seen[name]} and {hw_here}; a per-position export holds one")
            out_hw = layer.geometry.out_size(*seen[name])
            if min(out_hw) < 1:
                raise ValueError(
                    f"input size {hw[0]}x{hw[1]} is too small: layer {name} gets {seen[name][0]}x{seen[name][1]}, "
                    f"less than its {layer.kernel_size}x{layer.kernel_size} window with padding {layer.padding} needs"
                )
            return x.new_zeros(x.shape[0], layer.out_channels * layer.group_order, *out_hw)

        return forward

    if not layers:
        return seen
    w = _param_of(model)
    x = torch.zeros(1, _input_channels(model, input_size), *hw, device=w.device, dtype=w.dtype)
    for name, layer in layers.items():
        layer.forward = stand_in(name, layer)  # an instance attribute: nn.Module.__call__ finds it first
    try:
        with torch.no_grad(), _eval_mode(model):
            model(x)
    finally:
        for layer in layers.values():
            del layer.forward
    return seen


def export(model: nn.Module, input_size=None, form: str = "auto") -> nn.Module:
    """``model`` as plain PyTorch (see the module docstring): a ``torch.fx.GraphModule`` in eval mode.

    ``input_size`` (H, (H, W) or (C, H, W)) is needed when the model has translation-relaxed layers:
    their exported form holds a kernel per output position of that size. ``form`` is "auto" (the
    smaller of the two per-position forms), "bank" or "factored". A single relaxed layer or
    ``InvariantPool`` exports as one module (see :func:`export_layer`). The returned model's ``meta``
    records the input size. ``model`` itself is not changed.
    """
    check_exportable(model)
    if isinstance(model, RELAXED_LAYERS + (InvariantPool,)):
        return export_layer(model, _spatial(input_size), form)
    _check_form(form)
    relaxed = {name: m for name, m in model.named_modules() if isinstance(m, RELAXED_LAYERS)}
    needs_size = [name for name, m in relaxed.items() if m.translation_nonstationary]
    if needs_size and input_size is None:
        raise ValueError(
            f"export: layers {needs_size[:3]} are translation non-stationary (a kernel per output position), so export "
            "needs the input size the model will run at: export(model, input_size=(H, W))"
        )
    sizes = layer_input_sizes(model, input_size) if input_size is not None and relaxed else {}
    with _eval_mode(model):
        try:
            graph = _Tracer().trace(model)
        except Exception as e:  # torch.fx raises several types; the user needs the reason and a way out
            raise ValueError(
                f"export: cannot trace {type(model).__name__}.forward with torch.fx ({type(e).__name__}: {e}); "
                "export its layers with export_layer() and wire them in your own module"
            ) from e
        parts = {}
        for node in graph.nodes:
            if node.op == "call_module":
                parts[node.target] = _plain(model.get_submodule(node.target), node.target, sizes, form)
            elif node.op == "get_attr":
                owner, _, field = node.target.rpartition(".")
                value = getattr(model.get_submodule(owner), field)
                if isinstance(value, torch.Tensor):
                    kind = nn.Parameter if isinstance(value, nn.Parameter) else (lambda t: t)
                    value = kind(value.detach().clone())
                parts[node.target] = value
    exported = fx.GraphModule(parts, graph, class_name="ExportedModel").eval()
    for name, m in exported.named_modules():
        if not (m is exported or type(m) is nn.Module or _is_torch_nn(m) or isinstance(m, tuple(deploy.PLAIN_MODULES.values()))):
            raise TypeError(f"export: {name} is a {type(m).__module__}.{type(m).__name__}, not a plain module")
    channels = _input_channels(model, input_size)
    exported.meta = {"input_size": None if input_size is None else [c for c in (channels, *_spatial(input_size)) if c is not None]}
    return exported


def plan(model: nn.Module, input_size=None, form: str = "auto") -> list[dict]:
    """Per relaxed layer: what it exports to and how many numbers/bytes that holds, without building it.

    The sizes of both per-position forms are listed, so a caller can see what the choice saved.
    """
    check_exportable(model)
    sizes = layer_input_sizes(model, input_size) if input_size is not None else {}
    rows = []
    for name, m in model.named_modules():
        if not isinstance(m, RELAXED_LAYERS):
            continue
        hw = sizes.get(name)
        if m.translation_nonstationary and hw is None:
            raise ValueError(f"plan: layer {name} is translation non-stationary; pass input_size")
        out_hw = m.geometry.out_size(*hw) if hw else None
        chosen = _choose_form(m, out_hw, form)
        numbers = _sizes(m, out_hw)
        itemsize = _param_of(m).element_size()
        rows.append(dict(
            name=name, layer=type(m).__name__, input_size=hw, form=chosen, numbers=numbers[chosen],
            bytes=numbers[chosen] * itemsize, **{f"{k}_bytes": v * itemsize for k, v in numbers.items()},
        ))
    return rows


def save(exported: nn.Module, path, meta: dict | None = None) -> int:
    """Write an exported model as ``{format, version, architecture, state_dict, meta}`` (no pickled
    classes: ``torch.load(path, weights_only=True)`` reads it; ``relaxedconv.deploy.load`` rebuilds
    the model). ``meta`` must be plain data (JSON types). Returns the file size in bytes."""
    from .training.checkpoint import atomic_torch_save

    info = {**getattr(exported, "meta", {}), **(meta or {})}
    try:  # the round trip also turns str subclasses (torch.__version__) and tuples into what weights_only loads
        info = json.loads(json.dumps(info))
    except TypeError as e:
        raise TypeError(f"save: meta must hold only plain data (numbers, strings, lists, dicts): {e}") from e
    saved = {
        "format": deploy.FORMAT,
        "version": deploy.VERSION,
        "architecture": deploy.describe(exported),
        "state_dict": {k: v.detach().cpu() for k, v in exported.state_dict().items()},
        "meta": info,
    }
    atomic_torch_save(saved, path)
    return Path(path).stat().st_size


# ---- ONNX ---------------------------------------------------------------------------------------------------
ONNX_INLINE_LIMIT = 3 << 29  # 1.5 GiB: protobuf caps one file at 2 GiB, so larger weights go to PATH.data


def to_onnx(exported: nn.Module, example: torch.Tensor, path) -> list[Path]:
    """``torch.onnx.export`` of an exported model, batch size dynamic; returns the files written
    (``PATH`` and, for weights over 1.5 GiB, ``PATH.data``). Needs ``pip install 'relaxedconv[onnx]'``."""
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise RuntimeError(f"ONNX export needs the onnx extra: pip install 'relaxedconv[onnx]' ({e})") from e
    weights = sum(t.numel() * t.element_size() for t in exported.state_dict().values())
    external = weights > ONNX_INLINE_LIMIT
    torch.onnx.export(
        exported, (example,), str(path), dynamo=True, external_data=external, input_names=["input"],
        output_names=["output"], dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False,
    )
    return [Path(path)] + ([Path(f"{path}.data")] if external and Path(f"{path}.data").exists() else [])


def run_onnx(path, x: torch.Tensor) -> torch.Tensor:
    """Run an ONNX file under onnxruntime on the CPU."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return torch.from_numpy(session.run(None, {name: x.detach().cpu().numpy()})[0])


# ---- CLI ----------------------------------------------------------------------------------------------------
def _size_arg(s: str):
    try:
        parts = [int(v) for v in s.lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) not in (1, 2) or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"expected a size like 32 or 32x24, got {s!r}")
    return tuple(parts) if len(parts) == 2 else (parts[0], parts[0])


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="relaxedconv export",
        description="Export a training run's best model to plain PyTorch modules (and ONNX), check it against the original, write it.",
    )
    ap.add_argument("run_dir", help="a run directory of 'relaxedconv train' (config.json and best.pt)")
    ap.add_argument("--out", required=True, help="file to write; relaxedconv/deploy.py (torch only) loads it: deploy.load(OUT)")
    ap.add_argument("--onnx", default=None, help="also write an ONNX file (needs the onnx extra: pip install 'relaxedconv[onnx]')")
    ap.add_argument("--input-size", type=_size_arg, default=None, help="H or HxW the model will run at (default: the run's image size)")
    ap.add_argument("--checkpoint", choices=("best", "last"), default="best", help="best.pt (default) or the last epoch's checkpoint.pt")
    ap.add_argument("--form", choices=FORMS, default="auto", help="translation-relaxed layers: per-position bank, factors Z and W, or the smaller (default)")
    ap.add_argument("--check-batch", type=int, default=4, help="random inputs the exported model is checked on (default %(default)s)")
    ap.add_argument("--tolerance", type=float, default=1e-4, help="largest relative difference accepted in the check (default %(default)s)")
    return ap


class _Refused(Exception):
    """A bad argument or run directory: one line to stderr, exit code 2."""


def _load_run(run_dir: Path, which: str):
    from .models import build_model

    cfg_path = run_dir / "config.json"
    if not cfg_path.is_file():
        raise _Refused(f"{run_dir} has no config.json: pass a run directory written by 'relaxedconv train --out'")
    doc = json.loads(cfg_path.read_text())
    if "model" not in doc:
        raise _Refused(f"{cfg_path} has no 'model' section; was it written by 'relaxedconv train'?")
    if which == "best":
        weights_path = run_dir / "best.pt"
        if not weights_path.is_file():
            raise _Refused(f"{run_dir} has no best.pt yet (no epoch has finished); wait for one or pass --checkpoint last")
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
    else:
        weights_path = run_dir / "checkpoint.pt"
        if not weights_path.is_file():
            raise _Refused(f"{run_dir} has no checkpoint.pt")
        state = torch.load(weights_path, map_location="cpu", weights_only=False)["model"]
    config = dict(doc["model"])
    config["backend"] = "auto"  # the run may have forced triton; the check runs on the CPU
    try:
        model = build_model(config.pop("variant"), **config)
        model.load_state_dict(state)
    except (TypeError, ValueError, RuntimeError, KeyError) as e:
        raise _Refused(f"cannot rebuild the run's model from {cfg_path} and {weights_path.name}: {e}") from e
    return model.eval(), doc, weights_path


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    d = float((a.double() - b.double()).abs().max())
    return d, d / max(float(b.double().abs().max()), 1e-30)


def _writable(path, flag: str) -> Path:
    """``path`` with its directory made; a directory that cannot be made is refused in one line."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _Refused(f"{flag} {path}: cannot create {path.parent} ({e.strerror or e})") from e
    return path


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        return _main(args)
    except _Refused as e:
        print(f"relaxedconv export: {e}", file=sys.stderr)
        return 2


def _main(args) -> int:
    from . import __version__

    run_dir = Path(args.run_dir)
    if args.check_batch < 1:
        raise _Refused("--check-batch must be at least 1")
    for flag, target in (("--out", args.out), ("--onnx", args.onnx)):
        # Checked before the export's minutes of work; a missing directory is made, as train --out does.
        if target is not None and Path(target).is_dir():
            raise _Refused(f"{flag} {target} is a directory; give the file to write, e.g. {Path(target) / ('model.onnx' if flag == '--onnx' else 'model.pt')}")
    model, doc, weights_path = _load_run(run_dir, args.checkpoint)
    data = doc.get("data", {})
    shape = data.get("image_shape") or [model.config.get("in_channels", 3), 32, 32]
    hw = args.input_size or tuple(shape[1:])
    size = (int(shape[0]), *hw)
    print(f"{model.config['variant']} from {weights_path} at input {size[0]}x{hw[0]}x{hw[1]}")
    try:
        rows = plan(model, size, args.form)
    except ValueError as e:
        raise _Refused(str(e)) from e
    for r in rows:
        alt = "" if r["form"] == "conv" else f"  (bank {_fmt_bytes(r['bank_bytes'])}, factored {_fmt_bytes(r['factored_bytes'])})"
        where = "" if r["input_size"] is None else f" at {r['input_size'][0]}x{r['input_size'][1]}"
        print(f"  {r['name']:<20} {r['layer']:<18} -> {r['form']:<8} {_fmt_bytes(r['bytes']):>10}{where}{alt}")
    print(f"  relaxed layers hold {_fmt_bytes(sum(r['bytes'] for r in rows))} exported", flush=True)

    try:
        exported = export(model, size, args.form)
    except ValueError as e:
        raise _Refused(str(e)) from e
    x = torch.randn(args.check_batch, *size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y_ref, y = model(x), exported(x)
    diff, rel = _max_diff(y, y_ref)
    print(f"check on a batch of {args.check_batch}: max |exported - original| = {diff:.3e} (relative {rel:.3e})")
    if not rel <= args.tolerance:
        print(f"relaxedconv export: the exported model differs from the original by {rel:.3e} > --tolerance {args.tolerance}; nothing written", file=sys.stderr)
        return 1

    meta = dict(
        input_size=list(size), variant=model.config["variant"], model=model.config, classes=data.get("classes"),
        normalize=None if "mean" not in data else {"scale": 1 / 255, "mean": data["mean"], "std": data["std"]},
        source=str(weights_path), relaxedconv=__version__, torch=torch.__version__,
    )
    try:
        nbytes = save(exported, _writable(args.out, "--out"), meta)
    except OSError as e:
        raise _Refused(f"--out {args.out}: cannot write it ({e.strerror or e})") from e
    with torch.no_grad():
        reloaded = deploy.load(args.out)(x)
    print(f"wrote {args.out} ({_fmt_bytes(nbytes)}); reloaded with relaxedconv.deploy.load: max difference {_max_diff(reloaded, y)[0]:.3e}")
    if args.onnx:
        try:
            files = to_onnx(exported, x, _writable(args.onnx, "--onnx"))
        except RuntimeError as e:
            raise _Refused(str(e)) from e
        line = "wrote " + ", ".join(f"{f} ({_fmt_bytes(f.stat().st_size)})" for f in files)
        try:
            y_onnx = run_onnx(args.onnx, x)
            line += "; onnxruntime (CPU): max difference {:.3e} (relative {:.3e})".format(*_max_diff(y_onnx, y))
        except ImportError:
            line += "; onnxruntime is not installed, not checked"
        print(line)
    return 0


class _CallableModule(type(sys)):
    """``relaxedconv.export`` is this module (``relaxedconv.export.plan``, ``.save``, as the README
    names them) and, called, :func:`export`: the package exposes the function under the module's
    name, which otherwise hid the module's other functions from ``relaxedconv.export.<name>`` and
    ``import relaxedconv.export as ex``."""

    def __call__(self, model: nn.Module, input_size=None, form: str = "auto") -> nn.Module:
        return export(model, input_size, form)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
    sys.exit(main())
