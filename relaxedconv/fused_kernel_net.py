"""The layer's hidden features z by the fused Triton kernel net (kernels/kernel_net_fused.py).

Opt-in: ``RELAXEDCONV_FUSED_KERNEL_NET=1`` makes :meth:`_RelaxedGroupConv.factored_kernel` build z
here wherever :func:`supported` holds, and the PyTorch path (checkpointed ``kernel_net.hidden``,
pad, mask) everywhere else. Off by default until a GPU has measured it.

The first pre-activation of the SIREN splits exactly over the coordinate axes [N, P, N_in, K*K]
(relaxedconv/groups.py): the relative groups, the bias and abs_rot do not depend on the output
position p, abs_pos depends on p alone. So

    R = kernel_net.first_preactivation(coords without abs_pos)    [N, J, H]   (J = N_in*K*K)
    Q = omega_pos * (abs_pos @ abs_pos_direction^T)                [P, H]      (per-position layers)

are built by ordinary PyTorch operators (a few small ones, independent of P x J), and
:class:`FusedHiddenFeatures` computes ``z = [sin(sin(R + Q) W2^T + b2) | 1] * m`` from them in one
kernel, and dR, dQ, dW2, db2 in one more. R and Q keep their autograd graphs, so the gradients
reach the first layer and the omegas through PyTorch.

Computed in the parameters' dtype (fp32 or fp64), also under ``torch.autocast``; the backends cast
z to their compute dtype as they cast the PyTorch path's z. The hidden layer's fp32 products run
on tensor cores with near fp32's accuracy (TF32x3), or as one TF32 pass where that is below what the
layer keeps of z anyway: a bf16 convolution, or torch's own TF32 matmuls allowed
(:func:`products_for`).

Under ``torch.compile`` the same kernels run as two ``torch.library`` operators,
``relaxedconv::kernel_net_fwd`` and ``relaxedconv::kernel_net_bwd``, with fake implementations and
an autograd formula, so a compiled (and CUDA-graph captured) layer keeps the fused kernel net as
one opaque call each way; in eager mode :class:`FusedHiddenFeatures` calls them without the
operator dispatch (as relaxedconv/triton_conv.py does for the convolution).
"""
from __future__ import annotations

import os
from typing import List, Optional

import torch

from . import dispatch
from .kernel_net import broadcast_shape

FLAG = "RELAXEDCONV_FUSED_KERNEL_NET"
DTYPES = (torch.float32, torch.float64)


def enabled() -> bool:
    """Whether ``RELAXEDCONV_FUSED_KERNEL_NET`` asks for the fused kernel net."""
    return os.environ.get(FLAG, "0") not in ("", "0")


def unsupported_reason(kernel_net, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why the fused kernel net cannot compute ``kernel_net``'s features on ``device`` in
    ``dtype`` (a sentence that says what to do), or None when it can."""
    depth = len(kernel_net.hidden_layers) + 2
    if depth not in (2, 3):
        return f"the fused kernel net supports kernel depth 2 or 3 (at most one hidden layer), got depth {depth}"
    if not dispatch.triton_available():
        return "the fused kernel net needs Triton, which does not import here"
    from .kernels.kernel_net_fused import MAX_HIDDEN

    if kernel_net.hidden_channels > MAX_HIDDEN:
        return f"the fused kernel net supports hidden_channels <= {MAX_HIDDEN}, got {kernel_net.hidden_channels}"
    if dtype not in DTYPES:
        return f"the fused kernel net runs in float32 or float64 parameters, got {dtype}"
    device = torch.device(device)
    if device.type != "cuda" and not (device.type == "cpu" and dispatch.interpreting()):
        return f"the fused kernel net runs on CUDA (on CPU only under TRITON_INTERPRET=1), got device {device.type!r}"
    return None


def supported(kernel_net, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether :func:`fused_hidden_features` can compute ``kernel_net``'s features on ``device``
    in ``dtype``: depth 2 or 3, H <= 64, fp32/fp64 parameters, CUDA (or CPU under the interpreter)."""
    return unsupported_reason(kernel_net, device, dtype) is None


def products_for(compute_dtype: torch.dtype | None) -> str:
    """The precision of the fused kernel net's fp32 products for a layer that convolves in
    ``compute_dtype``: one TF32 pass ("tf32") where torch itself allows TF32 matmuls, or where the
    convolution runs in bf16, which rounds z to 8 bits of mantissa right after; TF32x3 (near fp32's
    accuracy) otherwise, fp16 included (its 11 bits would show TF32's error).

    The hardware truncates tl.dot's fp32 operands to TF32 (no rounding), so one pass errs by up to
    ~3.5e-3 in t, biased low by ~6e-4 relative; in z (SIREN init, H = 32, 6.4 M samples; review of
    2026-11-27) its RMS error is 4.0e-4 against bf16's own rounding of z, 9.0e-4, and rounding z to
    bf16 after it gives 9.8e-4 RMS: the layer keeps almost nothing more of TF32's error. The PyTorch
    path under bf16 autocast, multiplying in bf16, errs 1.8e-3 RMS."""
    if compute_dtype == torch.bfloat16 or dispatch.tf32_matmuls_allowed():
        return "tf32"
    return "tf32x3"


def _forward(r, q, w2, b2, mask, products):
    from .kernels.kernel_net_fused import kernel_net_forward

    return kernel_net_forward(r, q, w2, b2, mask, products)


def _backward(r, q, w2, b2, mask, dz, products):
    from .kernels.kernel_net_fused import kernel_net_backward

    return kernel_net_backward(r, q, w2, b2, mask, dz.to(r.dtype).contiguous(), products)


@torch.library.custom_op("relaxedconv::kernel_net_fwd", mutates_args=())
def kernel_net_fwd(r: torch.Tensor, q: Optional[torch.Tensor], w2: Optional[torch.Tensor],
                   b2: Optional[torch.Tensor], mask: Optional[torch.Tensor], products: str) -> torch.Tensor:
    return _forward(r, q, w2, b2, mask, products)


@kernel_net_fwd.register_fake
def _kernel_net_fwd_fake(r, q, w2, b2, mask, products):
    n_rot, window, hidden = r.shape
    return r.new_empty((n_rot, window, hidden + 1) if q is None else (n_rot, q.shape[0], window, hidden + 1))


@torch.library.custom_op("relaxedconv::kernel_net_bwd", mutates_args=())
def kernel_net_bwd(r: torch.Tensor, q: Optional[torch.Tensor], w2: Optional[torch.Tensor],
                   b2: Optional[torch.Tensor], mask: Optional[torch.Tensor], dz: torch.Tensor,
                   products: str) -> List[torch.Tensor]:
    # An absent operand's gradient comes back as an empty tensor (an operator returns no None).
    return [r.new_empty((0,)) if g is None else g for g in _backward(r, q, w2, b2, mask, dz, products)]


@kernel_net_bwd.register_fake
def _kernel_net_bwd_fake(r, q, w2, b2, mask, dz, products):
    return [r.new_empty((0,)) if t is None else t.new_empty(t.shape) for t in (r, q, w2, b2)]


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:5])
    ctx.products = inputs[5]


def _operator_backward(ctx, dz):
    grads = kernel_net_bwd(*ctx.saved_tensors, dz, ctx.products)
    needs = ctx.needs_input_grad
    return tuple(g if needs[i] and t is not None else None
                 for i, (g, t) in enumerate(zip(grads, ctx.saved_tensors[:4]))) + (None, None)


kernel_net_fwd.register_autograd(_operator_backward, setup_context=_setup_context)


class FusedHiddenFeatures(torch.autograd.Function):
    """z = [sin(sin(R + Q) W2^T + b2) | 1] * m (depth 3; W2 = b2 = None: [sin(R + Q) | 1] * m).

    R ``[N, J, H]``, Q ``[P, H]`` or None (then z is ``[N, J, H+1]``, else ``[N, P, J, H+1]``),
    W2 ``[H, H]``, b2 ``[H]``, mask ``[J]`` or None (a constant: no gradient). The operators above
    without their dispatch, for eager mode."""

    @staticmethod
    def forward(ctx, r, q, w2, b2, mask, products):
        ctx.save_for_backward(r, q, w2, b2, mask)
        ctx.products = products
        return _forward(r, q, w2, b2, mask, products)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dz):
        r, q, w2, b2, mask = ctx.saved_tensors
        dr, dq, dw2, db2 = _backward(r, q, w2, b2, mask, dz, ctx.products)
        needs = ctx.needs_input_grad
        return (dr if needs[0] else None, dq if needs[1] else None, dw2 if needs[2] else None,
                db2 if needs[3] else None, None, None)


def _check_operands(r, q, w2, b2, mask) -> None:
    if r.dim() != 3:
        raise ValueError(f"R must be [N, J, H], got shape {tuple(r.shape)}")
    n_rot, window, hidden = r.shape
    expected = {"Q": (q, (None, hidden)), "W2": (w2, (hidden, hidden)), "b2": (b2, (hidden,)), "mask": (mask, (window,))}
    for name, (t, shape) in expected.items():
        if t is None:
            continue
        if t.dim() != len(shape) or any(s is not None and s != d for s, d in zip(shape, t.shape)):
            want = ", ".join("P" if s is None else str(s) for s in shape)
            raise ValueError(f"{name} must be [{want}] for R of shape {tuple(r.shape)}, got shape {tuple(t.shape)}")
        if t.device != r.device:
            raise ValueError(f"{name} is on {t.device} but R on {r.device}; move them to one device")
    if (w2 is None) != (b2 is None):
        raise ValueError("pass both W2 and b2 (depth 3) or neither (depth 2)")
    if r.dtype not in DTYPES:
        raise ValueError(f"the fused kernel net runs in float32 or float64, got R in {r.dtype}")


def hidden_features(r, q, w2, b2, mask, products: str = "tf32x3") -> torch.Tensor:
    """:class:`FusedHiddenFeatures` after checking the operands; every operand is cast to R's
    dtype and made contiguous (the casts and copies are differentiable). ``products``: the fp32
    products' precision (:func:`products_for`)."""
    _check_operands(r, q, w2, b2, mask)  # (the kernels' host functions refuse an unknown ``products``)
    prep = [None if t is None else t.to(r.dtype).contiguous() for t in (q, w2, b2, mask)]
    if torch.compiler.is_compiling():
        return kernel_net_fwd(r.contiguous(), *prep, products)
    return FusedHiddenFeatures.apply(r.contiguous(), *prep, products)


def position_split(kernel_net, coords: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(R ``[N, J, H]``, Q ``[P, H]`` or None) of ``kernel_net`` on ``coords`` (the dict of
    :func:`relaxedconv.groups.coordinate_groups`): pre[n, p, j] = R[n, j] + Q[p]."""
    missing = [g for g in kernel_net.groups if g not in coords]
    if missing:
        raise ValueError(f"coordinates lack the groups {missing} that the kernel net sees (it sees {list(kernel_net.groups)})")
    bad = {g: tuple(c.shape) for g, c in coords.items() if c.dim() != 5 or c.shape[-1] != 2}
    if bad:
        raise ValueError(f"coordinate groups must be broadcastable to [N, P, N_in, K*K, 2] (5 axes); got shapes {bad}")
    if ("abs_pos" in coords and coords["abs_pos"].shape[0] != 1) or any(
            c.shape[1] != 1 for g, c in coords.items() if g != "abs_pos"):
        raise ValueError("only abs_pos may vary over the position axis P (axis 1) and it must not vary over N, "
                         "as relaxedconv.groups.coordinate_groups builds them")
    n_rot, positions, n_in, k2 = broadcast_shape(*(coords[g].shape[:-1] for g in kernel_net.groups))
    hidden = kernel_net.hidden_channels
    r = kernel_net.first_preactivation(coords, skip=("abs_pos",))
    r = r.expand(n_rot, 1, n_in, k2, hidden).reshape(n_rot, n_in * k2, hidden)
    if "abs_pos" not in kernel_net.groups:
        return r, None
    # The abs_pos term of the first pre-activation, once per position.
    q = kernel_net.group_term("abs_pos", coords["abs_pos"].reshape(positions, 2))
    return r, q


def fused_hidden_features(layer_or_kernel_net, coords: dict[str, torch.Tensor], mask: torch.Tensor | None,
                          compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The layer's factor z = [Z_h | 1] * m, as :meth:`factored_kernel` builds it on the PyTorch
    path: ``[N, P, J, H+1]`` when the kernel net sees abs_pos, else ``[N, J, H+1]``, in the
    parameters' dtype. ``coords``: the coordinate groups (``layer._lattice(...)``); ``mask``: the
    window mask ``[J]`` or None (all ones); ``compute_dtype``: the dtype the convolution will run
    in, which sets the products' precision (:func:`products_for`; None: TF32x3 unless torch's TF32
    matmuls are allowed). Raises ValueError where :func:`supported` fails."""
    kn = getattr(layer_or_kernel_net, "kernel_net", layer_or_kernel_net)
    w = kn.first.weight
    reason = unsupported_reason(kn, w.device, w.dtype)
    if reason is not None:
        raise ValueError(reason + "; use the PyTorch path (layer.factored_kernel without " + FLAG + "=1)")
    # In the parameters' dtype, also under autocast (see the module docstring).
    with torch.autocast(w.device.type, enabled=False):
        r, q = position_split(kn, coords)
    w2 = b2 = None
    if kn.hidden_layers:
        w2, b2 = kn.hidden_layers[0].weight, kn.hidden_layers[0].bias
    return hidden_features(r, q, w2, b2, mask, products_for(compute_dtype))


def layer_factor(layer, out_hw, compute_dtype: torch.dtype | None = None) -> torch.Tensor | None:
    """z for ``layer.factored_kernel`` by the fused kernel net, or None where the PyTorch path
    runs: the flag unset, or an unsupported layer or device. Inside ``torch.compile`` the kernels
    are the opaque operators ``relaxedconv::kernel_net_fwd``/``_bwd``. ``compute_dtype``: as in
    :func:`fused_hidden_features`."""
    if not enabled():
        return None
    w = layer.kernel_net.first.weight
    if not supported(layer.kernel_net, w.device, w.dtype):
        return None
    coords = layer._lattice(out_hw, w.device, w.dtype)
    return fused_hidden_features(layer.kernel_net, coords, layer._window_mask(w.device, w.dtype), compute_dtype)
