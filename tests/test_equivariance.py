"""Equivariance where the method promises it, and a measured, growing error where it relaxes it.

Convention (README "Conventions"): a feature map [B, C*N, H, W] is viewed as [B, C, N, H, W]; a
strict layer with 4 | N satisfies
    f(rot90(x, 1, dims=(-2, -1))) == roll(rot90(f(x), 1, dims=(-2, -1)), N/4, rotation axis).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import relaxedconv as rc
from relaxedconv.equivariance import rotate_feature_map


F64 = torch.float64


def rot90(t, k=1):
    return torch.rot90(t, k, dims=(-2, -1))


def roll_rotations(t, n_rot, shift):
    """Cyclic shift of the rotation axis of [B, C*N, H, W] (viewed as [B, C, N, H, W])."""
    return torch.roll(t.unflatten(1, (t.shape[1] // n_rot, n_rot)), shift, dims=2).flatten(1, 2)


def rel_max(a, b):
    return float((a - b).abs().max() / b.abs().max())


def strict_stack(n_rot, *, mask=None, padding="same", backend="auto", relaxed=False):
    """lifting (K=5) -> ReLU -> group (K=3) -> Tanh -> group (K=3); fp64."""
    kw = dict(mask=mask, padding=padding, backend=backend, hidden_channels=8)
    if relaxed:
        kw.update(rotation_nonstationary=True, omega_rot=2.0)
    return nn.Sequential(
        rc.LiftingConv(3, 4, 5, n_rot, **kw),
        nn.ReLU(),
        rc.GroupConv(4, 3, 3, n_rot, **kw),
        nn.Tanh(),
        rc.GroupConv(3, 2, 3, n_rot, **kw),
    ).double()


# ---- exact rot90 equivariance of a strict stack ------------------------------------------------
ROT_CASES = [
    # (N, mask, padding, (H, W), backend)
    (4, None, "same", (9, 11), "auto"),
    (4, False, "same", (9, 11), "auto"),
    (4, True, "valid", (13, 12), "auto"),
    (4, False, "valid", (13, 12), "auto"),
    (4, None, "same", (10, 10), "materialize"),
    (4, None, "valid", (11, 14), "factored_torch"),
    (4, False, 1, (8, 11), "expand_conv"),
    (8, None, "same", (9, 11), "auto"),
    (8, False, "valid", (12, 13), "factored_torch"),
]


@pytest.mark.parametrize("n_rot, mask, padding, hw, backend", ROT_CASES)
def test_strict_stack_is_rot90_equivariant_in_the_documented_direction(n_rot, mask, padding, hw, backend):
    torch.manual_seed(0)
    f = strict_stack(n_rot, mask=mask, padding=padding, backend=backend)
    x = torch.randn(2, 3, *hw, dtype=F64)
    with torch.no_grad():
        y = f(x)
        for q in (1, 2, 3):
            y_rot = f(rot90(x, q))
            expected = roll_rotations(rot90(y, q), n_rot, q * n_rot // 4)
            assert y_rot.shape == expected.shape
            assert rel_max(y_rot, expected) < 1e-10, f"{q} quarter turn(s)"
            if q == 1:
                # The opposite direction of the rotation axis must not match (the test is not vacuous).
                wrong = roll_rotations(rot90(y, q), n_rot, -n_rot // 4)
                assert rel_max(y_rot, wrong) > 1e-2
                # nor does a spatial rotation alone.
                assert rel_max(y_rot, rot90(y, q)) > 1e-2
        # The library's own transform is the same one.
        assert rel_max(rotate_feature_map(y, 1, n_rot), roll_rotations(rot90(y), n_rot, n_rot // 4)) == 0


@pytest.mark.parametrize(
    "reduce, hw, mask, padding",
    [("max", (9, 11), None, "same"), ("mean", (10, 10), False, "valid"), ("max", (12, 9), False, "same"), ("mean", (9, 11), True, "valid")],
)
def test_strict_stack_then_pool_is_rot90_invariant(reduce, hw, mask, padding):
    torch.manual_seed(1)
    x = torch.randn(2, 3, *hw, dtype=F64)
    pool = rc.InvariantPool(4, over="all", reduce=reduce)
    strict = nn.Sequential(strict_stack(4, mask=mask, padding=padding), pool)
    relaxed = nn.Sequential(strict_stack(4, mask=mask, padding=padding, relaxed=True), pool)
    with torch.no_grad():
        y = strict(x)
        assert y.shape == (2, 2)
        for q in (1, 2, 3):
            assert rel_max(strict(rot90(x, q)), y) < 1e-10
        # A relaxed stack (omega_rot = 2) is not invariant: the check can fail.
        assert rel_max(relaxed(rot90(x)), relaxed(x)) > 1e-3
        errs = rc.equivariance_error(strict, x)
        assert set(errs) == {"rotation_90", "rotation_180", "rotation_270"}  # pooled: no spatial map
        assert max(errs.values()) < 1e-10


@pytest.mark.parametrize(
    "padding, hw, shifts",
    [
        ("same", (13, 15), ((1, 0), (0, 2), (-2, -1))),
        ("valid", (16, 14), ((2, 1), (-1, 0))),
        ("same", (16, 17), ((0, -3), (3, 3))),
    ],
)
def test_strict_stack_is_translation_equivariant_away_from_the_border(padding, hw, shifts):
    torch.manual_seed(2)
    f = strict_stack(4, padding=padding)
    x = torch.randn(2, 3, *hw, dtype=F64)
    # 'same': the zero padding reaches the receptive radius of the stack (2 + 1 + 1) into the map;
    # 'valid': the output only shrinks, and only the wrapped-around |shift| rows/columns differ.
    margin = 4 if padding == "same" else 0
    with torch.no_grad():
        y = f(x)
        for dy, dx in shifts:
            a = f(torch.roll(x, (dy, dx), dims=(-2, -1)))
            b = torch.roll(y, (dy, dx), dims=(-2, -1))
            m = margin + max(abs(dy), abs(dx))
            crop = (..., slice(m, y.shape[-2] - m), slice(m, y.shape[-1] - m))
            assert a[crop].numel() > 0
            assert rel_max(a[crop], b[crop]) < 1e-10
            # The full maps differ at the border (wrap-around and zero padding): not vacuous.
            assert rel_max(a, b) > 1e-3
        errs = rc.equivariance_error(f, x, in_rotations=1, out_rotations=4, shifts=shifts, margin=margin)
        assert errs["translation"] < 1e-10


# ---- the invariant extreme: all omegas zero -------------------------------------------------------
ZERO_CASES = [
    ("lift", "none", 4, 3),
    ("lift", "rot", 4, 5),
    ("lift", "trans", 3, 3),
    ("lift", "both", 8, 3),
    ("group", "none", 4, 3),
    ("group", "rot", 3, 5),
    ("group", "trans", 4, 3),
    ("group", "both", 4, 5),
    ("point", "none", 4, 1),
    ("point", "both", 3, 1),
]
NONSTAT = {"none": (False, False), "rot": (True, False), "trans": (False, True), "both": (True, True)}


def _layer(kind, ns, n_rot, k, *, omega_rel=0.0, omega_rot=0.0, omega_pos=0.0, **extra):
    rot, trans = NONSTAT[ns]
    kw = dict(
        rotation_nonstationary=rot, translation_nonstationary=trans, omega_rel=omega_rel,
        omega_rot=omega_rot, omega_pos=omega_pos, hidden_channels=8, **extra,
    )
    if kind == "lift":
        return rc.LiftingConv(2, 3, k, n_rot, **kw).double(), 2
    if kind == "group":
        return rc.GroupConv(2, 3, k, n_rot, **kw).double(), 2 * n_rot
    return rc.PointwiseGroupConv(2, 3, n_rot, **kw).double(), 2 * n_rot


@pytest.mark.parametrize("kind, ns, n_rot, k", ZERO_CASES)
def test_all_omegas_zero_gives_identical_output_for_every_rotation(kind, ns, n_rot, k):
    torch.manual_seed(3)
    layer, in_ch = _layer(kind, ns, n_rot, k)
    x = torch.randn(2, in_ch, 7, 9, dtype=F64)
    with torch.no_grad():
        y = layer(x).unflatten(1, (3, n_rot))
        assert (y - y[:, :, :1]).abs().max() <= 1e-12 * y.abs().max()
        # and the kernel is one constant over every unmasked coordinate (every n, n', offset, p)
        kern = layer.full_kernel((7, 9))
        keep = layer._mask_over_window(kern.dtype).bool()
        vals = kern[:, keep] if kern.dim() == 4 else kern[:, :, keep]
        vals = vals.reshape(-1, 3, 2)
        assert (vals - vals[:1]).abs().max() <= 1e-12 * vals.abs().max()
        # Non-vacuous: with omega_rel != 0 the rotations differ.
        layer.kernel_net.omega_rel.fill_(3.0)
        y = layer(x).unflatten(1, (3, n_rot))
        assert (y - y[:, :, :1]).abs().max() > 1e-3 * y.abs().max()


# ---- relaxation: error 0 at omega = 0, growing with omega ------------------------------------------
# omega is the rate (radians of every hidden unit's pre-activation per radian of rotation, or per
# unit of normalised position) of the absolute-coordinate modulation. By omega ~ 1 the relaxed
# layer's output is about as far from the transformed one as an unrelated output (relative error
# ~ sqrt 2); beyond that the error saturates, so the monotone range tested is 0 .. 1.
OMEGAS = [0.0, 1e-3, 1e-2, 1e-1, 0.5, 1.0]


@pytest.mark.parametrize("kind", ["lift", "group"])
@pytest.mark.parametrize("seed", [0, 1])
def test_rotation_error_grows_with_omega_rot(kind, seed):
    torch.manual_seed(seed)
    layer, in_ch = _layer(kind, "rot", 4, 5, omega_rel=10.0)
    x = torch.randn(2, in_ch, 11, 11, dtype=F64)
    errs = []
    for w in OMEGAS:
        with torch.no_grad():
            layer.kernel_net.omega_rot.fill_(w)
        e = rc.equivariance_error(layer, x, in_rotations=layer.in_rotations, out_rotations=4, margin=2)
        assert set(e) == {"rotation_90", "rotation_180", "rotation_270", "translation"}
        # Rotation non-stationarity keeps translation equivariance.
        assert e["translation"] < 1e-12
        errs.append(e)
    r90 = [e["rotation_90"] for e in errs]
    assert r90[0] < 1e-12  # exact at omega_rot = 0
    assert r90[1] < 1e-2  # small for small omega_rot
    assert r90[-1] > 0.1  # clearly broken for large omega_rot
    assert all(a < b for a, b in zip(r90, r90[1:])), r90
    assert 3 < r90[2] / r90[1] < 30  # smooth: ~linear in omega near 0
    for key in ("rotation_180", "rotation_270"):
        vals = [e[key] for e in errs]
        assert vals[0] < 1e-12 and vals[-1] > 0.1 and all(a < b for a, b in zip(vals, vals[1:])), (key, vals)


@pytest.mark.parametrize("kind", ["lift", "group"])
@pytest.mark.parametrize("seed", [0, 1])
def test_translation_error_grows_with_omega_pos(kind, seed):
    torch.manual_seed(seed)
    layer, in_ch = _layer(kind, "trans", 4, 3, omega_rel=10.0)
    x = torch.randn(2, in_ch, 12, 13, dtype=F64)
    shifts = ((1, 0), (0, 2), (-1, -1))
    errs = []
    for w in OMEGAS:
        with torch.no_grad():
            layer.kernel_net.omega_pos.fill_(w)
        e = rc.equivariance_error(
            layer, x, in_rotations=layer.in_rotations, out_rotations=4, shifts=shifts, margin=1
        )
        errs.append(e)
    tr = [e["translation"] for e in errs]
    assert tr[0] < 1e-12
    assert tr[1] < 1e-2
    assert tr[-1] > 0.05
    assert all(a < b for a, b in zip(tr, tr[1:])), tr
    # abs_pos is not rotation-invariant either: rotation error appears only with omega_pos.
    assert errs[0]["rotation_90"] < 1e-12 and errs[-1]["rotation_90"] > 0.05


def test_layer_equivariance_errors_locates_the_relaxed_layer():
    """A relaxed layer followed by a strict one: only the relaxed layer's own error grows."""
    torch.manual_seed(4)
    model = nn.Sequential(
        rc.LiftingConv(2, 3, 3, 4, rotation_nonstationary=True, omega_rot=0.0, hidden_channels=8),
        nn.ReLU(),
        rc.GroupConv(3, 3, 3, 4, hidden_channels=8),
    ).double()
    x = torch.randn(2, 2, 10, 11, dtype=F64)
    previous = -1.0
    for w in OMEGAS:
        with torch.no_grad():
            model[0].kernel_net.omega_rot.fill_(w)
        errs = rc.layer_equivariance_errors(model, x)
        assert set(errs) == {"0", "2"}
        assert errs["2"]["rotation_90"] < 1e-12 and errs["2"]["translation"] < 1e-12
        assert errs["0"]["translation"] < 1e-12
        assert errs["0"]["rotation_90"] > previous
        previous = errs["0"]["rotation_90"]
    assert previous > 0.1
    whole = rc.equivariance_error(model, x, out_rotations=4, margin=2)
    assert whole["rotation_90"] > 0.05  # the relaxed first layer makes the model non-equivariant


def test_rotation_nonstationary_with_zero_omega_equals_strict_layer_equivariance():
    """omega_rot = omega_pos = 0 on a layer that has both groups: exactly rot90 and shift equivariant."""
    torch.manual_seed(5)
    layer, in_ch = _layer("group", "both", 4, 5, omega_rel=10.0)
    x = torch.randn(2, in_ch, 12, 11, dtype=F64)
    e = rc.equivariance_error(layer, x, in_rotations=4, out_rotations=4, margin=2)
    assert max(e.values()) < 1e-12
    with torch.no_grad():
        layer.kernel_net.omega_rot.fill_(1.0)
    assert rc.equivariance_error(layer, x, in_rotations=4, out_rotations=4, margin=2)["rotation_90"] > 1e-2


# ---- the diagnostics themselves ---------------------------------------------------------------------
@pytest.mark.parametrize("padding", ["same", "valid", 0, 1])
def test_layer_equivariance_errors_is_zero_for_strict_layers(padding):
    torch.manual_seed(6)
    layer = rc.GroupConv(2, 3, 3, 4, padding=padding, hidden_channels=8).double()
    errs = rc.layer_equivariance_errors(layer, torch.randn(1, 8, 13, 12, dtype=F64))["GroupConv"]
    assert set(errs) == {"rotation_90", "rotation_180", "rotation_270", "translation"}
    assert max(errs.values()) < 1e-12


@pytest.mark.parametrize("padding", [2, 3])
def test_layer_equivariance_errors_is_zero_for_strict_layers_with_wide_padding(padding):
    torch.manual_seed(6)
    layer = rc.GroupConv(2, 3, 3, 4, padding=padding, hidden_channels=8).double()
    x = torch.randn(1, 8, 13, 12, dtype=F64)
    # The layer itself is translation equivariant when compared `padding` pixels from the border:
    assert rc.equivariance_error(layer, x, in_rotations=4, out_rotations=4, margin=padding)["translation"] < 1e-12
    errs = rc.layer_equivariance_errors(layer, x)["GroupConv"]
    assert errs["translation"] < 1e-12


@pytest.mark.parametrize("kwargs, msg", [
    (dict(strength=-1e-3), r"strength must be a finite number >= 0, got -0.001"),
    (dict(strength=float("nan")), r"strength must be a finite number >= 0, got nan"),
    (dict(strength="1e-3"), r"strength must be a finite number >= 0, got '1e-3'"),
    (dict(strength=1.0, p=0), r"p must be a number > 0"),
])
def test_equivariance_penalty_refuses_a_strength_or_power_that_is_no_prior(kwargs, msg):
    """A negative strength returned a negative penalty (a reward for non-equivariance); p = 0 a constant."""
    layer = rc.GroupConv(2, 2, 3, 4, rotation_nonstationary=True, omega_rot=1.0, hidden_channels=8)
    with pytest.raises(ValueError, match=msg):
        rc.equivariance_penalty(layer, **kwargs)
    assert float(rc.equivariance_penalty(layer, torch.tensor(2.0)).detach()) == pytest.approx(2.0)  # tensors pass


@pytest.mark.parametrize("fn", [rc.omegas, rc.effective_omegas, rc.kernel_nonstationarity, rc.equivariance_penalty])
def test_degree_of_equivariance_functions_refuse_what_is_not_a_module(fn):
    """omegas(3) raised AttributeError: 'int' object has no attribute 'named_modules'."""
    with pytest.raises(TypeError, match=r"expected a torch.nn.Module .*, got dict"):
        fn({"layer": 1})
