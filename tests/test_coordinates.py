"""Coordinates of design §1 and the kernel net that reads them, checked against the formulas directly.

Chart: (x, y) = (column offset, -row offset) / r (x right, y up), so torch.rot90(img, 1) is R(+pi/2).
"""
from __future__ import annotations

import math

import pytest
import torch

import relaxedconv as rc
from relaxedconv.groups import (
    coordinate_groups,
    disk_mask,
    kernel_offsets,
    output_positions,
    rotation_angles,
)
from relaxedconv.kernel_net import FREQUENCY_OF_GROUP, SirenKernelNet, broadcast_shape


F64 = torch.float64


def R(theta):
    c, s = math.cos(theta), math.sin(theta)
    return torch.tensor([[c, -s], [s, c]], dtype=F64)


# ---- groups.py ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 3, 4, 8])
def test_rotation_angles(n):
    a = rotation_angles(n, dtype=F64)
    assert a.shape == (n,)
    assert torch.allclose(a, torch.tensor([2 * math.pi * i / n for i in range(n)], dtype=F64), atol=1e-15)
    with pytest.raises(ValueError, match="group order must be >= 1"):
        rotation_angles(0)


def test_kernel_offsets_chart_and_order():
    off = kernel_offsets(3, dtype=F64)
    assert off.shape == (9, 2)
    # row-major (kh, kw): first the top row, left to right; y is up
    expected = torch.tensor(
        [[-1, 1], [0, 1], [1, 1], [-1, 0], [0, 0], [1, 0], [-1, -1], [0, -1], [1, -1]], dtype=F64
    )
    assert torch.equal(off, expected)
    off5 = kernel_offsets(5, dtype=F64)
    assert off5.abs().max() == 1.0 and torch.equal(off5[0], torch.tensor([-1.0, 1.0], dtype=F64))
    assert torch.equal(kernel_offsets(1, dtype=F64), torch.zeros(1, 2, dtype=F64))


def test_rot90_is_positive_quarter_turn_in_the_chart():
    """torch.rot90(img, 1, dims=(-2, -1)) moves the pixel at chart offset (x, y) to R(pi/2)(x, y)."""
    off = kernel_offsets(5, dtype=F64)
    for j in range(25):
        img = torch.zeros(25, dtype=F64)
        img[j] = 1
        moved = torch.rot90(img.reshape(5, 5), 1, dims=(-2, -1)).reshape(-1).argmax()
        assert torch.allclose(off[moved], R(math.pi / 2) @ off[j], atol=1e-15)


@pytest.mark.parametrize("k, inside", [(1, 1), (3, 5), (5, 13), (7, 29)])
def test_disk_mask(k, inside):
    m = disk_mask(k, dtype=F64)
    assert m.shape == (k * k,)
    assert int(m.sum()) == inside
    off = kernel_offsets(k, dtype=F64)
    assert torch.equal(m.bool(), off.pow(2).sum(-1) <= 1 + 1e-9)
    # rotation invariant under rot90: what rot90 equivariance needs
    assert torch.equal(torch.rot90(m.reshape(k, k), 1), m.reshape(k, k))


def test_output_positions():
    p = output_positions(3, 5, dtype=F64)
    assert p.shape == (15, 2)
    assert torch.equal(p[0], torch.tensor([-1.0, 1.0], dtype=F64))  # top-left: x = -1, y = +1
    assert torch.equal(p[-1], torch.tensor([1.0, -1.0], dtype=F64))  # bottom-right
    assert torch.equal(p[7], torch.tensor([0.0, 0.0], dtype=F64))  # centre
    assert torch.equal(output_positions(1, 1, dtype=F64), torch.zeros(1, 2, dtype=F64))


@pytest.mark.parametrize("n_out, n_in, k, rot, hw", [(4, 4, 3, True, (2, 3)), (3, None, 5, False, None), (8, 8, 1, True, (1, 4)), (1, 1, 3, False, (3, 3))])
def test_coordinate_groups_match_the_formulas(n_out, n_in, k, rot, hw):
    g = coordinate_groups(
        out_rotations=n_out, in_rotations=n_in, kernel_size=k, out_size=hw,
        rotation_nonstationary=rot, device=None, dtype=F64,
    )
    expected_keys = {"rel_pos"} | ({"rel_rot"} if n_in else set()) | ({"abs_rot"} if rot else set()) | ({"abs_pos"} if hw else set())
    assert set(g) == expected_keys
    k2 = k * k
    off = kernel_offsets(k, dtype=F64)
    theta = [2 * math.pi * i / n_out for i in range(n_out)]
    assert g["rel_pos"].shape == (n_out, 1, 1, k2, 2)
    for n, t in enumerate(theta):
        assert torch.allclose(g["rel_pos"][n, 0, 0], off @ R(-t).T, atol=1e-14)  # R(-theta) Delta/r
    if n_in:
        assert g["rel_rot"].shape == (n_out, 1, n_in, 1, 2)
        for n, t in enumerate(theta):
            for m in range(n_in):
                tp = 2 * math.pi * m / n_in
                want = torch.tensor([math.cos(tp - t), math.sin(tp - t)], dtype=F64)
                assert torch.allclose(g["rel_rot"][n, 0, m, 0], want, atol=1e-14)
    if rot:
        assert g["abs_rot"].shape == (n_out, 1, 1, 1, 2)
        for n, t in enumerate(theta):
            assert torch.allclose(g["abs_rot"][n, 0, 0, 0], torch.tensor([math.cos(t), math.sin(t)], dtype=F64), atol=1e-14)
    if hw:
        assert g["abs_pos"].shape == (1, hw[0] * hw[1], 1, 1, 2)
        assert torch.equal(g["abs_pos"][0, :, 0, 0], output_positions(*hw, dtype=F64))


def test_rel_pos_quarter_turn_example():
    """N = 4, output rotation 1 (theta = pi/2): the offset to the right, (1, 0), is seen as (0, -1)."""
    g = coordinate_groups(out_rotations=4, in_rotations=None, kernel_size=3, out_size=None, rotation_nonstationary=False, dtype=F64)
    right = 5  # (kh, kw) = (1, 2)
    assert torch.allclose(g["rel_pos"][1, 0, 0, right], torch.tensor([0.0, -1.0], dtype=F64), atol=1e-15)


# ---- the kernel net --------------------------------------------------------------------------------
@pytest.mark.parametrize("groups", [("rel_pos",), ("rel_pos", "rel_rot"), ("rel_pos", "rel_rot", "abs_rot", "abs_pos"), ("rel_pos", "abs_pos")])
@pytest.mark.parametrize("depth", [2, 3, 4])
def test_kernel_net_is_the_siren_of_design_section_1(groups, depth):
    """z = sin(W_{L-1} ... sin(W_1 c + b_1 + w_rot U_rot abs_rot + w_pos U_pos abs_pos)), k = W_L z + b_L
    with c = [w_rel rel_pos, w_rel rel_rot] and fixed unit rows U (kernel_net's docstring)."""
    torch.manual_seed(0)
    net = SirenKernelNet(groups, 3, 2, hidden_channels=8, depth=depth, omega_rel=2.5, omega_rot=0.7, omega_pos=1.9).double()
    with torch.no_grad():
        net.out.bias.normal_()
    coords = coordinate_groups(
        out_rotations=4, in_rotations=4 if "rel_rot" in groups else None, kernel_size=3,
        out_size=(2, 3) if "abs_pos" in groups else None, rotation_nonstationary="abs_rot" in groups, dtype=F64,
    )
    # the omegas as stored (created in fp32, so 0.7 and 1.9 are not exact after .double())
    om = {k: float(v.detach()) for k, v in net.omegas().items()}
    for key, value in om.items():
        assert value == pytest.approx({"rel": 2.5, "rot": 0.7, "pos": 1.9}[key], rel=1e-7)
    freq = {g: om[FREQUENCY_OF_GROUP[g]] for g in groups}
    shape = torch.broadcast_shapes(*(coords[g].shape for g in groups))
    rel = [g for g in groups if g.startswith("rel")]
    c = torch.cat([freq[g] * coords[g].expand(shape) for g in rel], dim=-1)  # in GROUP_ORDER
    pre = c @ net.first.weight.T + net.first.bias
    # the absolute groups enter through fixed unit directions, one per hidden unit (issue 11)
    for g in groups:
        if g.startswith("abs"):
            u = getattr(net, f"{g}_direction")
            assert u.shape == (8, 2) and torch.allclose(u.norm(dim=-1), torch.ones(8, dtype=F64))
            pre = pre + freq[g] * coords[g].expand(shape) @ u.T
    assert net.first.weight.shape == (8, 2 * len(rel))
    z = torch.sin(pre)
    for layer in net.hidden_layers:
        z = torch.sin(z @ layer.weight.T + layer.bias)
    assert len(net.hidden_layers) == depth - 2
    with torch.no_grad():
        assert torch.allclose(net.hidden(coords), z, rtol=0, atol=1e-13)
        k = (z @ net.out.weight.T + net.out.bias).unflatten(-1, (3, 2))
        assert torch.allclose(net(coords), k, rtol=0, atol=1e-13)
        # [W_L | b_L] with a ones feature reproduces the output layer (design §2)
        w_ext = net.extended_output_weight()
        assert w_ext.shape == (3, 2, 9)
        z1 = torch.cat([z, torch.ones_like(z[..., :1])], -1)
        assert torch.allclose(torch.einsum("...h,oih->...oi", z1, w_ext), k, rtol=0, atol=1e-13)
    assert set(net.omegas()) == {{"rel_pos": "rel", "rel_rot": "rel", "abs_rot": "rot", "abs_pos": "pos"}[g] for g in groups}


ALL_GROUP_SETS = [("rel_pos",), ("rel_pos", "rel_rot"), ("rel_pos", "abs_rot"), ("rel_pos", "rel_rot", "abs_rot"),
                  ("rel_pos", "abs_pos"), ("rel_pos", "rel_rot", "abs_rot", "abs_pos"), ("abs_rot",), ("abs_rot", "abs_pos")]


@pytest.mark.parametrize("groups", ALL_GROUP_SETS)
@pytest.mark.parametrize("skip", [(), ("abs_pos",)])
@pytest.mark.parametrize("learned", [True, False])
def test_first_preactivation_is_the_sum_of_the_group_terms(groups, skip, learned):
    """The first layer evaluates the position-free groups in one product, a learned frequency
    scaling its weight columns and a fixed one folded into the (cached) coordinates: the same values
    and gradients as the per-group sum b_1 + sum_g omega_g c_g W_g^T (nets without relative groups
    included: SirenKernelNet is public)."""
    torch.manual_seed(0)
    net = SirenKernelNet(groups, 3, 2, hidden_channels=8, omega_rel=2.5, omega_rot=0.7, omega_pos=1.9,
                         learn_omega_rel=learned, learn_omega_rot=learned, learn_omega_pos=learned).double()
    coords = coordinate_groups(out_rotations=4, in_rotations=3 if "rel_rot" in groups else None, kernel_size=3,
                               out_size=(2, 3) if "abs_pos" in groups else None,
                               rotation_nonstationary="abs_rot" in groups, dtype=F64)
    got = net.first_preactivation(coords, skip=skip)
    want = net.first.bias
    for g in net.groups:
        if g not in skip:
            want = want + net.group_term(g, coords[g])
    assert got.shape == want.shape
    assert torch.allclose(got, want, rtol=0, atol=1e-13)
    params = [p for p in net.parameters() if p.requires_grad]
    grad = torch.randn_like(want)
    for a, b in zip(torch.autograd.grad(got, params, grad, allow_unused=True),
                    torch.autograd.grad(want, params, grad, allow_unused=True)):
        assert (a is None) == (b is None) and (a is None or torch.allclose(a, b, rtol=1e-12, atol=1e-13))


def test_fixed_frequencies_are_folded_into_coordinates_built_once():
    """A fixed omega is folded into its cached coordinates (issue 13: no broadcast, concatenation or
    scaling per call), and the cache follows every change: a frequency or a coordinate tensor
    changed in place, a frequency replaced or loaded, a frequency made learnable."""
    from relaxedconv.benchmark.opcount import count

    groups = ("rel_pos", "rel_rot", "abs_rot")
    net = SirenKernelNet(groups, 3, 2, hidden_channels=8, omega_rel=2.5, omega_rot=0.7, learn_omega_rot=False).double()
    coords = coordinate_groups(out_rotations=4, in_rotations=3, kernel_size=3, out_size=None,
                               rotation_nonstationary=True, dtype=F64)

    def per_group():
        want = net.first.bias
        for g in groups:
            want = want + net.group_term(g, coords[g])
        return want

    def check():
        assert torch.allclose(net.first_preactivation(coords), per_group(), rtol=0, atol=1e-13)

    check()
    ops = count(lambda: net.first_preactivation(coords)).counts
    # one product, and one concatenation: the weight columns [W_rel | U_rot] (W_rel is learned)
    assert not {"mul", "expand"} & set(ops) and ops["addmm"] == 1 and ops["cat"] == 1
    with torch.no_grad():
        net.omega_rel.fill_(4.0)
    check()
    with torch.no_grad():
        coords["rel_rot"].mul_(0.5)
    check()
    net.omega_rot = torch.nn.Parameter(torch.tensor(1.3, dtype=F64), requires_grad=False)
    check()
    net.load_state_dict({**net.state_dict(), "omega_rel": torch.tensor(0.25, dtype=F64)})
    check()
    net.omega_rot.requires_grad_(True)
    check()
    pre = net.first_preactivation(coords)
    (g,) = torch.autograd.grad(pre.square().sum(), [net.omega_rot])
    (want,) = torch.autograd.grad(per_group().square().sum(), [net.omega_rot])
    assert torch.allclose(g, want, rtol=1e-12)
    # inference-mode coordinates are never handed to a call that records gradients
    with torch.inference_mode():
        net.first_preactivation(coords)
    net.first_preactivation(coords).sum().backward()


def test_coordinates_that_take_a_gradient_get_it_and_are_never_kept():
    """SirenKernelNet is public: coordinates passed with requires_grad get their gradient (the
    folded, cached form would drop it silently), with fixed frequencies as with learned ones."""
    torch.manual_seed(0)
    groups = ("rel_pos", "rel_rot", "abs_rot")
    net = SirenKernelNet(groups, 3, 2, hidden_channels=8, omega_rot=0.7, learn_omega_rot=False).double()
    base = coordinate_groups(out_rotations=4, in_rotations=3, kernel_size=3, out_size=None,
                             rotation_nonstationary=True, dtype=F64)
    net(base)  # a cache entry exists
    coords = {k: v.clone().requires_grad_() for k, v in base.items()}
    got = torch.autograd.grad(net(coords).square().sum(), [coords[g] for g in groups])

    def per_group(cs):
        pre = net.first.bias
        for g in groups:
            pre = pre + net.group_term(g, cs[g])
        z = torch.sin(pre)
        for layer in net.hidden_layers:
            z = torch.sin(layer(z))
        return net.out(z)

    want = torch.autograd.grad(per_group(coords).square().sum(), [coords[g] for g in groups])
    for a, b in zip(got, want):
        assert b.abs().max() > 0 and torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def test_vmap_over_stacked_nets_with_fixed_frequencies():
    """Model ensembling (torch.func.stack_module_state + vmap): a batched fixed frequency is not
    folded into kept coordinates (a kept value would escape the transform)."""
    import copy

    from torch.func import functional_call, stack_module_state, vmap

    groups = ("rel_pos", "rel_rot", "abs_rot")
    nets = [SirenKernelNet(groups, 3, 2, hidden_channels=8, omega_rot=0.5 + i, learn_omega_rot=False) for i in range(3)]
    coords = coordinate_groups(out_rotations=4, in_rotations=3, kernel_size=3, out_size=None,
                               rotation_nonstationary=True)
    params, buffers = stack_module_state(nets)
    base = copy.deepcopy(nets[0]).to("meta")
    got = vmap(lambda p, b: functional_call(base, (p, b), (coords,)))(params, buffers)
    for i, net in enumerate(nets):
        assert torch.allclose(got[i], net(coords), rtol=1e-5, atol=1e-6)


def test_first_preactivation_sums_in_fp32_under_autocast():
    """Under autocast the product runs in bf16 but b_1 and the position term are added in fp32, as
    the per-group sum did: sin's argument reaches ~10, where a bf16 result would step by 0.06."""
    torch.manual_seed(0)
    net = SirenKernelNet(("rel_pos", "rel_rot", "abs_rot", "abs_pos"), 3, 2, hidden_channels=16, omega_rel=10.0,
                         omega_rot=2.0, omega_pos=3.0)
    coords = coordinate_groups(out_rotations=8, in_rotations=8, kernel_size=5, out_size=(8, 8),
                               rotation_nonstationary=True)
    exact = net.double().first_preactivation({k: v.double() for k, v in coords.items()})
    net.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = net.first_preactivation(coords)
    assert got.dtype == torch.float32
    assert (got.double() - exact).abs().max() < 0.06


@pytest.mark.parametrize("shapes", [[(8, 1, 1, 49), (8, 1, 8, 1), (8, 1, 1, 1)], [(1, 6, 1, 1), (3, 1, 2, 5)],
                                    [(5,), (2, 1)], [(0, 1), (1, 3)], [(2, 3), (2, 3)], [(4, 1, 3)]])
def test_broadcast_shape_is_torchs(shapes):
    assert broadcast_shape(*shapes) == tuple(torch.broadcast_shapes(*shapes))


def test_broadcast_shape_refuses_what_torch_refuses():
    with pytest.raises(RuntimeError):
        torch.broadcast_shapes((2, 3), (3, 3))
    with pytest.raises(ValueError, match="do not broadcast"):
        broadcast_shape((2, 3), (3, 3))


# ---- the layer's kernel follows the convention ----------------------------------------------------
def test_lifting_kernel_rotates_with_the_output_rotation():
    """k_n(Delta) = kappa(R(-theta_n) Delta): for N = 4, kernel image n+1 = rot90(kernel image n)."""
    torch.manual_seed(1)
    layer = rc.LiftingConv(2, 3, 5, 4, hidden_channels=8).double()
    with torch.no_grad():
        k = layer.full_kernel(None)  # [N, J, C_out, C_in], J = 1 * 25
    img = k.reshape(4, 5, 5, 3, 2)
    for n in range(4):
        assert torch.allclose(img[(n + 1) % 4], torch.rot90(img[n], 1, dims=(0, 1)), rtol=0, atol=1e-13)
    assert not torch.allclose(img[1], torch.rot90(img[0], -1, dims=(0, 1)), atol=1e-3)


def test_group_kernel_rotates_and_shifts_the_input_rotation():
    """k_n(n', Delta) = kappa(R(-theta_n) Delta, theta_n' - theta_n): k_{n+1}[n'] = rot90(k_n[n' - 1])."""
    torch.manual_seed(2)
    layer = rc.GroupConv(2, 3, 3, 4, hidden_channels=8, mask=False).double()
    with torch.no_grad():
        k = layer.full_kernel(None)  # [N, J, C_out, C_in], J = (n', kh, kw)
    img = k.reshape(4, 4, 3, 3, 3, 2)
    for n in range(4):
        want = torch.roll(torch.rot90(img[n], 1, dims=(1, 2)), 1, dims=0)
        assert torch.allclose(img[(n + 1) % 4], want, rtol=0, atol=1e-13)
    assert not torch.allclose(img[1], torch.roll(torch.rot90(img[0], 1, dims=(1, 2)), -1, dims=0), atol=1e-3)


@pytest.mark.parametrize("trans", [False, True])
def test_factored_kernel_reproduces_full_kernel(trans):
    """Design §2: the full kernel is [W_L | b_L] applied to (Z, 1), with the mask folded into Z."""
    torch.manual_seed(3)
    layer = rc.GroupConv(2, 3, 5, 4, rotation_nonstationary=True, translation_nonstationary=trans, omega_rot=1.0, omega_pos=1.0 if trans else 0.0, hidden_channels=8).double()
    with torch.no_grad():
        layer.kernel_net.out.bias.normal_()
        full = layer.full_kernel((3, 4))
        z, w_ext = layer.factored_kernel((3, 4))
    assert z.shape[-1] == 9 and w_ext.shape == (3, 2, 9)
    assert full.shape == ((4, 12, 4 * 25, 3, 2) if trans else (4, 4 * 25, 3, 2))
    assert torch.allclose(torch.einsum("...jh,oih->...joi", z, w_ext), full, rtol=0, atol=1e-13)
    # masked entries are exactly zero in both views
    out = ~layer._mask_over_window(F64).bool()
    assert out.sum() == 4 * 12  # 12 of the 25 window entries of K = 5 lie outside the disk, per n'
    assert (full[..., out, :, :] == 0).all() and (z[..., out, :] == 0).all()
