"""Load and run a model written by ``relaxedconv export`` with nothing but PyTorch.

This file imports only torch and the standard library, never relaxedconv: copy it next to your
application and load an exported model without installing relaxedconv (or Triton)::

    import deploy                                  # this file, copied (any module name works)
    model = deploy.load("model.pt")                # a torch.fx.GraphModule in eval mode
    logits = model(images)                         # images normalised as in training: model.meta

An exported model is a ``torch.fx.GraphModule`` whose leaves are ``torch.nn`` modules (``Conv2d``,
``BatchNorm2d``, ``GroupNorm``, ``Linear``, ...) and the three small modules below. The file
``relaxedconv export`` writes holds no pickled classes: a plain description of that graph (module
types with their constructor arguments, and the wiring), the ``state_dict`` and metadata, so
``torch.load(path, weights_only=True)`` reads it and :func:`build` rebuilds the model from the
description alone.

The description names callables by their import path; :func:`build` accepts only public functions
of torch's tensor namespaces, ``operator`` and ``math`` (not torch's file I/O, nor those that fetch
attributes or call what they are given), public tensor methods, reads of tensor properties
(``shape``, ``dtype``, ...) and plain identifiers where torch.fx writes names into Python source.
That keeps a stray file from naming arbitrary code, but treat a model file like any other program
you run.
"""
from __future__ import annotations

import builtins
import importlib
import inspect
import keyword

import torch
import torch.nn.functional as F
from torch import fx, nn

FORMAT = "relaxedconv-exported-model"
VERSION = 1


# ---- the plain modules ------------------------------------------------------------------------
# Feature maps on R^2 x| C_N are [B, C*N, H, W] with channel index c*N + n; J = N_in*K*K is one
# input channel's window, ordered (n', kh, kw) as F.unfold orders it.


class _FixedSizeConv(nn.Module):
    """Shared by the two per-position forms: geometry, the input-size check, im2col."""

    def __init__(self, in_channels, out_channels, in_rotations, out_rotations, kernel_size, padding, input_size, bias):
        super().__init__()
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.in_rotations, self.out_rotations = int(in_rotations), int(out_rotations)
        self.kernel_size, self.padding = int(kernel_size), int(padding)
        self.input_size = tuple(int(s) for s in input_size)
        h, w = self.input_size
        grow = 2 * self.padding - self.kernel_size + 1
        self.output_size = (h + grow, w + grow)
        if min(self.output_size) < 1:
            raise ValueError(f"{type(self).__name__}: input {h}x{w} is too small for kernel {kernel_size}, padding {padding}")
        self.window = self.in_rotations * self.kernel_size**2
        self.positions = self.output_size[0] * self.output_size[1]
        self.bias = nn.Parameter(torch.zeros(self.out_channels * self.out_rotations)) if bias else None

    def _columns(self, x):
        """im2col of ``x`` after checking its shape: [B, C_in, J, P]."""
        expected = (self.in_channels * self.in_rotations, *self.input_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"{type(self).__name__} was exported for inputs [B, {expected[0]}, {expected[1]}, {expected[2]}] "
                f"(its kernel differs at each of the {self.output_size[0]}x{self.output_size[1]} output positions), "
                f"got {tuple(x.shape)}; export the model again for this input size (relaxedconv export --input-size)"
            )
        cols = F.unfold(x, self.kernel_size, padding=self.padding)
        return cols.reshape(x.shape[0], self.in_channels, self.window, self.positions)

    def _finish(self, y):
        """[B, C_out*N, P] -> [B, C_out*N, H_out, W_out] plus bias."""
        if self.bias is not None:
            y = y + self.bias[None, :, None]
        return y.reshape(y.shape[0], self.out_channels * self.out_rotations, *self.output_size)

    def extra_repr(self):
        return (
            f"{self.in_channels}, {self.out_channels}, in_rotations={self.in_rotations}, "
            f"out_rotations={self.out_rotations}, kernel_size={self.kernel_size}, padding={self.padding}, "
            f"input_size={self.input_size}, bias={self.bias is not None}"
        )


class PerPositionConv2d(_FixedSizeConv):
    """A translation non-stationary group convolution at one input size: a kernel per output position.

    ``weight[p, i*J + j, o*N + n]`` is the kernel from input channel i, window entry j to output
    channel o, rotation n at output position p; the layer is one batched matmul per position.
    """

    def __init__(self, in_channels, out_channels, in_rotations, out_rotations, kernel_size, padding, input_size, bias=True):
        super().__init__(in_channels, out_channels, in_rotations, out_rotations, kernel_size, padding, input_size, bias)
        shape = (self.positions, self.in_channels * self.window, self.out_channels * self.out_rotations)
        self.weight = nn.Parameter(torch.zeros(shape))

    def forward(self, x):
        cols = self._columns(x).flatten(1, 2)  # [B, C_in*J, P]
        y = torch.bmm(cols.permute(2, 0, 1), self.weight)  # [P, B, C_out*N]
        return self._finish(y.permute(1, 2, 0))


class FactoredPerPositionConv2d(_FixedSizeConv):
    """The same layer stored as the factors of design.md §2, smaller when C_out*C_in > H+1:

        y[b, o*N + n, p] = sum_{i,h} w[o, i, h] * sum_j z[n, p, j, h] * x_cols[b, i, j, p]

    ``z`` [N, P, J, H'] holds the kernel net's hidden features at every coordinate (masked, with a
    ones column for the last layer's bias), ``w`` [C_out, C_in, H'] its last layer.
    """

    def __init__(self, in_channels, out_channels, in_rotations, out_rotations, kernel_size, padding, input_size, hidden, bias=True):
        super().__init__(in_channels, out_channels, in_rotations, out_rotations, kernel_size, padding, input_size, bias)
        self.hidden = int(hidden)
        self.z = nn.Parameter(torch.zeros(self.out_rotations, self.positions, self.window, self.hidden))
        self.w = nn.Parameter(torch.zeros(self.out_channels, self.in_channels, self.hidden))

    def forward(self, x):
        cols = self._columns(x)
        # One output rotation at a time keeps U = Z^T X at [B, C_in, P, H'] instead of N times that.
        ys = [
            torch.einsum("biph,oih->bop", torch.einsum("bijp,pjh->biph", cols, self.z[n]), self.w)
            for n in range(self.out_rotations)
        ]
        y = torch.stack(ys, dim=2).flatten(1, 2)  # [B, C_out*N, P], channel o*N + n
        return self._finish(y)

    def extra_repr(self):
        return super().extra_repr() + f", hidden={self.hidden}"


class RotationSpacePool(nn.Module):
    """Max or mean of ``[B, C*N, H, W]`` over rotations and/or space: "all" -> [B, C],
    "rotation" -> [B, C, H, W], "space" -> [B, C*N]."""

    def __init__(self, group_order, over="all", reduce="max"):
        super().__init__()
        if over not in ("all", "rotation", "space") or reduce not in ("max", "mean"):
            raise ValueError(f"RotationSpacePool: over must be all/rotation/space and reduce max/mean, got {over!r}, {reduce!r}")
        self.group_order, self.over, self.reduce = int(group_order), over, reduce

    def forward(self, x):
        n = self.group_order
        if x.dim() != 4 or x.shape[1] % n != 0:
            raise ValueError(f"RotationSpacePool: expected [B, C*{n}, H, W], got shape {tuple(x.shape)}")
        if self.over == "space":
            dims, g = (-2, -1), x
        else:
            g = x.reshape(x.shape[0], x.shape[1] // n, n, x.shape[2], x.shape[3])
            dims = (2,) if self.over == "rotation" else (2, 3, 4)
        return g.amax(dims) if self.reduce == "max" else g.mean(dims)

    def extra_repr(self):
        return f"group_order={self.group_order}, over={self.over!r}, reduce={self.reduce!r}"


PLAIN_MODULES = {cls.__name__: cls for cls in (PerPositionConv2d, FactoredPerPositionConv2d, RotationSpacePool)}


# ---- description <-> GraphModule ----------------------------------------------------------------
# Where traced models' functions live (torch.fx names F.gelu etc. by their torch._C._nn home);
# torch's file and network I/O is left out.
_ALLOWED_FUNCTION_MODULES = (
    "torch", "torch.nn.functional", "torch.functional", "torch._C._nn", "torch.special", "torch.fft",
    "torch.linalg", "operator", "_operator", "math",
)
# torch's file I/O, and functions that reach other objects or call what they are given (a node's
# value): with them a description could walk to os.system and call it. Private functions are refused
# too, but for _ALLOWED_PRIVATE_FUNCTIONS (torch._import_dotted_name imports anything; dunders lead
# out of any sandbox).
_DENIED_FUNCTIONS = {
    "load", "save", "from_file",
    "attrgetter", "methodcaller", "call", "compile", "cond", "vmap", "while_loop", "set_default_tensor_type",
}
_ALLOWED_BUILTINS = {"getattr": getattr, "len": len}
# Private functions torch.fx records from ordinary model code (torch._assert: a symbolically traced
# assert); every other name starting with "_" is refused (torch._import_dotted_name imports anything).
_ALLOWED_PRIVATE_FUNCTIONS = {"torch._assert"}
# What getattr may read (torch.fx records ``x.shape`` etc. as getattr calls): values, not methods.
_GETATTR_NAMES = {"shape", "dtype", "device", "ndim", "layout", "is_cuda", "requires_grad", "T", "mT", "H", "mH", "real", "imag"}
# Tensor methods that call a callable or expose storage (files: UntypedStorage.from_file).
_DENIED_METHODS = {"apply_", "map_", "map2_", "register_hook", "register_post_accumulate_grad_hook", "storage",
                   "untyped_storage", "set_", "share_memory_"}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype(name: str) -> torch.dtype:
    d = getattr(torch, name, None)
    if not isinstance(d, torch.dtype):
        raise ValueError(f"unknown dtype {name!r} in the model description")
    return d


def _encode(a, where: str):
    if isinstance(a, fx.Node):
        return {"node": a.name}
    if a is None or isinstance(a, (bool, int, float, str)):
        return a
    if isinstance(a, (tuple, torch.Size)):
        return {"tuple": [_encode(v, where) for v in a]}
    if isinstance(a, list):
        return [_encode(v, where) for v in a]
    if isinstance(a, dict):
        return {"dict": {str(k): _encode(v, where) for k, v in a.items()}}
    if isinstance(a, slice):
        return {"slice": [_encode(a.start, where), _encode(a.stop, where), _encode(a.step, where)]}
    if isinstance(a, torch.dtype):
        return {"dtype": _dtype_name(a)}
    if isinstance(a, torch.memory_format):
        return {"memory_format": str(a).removeprefix("torch.")}
    raise TypeError(f"cannot describe the value {a!r} ({type(a).__name__}) in {where}")


def _decode(a, nodes: dict):
    if isinstance(a, list):
        return [_decode(v, nodes) for v in a]
    if not isinstance(a, dict):
        return a
    (tag, v), = a.items()
    if tag == "node":
        return nodes[v]
    if tag == "tuple":
        return tuple(_decode(x, nodes) for x in v)
    if tag == "dict":
        return {k: _decode(x, nodes) for k, x in v.items()}
    if tag == "slice":
        return slice(*(_decode(x, nodes) for x in v))
    if tag == "dtype":
        return _dtype(v)
    if tag == "memory_format":
        fmt = getattr(torch, v, None) if isinstance(v, str) and not v.startswith("_") else None
        if not isinstance(fmt, torch.memory_format):  # else any torch attribute (torch.load) could be an argument
            raise ValueError(f"unknown memory format {v!r} in the model description")
        return fmt
    raise ValueError(f"unknown tag {tag!r} in the model description")


def _function_name(fn) -> str:
    if getattr(builtins, getattr(fn, "__name__", ""), None) is fn:
        return f"builtins.{fn.__name__}"
    return fx.node._get_qualified_name(fn)


def _resolve_function(name: str):
    if name.startswith("builtins."):
        fn = _ALLOWED_BUILTINS.get(name.removeprefix("builtins."))
        if fn is None:
            raise ValueError(f"the model description calls {name}, which load() does not allow")
        return fn
    module, _, attr = name.rpartition(".")
    private = attr.startswith("_") and name not in _ALLOWED_PRIVATE_FUNCTIONS
    if module not in _ALLOWED_FUNCTION_MODULES or attr in _DENIED_FUNCTIONS or private:
        raise ValueError(
            f"the model description calls {name}; load() allows only public functions of "
            f"{', '.join(_ALLOWED_FUNCTION_MODULES)} (and {', '.join(sorted(_ALLOWED_PRIVATE_FUNCTIONS))}), none that "
            "fetches attributes or calls what it is given"
        )
    fn = getattr(importlib.import_module(module), attr, None)
    if not callable(fn):
        raise ValueError(f"cannot resolve {name} from the model description")
    return fn


def _module_type_name(m: nn.Module) -> str:
    cls = type(m)
    if PLAIN_MODULES.get(cls.__name__) is cls:
        return cls.__name__
    if getattr(nn, cls.__name__, None) is cls:
        return f"torch.nn.{cls.__name__}"
    raise TypeError(
        f"cannot describe a {cls.__module__}.{cls.__name__}: an exported model may hold only torch.nn modules "
        f"and {', '.join(PLAIN_MODULES)}"
    )


def _module_class(name: str):
    if name.startswith("torch.nn."):
        cls = getattr(nn, name.removeprefix("torch.nn."), None)
    else:
        cls = PLAIN_MODULES.get(name)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"unknown module type {name!r} in the model description")
    return cls


def _new_module(spec: dict) -> nn.Module:
    return _module_class(spec["type"])(**{k: _decode(v, {}) for k, v in spec["kwargs"].items()})


def _module_kwargs(m: nn.Module, where: str) -> dict:
    """Constructor arguments read back from the attributes of the same names (torch.nn's convention
    and this file's); a tensor-or-None attribute stands for a bool flag (``bias``)."""
    kwargs = {}
    for p in list(inspect.signature(type(m).__init__).parameters.values())[1:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.name in ("device", "dtype"):
            continue
        if not hasattr(m, p.name):
            if p.default is p.empty:
                raise TypeError(f"cannot describe {where}: no attribute for its constructor argument {p.name!r}")
            continue
        v = getattr(m, p.name)
        if v is None or isinstance(v, torch.Tensor):
            v = v is not None
        kwargs[p.name] = _encode(v, f"{where}.{p.name}")
    return kwargs


def describe(model: fx.GraphModule) -> dict:
    """The plain description of an exported model: everything but the tensor values.

    Raises TypeError when the model holds something :func:`build` could not recreate; every
    module's ``repr`` is checked against a rebuilt one, so a lost constructor argument shows."""
    if not isinstance(model, fx.GraphModule):
        raise TypeError(f"describe() takes the torch.fx.GraphModule that export() returns, got {type(model).__name__}")
    modules, attributes, graph = {}, {}, []
    for node in model.graph.nodes:
        target = node.target
        if node.op == "call_module":
            m = model.get_submodule(target)
            modules[target] = {"type": _module_type_name(m), "kwargs": _module_kwargs(m, target)}
            with torch.device("meta"):  # the structure only: no memory for the weights
                rebuilt = _new_module(modules[target])
            if repr(rebuilt) != repr(m):
                raise TypeError(f"cannot describe {target}: rebuilt as {rebuilt!r}, not {m!r}")
        elif node.op == "get_attr":
            owner, _, field = target.rpartition(".")
            holder = model.get_submodule(owner)
            t = getattr(holder, field)
            if field in holder._parameters:
                kind = "parameter"
            elif field in holder._buffers:
                kind = "buffer"
            else:
                raise TypeError(f"cannot describe {target}: a graph attribute that is neither a parameter nor a buffer")
            attributes[target] = {"kind": kind, "shape": list(t.shape), "dtype": _dtype_name(t.dtype)}
        elif node.op == "call_function":
            target = _function_name(target)
        graph.append(
            {"name": node.name, "op": node.op, "target": target,
             "args": _encode(node.args, node.name), "kwargs": _encode(node.kwargs, node.name)}
        )
    dtypes = {k: _dtype_name(v.dtype) for k, v in model.state_dict().items()}
    return {"modules": modules, "attributes": attributes, "graph": graph, "dtypes": dtypes}


def _check_public_path(name, what: str, *, private_ok: bool = False) -> None:
    """A module/attribute path or method name of the description: dotted identifiers (or indices of
    a Sequential), no dunder; with ``private_ok`` False none starting with "_" either. Submodule and
    attribute names may be private (``self._fc``): they are looked up only among the modules and
    tensors the description itself builds, and written into the forward as ``self.<name>``."""
    parts = name.split(".") if isinstance(name, str) else [None]
    if not all(isinstance(p, str) and ((p.isidentifier() and not p.startswith("__" if private_ok else "_")) or p.isdigit())
               for p in parts):
        raise ValueError(f"the model description names the {what} {name!r}, which load() does not allow")


def _is_name(s) -> bool:
    """A plain Python identifier: what torch.fx may write into the forward's source as it is."""
    return isinstance(s, str) and s.isidentifier() and not keyword.iskeyword(s)


def _check_node(op: str, target, args, kwargs) -> None:
    """Refuse a node that could reach beyond tensor arithmetic (see _DENIED_FUNCTIONS). torch.fx
    writes a placeholder's target and the keyword names into the forward's Python source as they
    are: those must be plain identifiers, or loading a file would run code of its choosing."""
    if not isinstance(kwargs, dict) or not all(_is_name(k) for k in kwargs):
        raise ValueError(f"the model description passes keyword arguments {list(kwargs) if isinstance(kwargs, dict) else kwargs!r}, which load() does not allow")
    if op == "placeholder":
        if not _is_name(target):
            raise ValueError(f"the model description names an input {target!r}, which load() does not allow")
    elif op in ("call_module", "get_attr"):
        _check_public_path(target, "submodule or attribute", private_ok=True)
    elif op == "call_method":
        _check_public_path(target, "method")
        if target in _DENIED_METHODS or not callable(getattr(torch.Tensor, target, None)):
            raise ValueError(f"the model description calls the method {target!r}; load() allows only torch.Tensor methods")
    elif op == "call_function" and target is getattr:
        attr = args[1] if len(args) > 1 else None
        if attr not in _GETATTR_NAMES:
            raise ValueError(f"the model description reads the attribute {attr!r}; load() allows only {sorted(_GETATTR_NAMES)}")


def build(description: dict) -> fx.GraphModule:
    """A fresh exported model (parameters zero) from :func:`describe`'s description, in eval mode."""
    parts: dict = {}
    for name, spec in description["modules"].items():
        _check_public_path(name, "submodule", private_ok=True)
        parts[name] = _new_module(spec)
    for name, spec in description["attributes"].items():
        _check_public_path(name, "attribute", private_ok=True)
        t = torch.zeros(spec["shape"], dtype=_dtype(spec["dtype"]))
        parts[name] = nn.Parameter(t) if spec["kind"] == "parameter" else t
    graph, nodes = fx.Graph(), {}
    for spec in description["graph"]:
        target = spec["target"]
        if spec["op"] == "call_function":
            target = _resolve_function(target)
        args, kwargs = _decode(spec["args"], nodes), _decode(spec["kwargs"], nodes)
        _check_node(spec["op"], target, args, kwargs)
        node = graph.create_node(spec["op"], target, args, kwargs, name=spec["name"])
        nodes[spec["name"]] = node
    model = fx.GraphModule(parts, graph, class_name="ExportedModel")
    for name, spec in description["attributes"].items():
        owner, _, field = name.rpartition(".")
        holder = model.get_submodule(owner)
        if spec["kind"] == "buffer" and field not in holder._buffers:  # keep it in the state_dict
            t = getattr(holder, field)
            delattr(holder, field)
            holder.register_buffer(field, t)
    tensors = dict(model.named_parameters())
    tensors.update(model.named_buffers())
    for key, dtype in description["dtypes"].items():
        if key in tensors and tensors[key].dtype != _dtype(dtype):
            tensors[key].data = tensors[key].data.to(_dtype(dtype))
    return model.eval()


def load(path, device="cpu") -> fx.GraphModule:
    """The model saved by ``relaxedconv export`` (or ``relaxedconv.export.save``) on ``device``, in
    eval mode; ``model.meta`` holds what was saved with it (input size, the training normalisation)."""
    saved = torch.load(path, map_location=device, weights_only=True)
    if not isinstance(saved, dict) or saved.get("format") != FORMAT:
        raise ValueError(f"{path} is not a model written by relaxedconv export (no format {FORMAT!r})")
    if saved.get("version", 0) > VERSION:
        raise ValueError(f"{path} was written in format version {saved['version']}; this file reads up to {VERSION}")
    model = build(saved["architecture"])
    model.load_state_dict(saved["state_dict"])
    model.meta = dict(saved.get("meta", {}))
    return model.to(device)


__all__ = ["FactoredPerPositionConv2d", "PerPositionConv2d", "RotationSpacePool", "build", "describe", "load"]
