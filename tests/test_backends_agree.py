"""All CPU backends compute the same layer: outputs and every gradient, fp64 and fp32 (design §3).

Cases: the full product of layer kind (lifting / group / pointwise) x non-stationarity (none,
rotation, translation, both) x N in {1, 3, 4, 8}, with K in {1, 3, 5} (pointwise: K = 1) cycled
so that each kind sees each K with each N and each non-stationarity, and the minor options (odd channel counts, padding, bias, disk mask, kernel-net depth, omega_rel and
whether it is learned) cycled through the cases so that every value appears many times.

- fp64: every backend matches `materialize` to 1e-10 relative (outputs, d/dx, d/d every
  parameter, the omegas included).
- fp32: every backend matches the fp64 `materialize` of `copy.deepcopy(layer).double()` to 1e-5
  relative. A learnable omega's gradient is one scalar, a sum over every coordinate in which
  terms can cancel, so its error is measured on the scale it is computed at,
  ||W1_g|| * ||dL/dW1_g|| / |omega| (W1_g: the first-layer weights that the omega scales: the
  learned columns of the relative groups for omega_rel, the fixed unit directions of abs_rot /
  abs_pos for omega_rot / omega_pos, whose gradient is taken by letting those buffers require
  grad), which bounds |dL/domega| by Cauchy-Schwarz since omega * dL/domega = <W1_g, dL/dW1_g>.
  That identity is itself checked exactly in fp64.
- bf16 inputs to the fp32 module: within 1e-2 (outputs) / 2e-2 (gradients) of the fp32 reference.
"""
from __future__ import annotations

import copy
import itertools

import pytest
import torch

import relaxedconv as rc
from relaxedconv.kernel_net import FREQUENCY_OF_GROUP


IMAGE_HW = (7, 9)
BATCH = 2
NONSTAT = {"none": (False, False), "rot": (True, False), "trans": (False, True), "both": (True, True)}
CHANNELS = [(3, 5), (1, 3), (5, 1), (2, 3)]
PADDINGS = ["same", "valid", 1]
MASKS = [None, False, True]


def _cases():
    """(kind, non-stationarity, N) in full; K cycles so that every (kind, non-stationarity) sees
    every K and every (kind, N) sees every K. The minor options cycle with the case index."""
    cases = []
    for kind, (si, ns), (ni, n) in itertools.product(("lift", "group", "point"), enumerate(NONSTAT), enumerate((1, 3, 4, 8))):
        k = 1 if kind == "point" else (1, 3, 5)[(ni + si) % 3]
        i = len(cases)
        cin, cout = CHANNELS[i % 4]
        cases.append(
            dict(
                kind=kind,
                ns=ns,
                N=n,
                K=k,
                cin=cin,
                cout=cout,
                padding=None if kind == "point" else PADDINGS[i % 3],
                bias=i % 5 != 2,
                mask=MASKS[(i // 3) % 3],
                depth=2 if i % 7 == 3 else 3,
                omega_rel=10.0 if i % 2 else 3.0,
                learn_rel=(i // 2) % 2 == 0,
            )
        )
    return cases


CASES = _cases()


def _case_id(c):
    return (
        f"{c['kind']}-{c['ns']}-N{c['N']}-K{c['K']}-C{c['cin']}to{c['cout']}-pad{c['padding']}"
        f"-{'bias' if c['bias'] else 'nobias'}-mask{c['mask']}-d{c['depth']}"
        f"-wrel{c['omega_rel']:g}{'L' if c['learn_rel'] else 'F'}"
    )


def make_layer(c):
    rot, trans = NONSTAT[c["ns"]]
    kw = dict(
        rotation_nonstationary=rot,
        translation_nonstationary=trans,
        omega_rel=c["omega_rel"],
        omega_rot=0.7 if rot else 0.0,
        omega_pos=1.3 if trans else 0.0,
        learn_omega_rel=c["learn_rel"],
        learn_omega_rot=True,
        learn_omega_pos=True,
        hidden_channels=8,
        kernel_depth=c["depth"],
        bias=c["bias"],
        mask=c["mask"],
    )
    if c["kind"] == "lift":
        layer = rc.LiftingConv(c["cin"], c["cout"], c["K"], c["N"], padding=c["padding"], **kw)
    elif c["kind"] == "group":
        layer = rc.GroupConv(c["cin"], c["cout"], c["K"], c["N"], padding=c["padding"], **kw)
    else:
        layer = rc.PointwiseGroupConv(c["cin"], c["cout"], c["N"], **kw)
    in_ch = c["cin"] * (1 if c["kind"] == "lift" else c["N"])
    return layer, in_ch


def backends_for(c):
    names = ["materialize", "factored_torch"]
    if not NONSTAT[c["ns"]][1]:
        names.append("expand_conv")
    return names


def run(layer, x, backend, gy):
    """Output, d/dx and d/d(each trainable parameter) of sum(y * gy)."""
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    # The fixed absolute-coordinate directions are buffers; their gradient (taken here only)
    # gives the scale of the omega_rot / omega_pos gradients (see omega_scale).
    directions = {n: b for n, b in layer.named_buffers() if n.endswith("_direction")}
    for b in directions.values():
        b.grad = None
        b.requires_grad_(True)
    try:
        y = layer(x, backend=backend)
        (y * gy).sum().backward()
    finally:
        for b in directions.values():
            b.requires_grad_(False)
    grads = {name: p.grad.detach().clone() for name, p in layer.named_parameters() if p.requires_grad}
    grads.update({name: b.grad.detach().clone() for name, b in directions.items()})
    return y.detach(), x.grad.detach().clone(), grads


def rel(a, b):
    a, b = a.double(), b.double()
    if b.norm() == 0:  # an exactly-zero reference (e.g. omega_rel of a 1x1 lifting window)
        return 0.0 if a.norm() == 0 else float("inf")
    return float((a - b).norm() / b.norm())


def omega_names(layer):
    return [f"kernel_net.omega_{k}" for k in layer.kernel_net.omegas()]


def omega_scale(layer, grads, omega_key):
    """||W1_g|| * ||dL/dW1_g|| / |omega| for the first-layer weights that this omega scales."""
    net = layer.kernel_net
    if omega_key == "rel":  # the learned first layer sees the relative groups only
        w, gw = net.first.weight.detach(), grads["kernel_net.first.weight"]
    else:
        (group,) = [g for g in net.absolute_groups if FREQUENCY_OF_GROUP[g] == omega_key]
        w, gw = getattr(net, f"{group}_direction").detach(), grads[f"kernel_net.{group}_direction"]
    omega = float(getattr(net, f"omega_{omega_key}").detach())
    return float(w.norm() * gw.norm()) / abs(omega), float((w * gw).sum()) / omega


def _inputs(c, layer, in_ch, dtype):
    x = torch.randn(BATCH, in_ch, *IMAGE_HW, dtype=dtype)
    with torch.no_grad():
        gy = torch.randn_like(layer(x))
    return x, gy


@pytest.mark.parametrize("c", CASES, ids=_case_id)
def test_backends_agree_fp64(c):
    torch.manual_seed(CASES.index(c))
    layer, in_ch = make_layer(c)
    layer = layer.double()
    x, gy = _inputs(c, layer, in_ch, torch.float64)
    ref = run(layer, x, "materialize", gy)
    y_ref, gx_ref, g_ref = ref

    # The reference is not vacuous: the output and every gradient are non-zero, and the omegas
    # that are learnable have a gradient (omega_rel only when learn_omega_rel=True).
    assert y_ref.norm() > 0 and gx_ref.norm() > 0
    rel_pos_is_zero = c["kind"] == "lift" and c["K"] == 1  # a 1x1 lifting window: rel_pos = 0 only
    for name, g in g_ref.items():
        if rel_pos_is_zero and name == "kernel_net.omega_rel":
            assert float(g) == 0.0  # omega_rel multiplies zero coordinates
            continue
        if rel_pos_is_zero and name == "kernel_net.first.weight":
            assert g[:, :2].abs().max() == 0  # the rel_pos columns see zero coordinates
            g = g[:, 2:]
        if g.numel():
            assert g.norm() > 0, f"zero gradient for {name}"
    rot, trans = NONSTAT[c["ns"]]
    assert ("kernel_net.omega_rot" in g_ref) == rot
    assert ("kernel_net.omega_pos" in g_ref) == trans
    assert ("kernel_net.omega_rel" in g_ref) == c["learn_rel"]
    if not c["learn_rel"]:
        assert layer.kernel_net.omega_rel.grad is None

    # omega * dL/domega == <W1_g, dL/dW1_g>: the omega gradient is consistent with the first layer's.
    for key in layer.kernel_net.omegas():
        name = f"kernel_net.omega_{key}"
        if name in g_ref:
            scale, via_w1 = omega_scale(layer, g_ref, key)
            assert abs(float(g_ref[name]) - via_w1) <= 1e-10 * scale, name

    for backend in backends_for(c)[1:]:
        y, gx, grads = run(layer, x, backend, gy)
        assert y.shape == y_ref.shape and y.dtype == torch.float64
        assert rel(y, y_ref) < 1e-10, f"{backend}: output"
        assert rel(gx, gx_ref) < 1e-10, f"{backend}: d/dx"
        assert grads.keys() == g_ref.keys()
        for name in g_ref:
            assert rel(grads[name], g_ref[name]) < 1e-10, f"{backend}: d/d{name}"


@pytest.mark.parametrize("c", CASES, ids=_case_id)
def test_fp32_backends_match_fp64_reference(c):
    torch.manual_seed(1000 + CASES.index(c))
    layer, in_ch = make_layer(c)
    layer64 = copy.deepcopy(layer).double()
    x, gy = _inputs(c, layer, in_ch, torch.float32)
    y_ref, gx_ref, g_ref = run(layer64, x.double(), "materialize", gy.double())
    omegas = set(omega_names(layer))

    for backend in backends_for(c):
        y, gx, grads = run(layer, x, backend, gy)
        assert y.dtype == torch.float32
        assert rel(y, y_ref) < 1e-5, f"{backend}: output"
        assert rel(gx, gx_ref) < 1e-5, f"{backend}: d/dx"
        assert grads.keys() == g_ref.keys()
        for name in g_ref:
            assert grads[name].dtype == torch.float32
            if name in omegas:
                scale, _ = omega_scale(layer64, g_ref, name.rsplit("_", 1)[1])
                err = abs(float(grads[name]) - float(g_ref[name]))
                assert err <= 1e-5 * scale, f"{backend}: d/d{name} error {err:.3g} at scale {scale:.3g}"
            else:
                assert rel(grads[name], g_ref[name]) < 1e-5, f"{backend}: d/d{name}"


@pytest.mark.parametrize("c", CASES[::3], ids=_case_id)
def test_bf16_input_matches_fp32_reference(c):
    """Design §3: bf16 within 1e-2 of an fp32 reference (the module stays fp32, as under autocast).

    The reference sees the same bf16-rounded input and output gradient. Outputs: 1e-2 relative;
    gradients (summed in bf16 over whole maps): 2e-2.
    """
    torch.manual_seed(2000 + CASES.index(c))
    layer, in_ch = make_layer(c)
    x, gy = _inputs(c, layer, in_ch, torch.float32)
    x, gy = x.bfloat16(), gy.bfloat16()
    y_ref, gx_ref, g_ref = run(layer, x.float(), "materialize", gy.float())
    for backend in backends_for(c):
        y, gx, grads = run(layer, x, backend, gy)
        assert y.dtype == torch.bfloat16 and gx.dtype == torch.bfloat16
        assert rel(y, y_ref) < 1e-2, f"{backend}: output"
        assert rel(gx, gx_ref) < 2e-2, f"{backend}: d/dx"
        for name in g_ref:
            assert grads[name].dtype == torch.float32  # parameters stay fp32
            if name.startswith("kernel_net.omega_"):
                scale, _ = omega_scale(layer, g_ref, name.rsplit("_", 1)[1])
                assert abs(float(grads[name]) - float(g_ref[name])) <= 2e-2 * scale, f"{backend}: d/d{name}"
            else:
                assert rel(grads[name], g_ref[name]) < 2e-2, f"{backend}: d/d{name}"


def test_case_table_covers_the_issue():
    """The cycled minor options really do appear (guards against an edit that loses them)."""
    seen = {k: {str(c[k]) for c in CASES} for k in ("kind", "ns", "N", "K", "cin", "cout", "padding", "bias", "mask", "learn_rel")}
    assert seen["kind"] == {"lift", "group", "point"}
    assert seen["ns"] == set(NONSTAT)
    assert seen["N"] == {"1", "3", "4", "8"} and seen["K"] == {"1", "3", "5"}
    assert {"1", "3", "5"} <= seen["cin"] | seen["cout"]
    assert {"same", "valid", "1"} <= seen["padding"]
    assert seen["bias"] == {"True", "False"} and seen["mask"] == {"None", "True", "False"}
    assert seen["learn_rel"] == {"True", "False"}
    assert IMAGE_HW[0] != IMAGE_HW[1]
    pairs = {(c["kind"], c["N"], c["K"]) for c in CASES} | {(c["kind"], c["ns"], c["K"]) for c in CASES}
    for kind in ("lift", "group"):
        for k in (1, 3, 5):
            assert all((kind, n, k) in pairs for n in (1, 3, 4, 8))
            assert all((kind, ns, k) in pairs for ns in NONSTAT)


@pytest.mark.parametrize("c", CASES[::5], ids=_case_id)
def test_an_empty_batch_gives_an_empty_output_and_zero_gradients(c):
    """A batch of 0 (a loader's empty last shard) runs on every backend: the output of the right
    shape, and zero gradients, as nn.Conv2d gives. factored_torch's and triton's stationary paths
    reshaped with a -1, which an empty tensor leaves ambiguous."""
    pytest.importorskip("triton")
    torch.manual_seed(0)
    layer, in_ch = make_layer(c)
    x = torch.randn(0, in_ch, *IMAGE_HW)
    ref = layer(torch.randn(1, in_ch, *IMAGE_HW), backend="materialize")
    for backend in backends_for(c) + ["triton"]:
        y, dx, grads = run(layer, x, backend, torch.randn(0, *ref.shape[1:]))
        assert y.shape == (0, *ref.shape[1:]), backend
        assert dx.shape == x.shape, backend
        assert all(float(g.abs().sum()) == 0.0 for g in grads.values()), backend
