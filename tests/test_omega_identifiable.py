"""omega is identifiable (issue 11): it alone scales the kernel's absolute-coordinate modulation, so
the equivariance penalty acts on something no other parameter can rescale; omega = 0 is exactly
equivariant; omegas get their own optimiser group."""
from __future__ import annotations

import math

import pytest
import torch

import relaxedconv as rc
from relaxedconv.groups import coordinate_groups
from relaxedconv.kernel_net import SirenKernelNet, absolute_directions
from relaxedconv.models import build_model

F64 = torch.float64
ALL_GROUPS = ("rel_pos", "rel_rot", "abs_rot", "abs_pos")


def relaxed_group_conv(**kw):
    kw = dict(rotation_nonstationary=True, translation_nonstationary=True, omega_rot=2.0, omega_pos=1.0,
              hidden_channels=16, **kw)
    return rc.GroupConv(2, 3, 5, 4, **kw).double()


def test_absolute_weights_are_fixed_unit_buffers():
    net = SirenKernelNet(ALL_GROUPS, 3, 2, hidden_channels=16)
    names = {n for n, _ in net.named_parameters()}
    assert names == {"omega_rel", "omega_rot", "omega_pos", "first.weight", "first.bias",
                     "hidden_layers.0.weight", "hidden_layers.0.bias", "out.weight", "out.bias"}
    assert net.first.weight.shape == (16, 4)  # rel_pos and rel_rot only
    for g in ("abs_rot", "abs_pos"):
        u = getattr(net, f"{g}_direction")
        assert not u.requires_grad and f"{g}_direction" in net.state_dict()  # persistent buffer
        assert torch.allclose(u.norm(dim=-1), torch.ones(16))
        assert torch.linalg.matrix_rank(u) == 2  # full rank, not one column shared by every unit
        assert torch.equal(u, absolute_directions(16, g))  # a function of H only: no random draws
    assert not torch.allclose(net.abs_rot_direction, net.abs_pos_direction)
    # construction draws no extra random numbers: the same seed gives the strict net's weights
    torch.manual_seed(0)
    relaxed = SirenKernelNet(ALL_GROUPS, 3, 2, hidden_channels=16)
    torch.manual_seed(0)
    strict = SirenKernelNet(("rel_pos", "rel_rot"), 3, 2, hidden_channels=16)
    for name, p in strict.named_parameters():
        assert torch.equal(p, dict(relaxed.named_parameters())[name]), name


def test_the_old_rescaling_now_changes_the_output():
    """Before issue 11: omega_rot * 0.1 with the learned abs_rot columns * 10 gave the same outputs
    (difference 9e-16) while the penalty fell 100x. Those columns are now fixed buffers, and the only
    learned first-layer weights (the relative groups') cannot absorb the scale."""
    torch.manual_seed(0)
    layer = relaxed_group_conv()
    x = torch.randn(2, 8, 9, 9, dtype=F64)
    with torch.no_grad():
        y = layer(x)
        pen = float(rc.equivariance_penalty(layer))
        layer.kernel_net.omega_rot.mul_(0.1)
        layer.kernel_net.omega_pos.mul_(0.1)
        layer.kernel_net.first.weight.mul_(10.0)
        y2 = layer(x)
        pen2 = float(rc.equivariance_penalty(layer))
    assert pen2 == pytest.approx(pen / 100)
    assert (y2 - y).norm() > 0.1 * y.norm()
    trainable = {id(p) for p in layer.parameters() if p.requires_grad}
    assert id(layer.kernel_net.abs_rot_direction) not in trainable


def _preactivation_slopes(net, n_angles=2048):
    """Largest |d pre_h / d theta| over a fine circle of absolute rotations, per hidden unit."""
    coords = coordinate_groups(out_rotations=1, in_rotations=4, kernel_size=3, out_size=(3, 3),
                               rotation_nonstationary=False, dtype=F64)
    theta = torch.arange(n_angles, dtype=F64) * (2 * math.pi / n_angles)
    coords["abs_rot"] = torch.stack([theta.cos(), theta.sin()], -1)[:, None, None, None]
    with torch.no_grad():
        pre = net.first_preactivation(coords)  # [A, P, N_in, K*K, H]
    slope = (pre.roll(-1, 0) - pre) / (2 * math.pi / n_angles)
    return slope.abs().amax(dim=(0, 1, 2, 3))


@pytest.mark.parametrize("seed", [0, 1])
def test_omega_alone_sets_the_rate_of_the_modulation(seed):
    """Every hidden unit's pre-activation changes with the absolute rotation at a largest rate of
    exactly |omega_rot|, whatever the other parameters are (here scaled by up to 100x)."""
    torch.manual_seed(seed)
    net = SirenKernelNet(ALL_GROUPS, 3, 2, hidden_channels=8, omega_rot=0.7).double()
    assert torch.allclose(_preactivation_slopes(net), torch.full((8,), 0.7, dtype=F64), rtol=1e-5)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if not name.startswith("omega"):
                p.mul_(torch.empty_like(p).uniform_(0.01, 100.0))
        net.omega_rot.fill_(-1.3)
    assert torch.allclose(_preactivation_slopes(net), torch.full((8,), 1.3, dtype=F64), rtol=1e-5)
    assert float(net.effective_omegas()["rot"].detach()) == pytest.approx(1.3)


def test_effective_omegas_and_the_penalty_on_them():
    torch.manual_seed(1)
    model = torch.nn.Sequential(
        rc.LiftingConv(1, 2, 3, 4, rotation_nonstationary=True, omega_rot=1.5, hidden_channels=8),
        torch.nn.ReLU(),
        rc.GroupConv(2, 2, 3, 4, translation_nonstationary=True, omega_pos=0.5, hidden_channels=8),
        torch.nn.ReLU(),
        rc.GroupConv(2, 2, 3, 4, hidden_channels=8),  # strict: not listed
    )
    with torch.no_grad():  # the constructor refuses a negative omega, but a learned one can cross 0
        model[0].kernel_net.omega_rot.fill_(-1.5)
    eff = rc.effective_omegas(model)
    assert eff == {"0": {"rot": pytest.approx(1.5)}, "2": {"pos": pytest.approx(0.5)}}
    pen = rc.equivariance_penalty(model, strength=0.1)
    assert float(pen.detach()) == pytest.approx(0.1 * (1.5**2 + 0.5**2))
    pen.backward()
    assert float(model[0].kernel_net.omega_rot.grad) == pytest.approx(0.1 * 2 * -1.5)
    assert float(model[2].kernel_net.omega_pos.grad) == pytest.approx(0.1 * 2 * 0.5)
    assert float(rc.equivariance_penalty(model, strength=1.0, p=1).detach()) == pytest.approx(2.0)


def test_kernel_nonstationarity_is_zero_at_zero_omega_and_grows():
    torch.manual_seed(2)
    layer = rc.GroupConv(2, 3, 5, 4, rotation_nonstationary=True, hidden_channels=16).double()
    fractions = []
    for w in (0.0, 0.01, 0.1, 0.5, 1.0):
        with torch.no_grad():
            layer.kernel_net.omega_rot.fill_(w)
        fractions.append(rc.kernel_nonstationarity(layer)["GroupConv"]["rot"])
    assert fractions[0] < 1e-20
    assert all(a < b for a, b in zip(fractions, fractions[1:])), fractions
    assert fractions[-1] > 0.1
    # a property of the function: scaling W_L (the output layer) leaves it unchanged
    with torch.no_grad():
        layer.kernel_net.out.weight.mul_(7.0)
        layer.kernel_net.out.bias.mul_(7.0)
    assert rc.kernel_nonstationarity(layer)["GroupConv"]["rot"] == pytest.approx(fractions[-1])
    assert rc.kernel_nonstationarity(rc.GroupConv(2, 3, 3, 4, hidden_channels=8)) == {}


@pytest.mark.parametrize("architecture", ["authors", "simple"])
def test_zero_omega_model_is_the_strict_model_and_exactly_invariant(architecture):
    """omega_rot = 0: the same function as the strict model built from the same seed (the fixed
    directions draw no random numbers), and exactly rot90-invariant."""
    tiny = dict(group_order=4, widths=(4, 8), kernel_size=3, hidden_channels=8, architecture=architecture)
    torch.manual_seed(3)
    relaxed = build_model("se2_learned", omega_rot=0.0, **tiny).double().eval()
    torch.manual_seed(3)
    strict = build_model("se2", **tiny).double().eval()
    x = torch.randn(2, 3, 16, 16, dtype=F64)
    with torch.no_grad():
        y = relaxed(x)
        assert torch.allclose(y, strict(x), rtol=0, atol=1e-12)
        for q in (1, 2, 3):
            assert (relaxed(torch.rot90(x, q, dims=(-2, -1))) - y).abs().max() < 1e-12 * y.abs().max()
        for m in relaxed.modules():
            if hasattr(m, "kernel_net") and hasattr(m.kernel_net, "omega_rot"):
                m.kernel_net.omega_rot.fill_(0.5)
        assert (relaxed(torch.rot90(x, 1, dims=(-2, -1))) - relaxed(x)).abs().max() > 1e-4 * y.abs().max()


def test_parameter_groups_give_omegas_their_own_lr_and_no_weight_decay():
    torch.manual_seed(4)
    model = build_model("se2_learned", group_order=4, widths=(4, 8), kernel_size=3, hidden_channels=8)
    groups = rc.parameter_groups(model, lr=1e-3, weight_decay=0.05, omega_lr=0.02)
    assert [g["name"] for g in groups] == ["weights", "omegas"]
    weights, om = groups
    assert om["lr"] == 0.02 and om["weight_decay"] == 0.0
    assert weights["lr"] == 1e-3 and weights["weight_decay"] == 0.05
    learnable_omegas = [w for m in model.modules() if hasattr(m, "kernel_net")
                        for k, w in m.kernel_net.omegas().items() if w.requires_grad]
    assert {id(p) for p in om["params"]} == {id(w) for w in learnable_omegas} and len(om["params"]) == len(learnable_omegas)
    all_ids = [id(p) for g in groups for p in g["params"]]
    assert len(all_ids) == len(set(all_ids))  # each parameter once
    assert set(all_ids) == {id(p) for p in model.parameters() if p.requires_grad}
    # omega_lr defaults to lr; a model without learnable omegas has one group
    assert rc.parameter_groups(model, lr=0.1)[1]["lr"] == 0.1
    strict = build_model("se2", group_order=4, widths=(4,), kernel_size=3, hidden_channels=8)
    assert [g["name"] for g in rc.parameter_groups(strict, lr=0.1)] == ["weights"]
    # and Adam steps the omegas at their own rate
    opt = torch.optim.Adam(groups)
    before = [float(w.detach()) for w in learnable_omegas]
    model(torch.randn(2, 3, 16, 16)).logsumexp(1).sum().backward()
    opt.step()
    steps = [abs(float(w.detach()) - b) for w, b in zip(learnable_omegas, before)]
    assert max(steps) == pytest.approx(0.02, rel=1e-3)  # Adam's first step is lr * sign(grad)


def test_kernel_nonstationarity_matches_the_full_kernel():
    """The z^T G z form equals the variance of the full kernel over absolute rotations / positions."""
    torch.manual_seed(5)
    layer = rc.GroupConv(2, 3, 3, 4, rotation_nonstationary=True, translation_nonstationary=True, omega_rot=0.7,
                         omega_pos=0.4, hidden_channels=8).double()
    got = rc.kernel_nonstationarity(layer, out_hw=(3, 4))["GroupConv"]
    net = layer.kernel_net
    coords = coordinate_groups(out_rotations=1, in_rotations=4, kernel_size=3, out_size=(3, 4),
                               rotation_nonstationary=False, dtype=F64)
    theta = torch.arange(4, dtype=F64) * (math.pi / 2)
    coords["abs_rot"] = torch.stack([theta.cos(), theta.sin()], -1)[:, None, None, None]
    with torch.no_grad():
        k = net(coords) * layer._mask_over_window(F64)[:9, None, None]  # [4, 12, 4, 9, 3, 2]
    total = k.pow(2).sum()
    assert got["rot"] == pytest.approx(float((k - k.mean(0, keepdim=True)).pow(2).sum() / total), rel=1e-10)
    assert got["pos"] == pytest.approx(float((k - k.mean(1, keepdim=True)).pow(2).sum() / total), rel=1e-10)
    assert 0 < got["rot"] < 1 and 0 < got["pos"] < 1
