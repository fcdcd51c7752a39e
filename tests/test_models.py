"""The paper's ResNet (relaxedconv.models): every variant builds and trains a step; the strict
model is invariant; the normalisations are equivariant; the right omegas exist and learn."""
import pytest
import torch

from relaxedconv import omegas
from relaxedconv.equivariance import rotate_feature_map
import math

from relaxedconv import PointwiseGroupConv
from relaxedconv.models import (
    ARCHITECTURES,
    VARIANTS,
    ChannelLayerNorm,
    GroupBatchNorm,
    GroupLayerNorm,
    RotationSubset,
    build_model,
    rotation_grid_offset,
)

TINY = dict(group_order=4, widths=(4, 8), kernel_size=3, hidden_channels=8)


def test_required_variants_present():
    for v in ("t2", "se2", "se2_rot", "se2_trans", "se2_rot_trans", "se2_learned", "partial"):
        assert v in VARIANTS


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_runs_forward_and_backward(variant, architecture):
    torch.manual_seed(0)
    m = build_model(variant, num_classes=5, architecture=architecture, **TINY)
    x = torch.randn(2, 3, 16, 16)
    y = m(x)
    assert y.shape == (2, 5)
    y.logsumexp(1).sum().backward()
    grads = [p.grad for p in m.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert m.config["variant"] == variant and m.config["architecture"] == architecture


def test_variant_structure_and_omegas():
    t2 = build_model("t2", **TINY)
    assert t2.config["group_order"] == 1 and t2.lift.group_order == 1
    strict = omegas(build_model("se2", **TINY))
    assert all(set(v) == {"rel"} for v in strict.values())
    rot = build_model("se2_rot", omega_rot=3.0, **TINY)
    om = omegas(rot)
    assert all(v["rot"] == 3.0 and "pos" not in v for k, v in om.items() if not k.endswith("shortcut"))
    assert not any(w.requires_grad for m in rot.modules() if hasattr(m, "kernel_net") for w in m.kernel_net.omegas().values())
    both = build_model("se2_rot_trans", omega_rot=2.0, omega_pos=0.5, **TINY)
    om = omegas(both)
    assert om["lift"] == {"rel": 10.0, "rot": 2.0, "pos": 0.5}
    # the authors' shortcut (only where the width changes) is stationary in rotation and space
    assert "blocks.0.shortcut" not in om and om["blocks.1.shortcut"] == {"rel": 10.0}
    # the simple architecture's shortcuts stay translation-stationary but follow the rotation setting
    om = omegas(build_model("se2_rot_trans", omega_rot=2.0, omega_pos=0.5, architecture="simple", **TINY))
    assert om["blocks.0.shortcut"] == {"rel": 10.0, "rot": 2.0}
    learned = build_model("se2_learned", **TINY)
    assert learned.config["learn_omega"]
    assert all(
        m.kernel_net.omega_rot.requires_grad
        for name, m in learned.named_modules()
        if hasattr(m, "kernel_net") and not name.endswith("shortcut")
    )
    assert build_model("se2_rot", learn_omega=True, **TINY).config["learn_omega"]
    with pytest.raises(ValueError, match="unknown model variant"):
        build_model("nope")
    with pytest.raises(ValueError, match="unknown architecture"):
        build_model("se2", architecture="resnet50", **TINY)


def test_authors_block_structure():
    """Their CKResBlock: conv-LN-ReLU-conv-LN-ReLU, + shortcut, BN, pool, ReLU; LN per channel over
    (N, H, W) without affine; shortcut identity at equal width, else half-width and stationary."""
    m = build_model("se2_learned_rot_trans", hidden_channels=8, group_order=4, widths=(4, 8), kernel_size=3)
    assert m.config["architecture"] == "authors"
    b0, b1 = m.blocks
    assert isinstance(b0.shortcut, torch.nn.Identity)
    assert isinstance(b1.shortcut, PointwiseGroupConv) and b1.shortcut.kernel_net.hidden_channels == 4
    assert not b1.shortcut.rotation_nonstationary and not b1.shortcut.translation_nonstationary
    assert b1.shortcut.kernel_net.groups == ("rel_pos", "rel_rot")  # relative rotation only (offset 0)
    assert isinstance(b1.norm1, ChannelLayerNorm) and not list(b1.norm1.parameters())
    assert isinstance(b1.norm_out, GroupBatchNorm)
    # the forward is that formula
    torch.manual_seed(0)
    b1.eval()
    x = torch.randn(2, 4 * 4, 8, 8)
    relu = torch.nn.functional.relu
    y = relu(b1.norm2(b1.conv2(relu(b1.norm1(b1.conv1(x))))))
    ref = relu(torch.nn.functional.max_pool2d(b1.norm_out(y + b1.shortcut(x)), 2))
    assert torch.allclose(b1(x), ref)


def test_channel_layer_norm_is_per_sample_and_channel():
    torch.manual_seed(0)
    c, n = 3, 4
    x = torch.randn(2, c * n, 5, 6) * 3 + 1
    y = ChannelLayerNorm(c, n)(x).unflatten(1, (c, n))
    assert torch.allclose(y.mean((2, 3, 4)), torch.zeros(2, c), atol=1e-5)
    assert torch.allclose(y.var((2, 3, 4), unbiased=False), torch.ones(2, c), atol=1e-3)
    rx = rotate_feature_map(x, 1, n)
    assert torch.allclose(ChannelLayerNorm(c, n)(rx), rotate_feature_map(ChannelLayerNorm(c, n)(x), 1, n), atol=1e-5)


@pytest.mark.parametrize("variant", ["se2", "se2_rot"])
def test_monte_carlo_rotation_offset(variant):
    """One offset shared by every layer: a whole grid step (2*pi/N) only relabels the rotations, so
    the invariant-pooled logits are unchanged; other offsets change them; eval uses the plain grid."""
    torch.manual_seed(0)
    m = build_model(variant, mc_rotation=True, **TINY).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        y0 = m(x)
        with rotation_grid_offset(m, 2 * math.pi / 4):
            y_step = m(x)
        with rotation_grid_offset(m, 0.3):
            y_off = m(x)
        assert m.lift.angle_offset == 0.0 and m.blocks[1].conv2.angle_offset == 0.0  # restored
        assert torch.allclose(y_step, y0, atol=1e-5)
        assert (y_off - y0).norm() > 1e-3 * y0.norm()
        assert torch.equal(m(x), y0)  # eval: deterministic grid
        m.train()
        torch.manual_seed(1)
        a = m(x)
        b = m(x)
        assert (a - b).norm() > 1e-4 * a.norm()  # train: a fresh offset per forward
        torch.manual_seed(1)
        assert torch.equal(m(x), a)  # drawn from the seeded global generator
    assert m.config["mc_rotation"]
    assert not build_model(variant, **TINY).mc_rotation


def test_default_model_matches_design():
    m = build_model("se2")  # design.md §7: lifting 3->32 7x7, widths 32, 64, N = 8, hidden 32
    assert m.lift.kernel_size == 7 and m.lift.out_channels == 32 and m.group_order == 8
    assert [b.conv1.out_channels for b in m.blocks] == [32, 64]
    assert m.head.padding == 0 and m.fc.in_features == 64
    assert m.lift.kernel_net.hidden_channels == 32


@pytest.mark.parametrize("variant", ["se2", "partial"])
def test_strict_model_is_rotation_invariant(variant):
    torch.manual_seed(0)
    m = build_model(variant, **TINY).eval()
    x = torch.randn(2, 3, 16, 16)
    y = m(x)
    for q in (1, 2, 3):
        yr = m(torch.rot90(x, q, dims=(-2, -1)))
        assert (yr - y).norm() / y.norm() < 1e-4


def test_nonstationary_model_is_not_invariant():
    torch.manual_seed(0)
    m = build_model("se2_rot", omega_rot=4.0, **TINY).eval()
    x = torch.randn(2, 3, 16, 16)
    assert (m(torch.rot90(x, 1, dims=(-2, -1))) - m(x)).norm() / m(x).norm() > 1e-3


def test_group_norms_are_equivariant():
    torch.manual_seed(0)
    c, n = 3, 4
    x = torch.randn(2, c * n, 6, 6)
    ln = GroupLayerNorm(c, n)
    bn = GroupBatchNorm(c, n).train()
    with torch.no_grad():
        ln.weight.uniform_(0.5, 2)
        ln.bias.uniform_(-1, 1)
    for norm in (ln, bn):
        rx = rotate_feature_map(x, 1, n)
        assert torch.allclose(norm(rx), rotate_feature_map(norm(x), 1, n), atol=1e-5)
    # layer norm: each sample normalised over (C, N, H, W)
    y = GroupLayerNorm(c, n)(x)
    assert torch.allclose(y.mean((1, 2, 3)), torch.zeros(2), atol=1e-5)


def test_rotation_subset_keeps_identity_and_learns():
    torch.manual_seed(0)
    s = RotationSubset(2, 4, init_logit=-5.0)  # almost surely drops every rotation but the identity
    x = torch.ones(1, 8, 2, 2)
    s.eval()
    y = s(x).unflatten(1, (2, 4))
    assert (y[:, :, 0] == 1).all() and (y[:, :, 1:] == 0).all()
    s.train()
    s(x).sum().backward()
    assert s.logits.grad is not None and s.logits.grad[1:].abs().sum() > 0


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_too_small_input_is_refused_in_the_models_terms(architecture):
    """Two blocks halve 12 -> 3 and the 3x3 'valid' head needs 3x3: 12x12 runs, 12x10 and 9x9 do not.
    The head's own check named an inner GroupConv and a 3x2 map the user never passed."""
    m = build_model("se2", architecture=architecture, **{**TINY, "widths": (2, 3)})
    assert m.min_input_size() == 12
    assert m(torch.randn(1, 3, 12, 12)).shape == (1, 10)
    for h, w in ((12, 10), (9, 9)):
        with pytest.raises(ValueError, match=rf"CKResNet: input {h}x{w} is too small; .* at least 12x12"):
            m(torch.randn(1, 3, h, w))
    with pytest.raises(ValueError, match=r"LiftingConv: expected \[B, 3, H, W\]"):  # channels: the layer's message
        m(torch.randn(1, 1, 12, 12))


@pytest.mark.parametrize("kwargs, exc, msg", [
    (dict(group_order=2.5), TypeError, r"group_order must be an int, got float"),
    (dict(group_order=0), ValueError, r"group_order must be >= 1, got 0"),
    (dict(num_classes=0), ValueError, r"num_classes must be >= 1, got 0"),
])
def test_build_model_refuses_bad_sizes(kwargs, exc, msg):
    """group_order=2.5 built a C_2 model and num_classes=0 one with no outputs, silently."""
    with pytest.raises(exc, match=msg):
        build_model("se2", **{**TINY, **kwargs})
    assert build_model("t2", **{**TINY, "group_order": 8}).group_order == 1  # t2 still ignores it
