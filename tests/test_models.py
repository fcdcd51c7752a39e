"""The paper's ResNet (relaxedconv.models): every variant builds and trains a step; the strict
model is invariant; the normalisations are equivariant; the right omegas exist and learn."""
import pytest
import torch

from relaxedconv import omegas
from relaxedconv.equivariance import rotate_feature_map
from relaxedconv.models import VARIANTS, GroupBatchNorm, GroupLayerNorm, RotationSubset, build_model

TINY = dict(group_order=4, widths=(4, 8), kernel_size=3, hidden_channels=8)


def test_required_variants_present():
    for v in ("t2", "se2", "se2_rot", "se2_trans", "se2_rot_trans", "se2_learned", "partial"):
        assert v in VARIANTS


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_runs_forward_and_backward(variant):
    torch.manual_seed(0)
    m = build_model(variant, num_classes=5, **TINY)
    x = torch.randn(2, 3, 16, 16)
    y = m(x)
    assert y.shape == (2, 5)
    y.logsumexp(1).sum().backward()
    grads = [p.grad for p in m.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert m.config["variant"] == variant


def test_variant_structure_and_omegas():
    t2 = build_model("t2", **TINY)
    assert t2.config["group_order"] == 1 and t2.lift.group_order == 1
    strict = omegas(build_model("se2", **TINY))
    assert all(set(v) == {"rel"} for v in strict.values())
    rot = build_model("se2_rot", omega_rot=3.0, **TINY)
    assert all(v["rot"] == 3.0 and "pos" not in v for v in omegas(rot).values())
    assert not any(m.kernel_net.omega_rot.requires_grad for m in rot.modules() if hasattr(m, "kernel_net"))
    both = build_model("se2_rot_trans", omega_rot=2.0, omega_pos=0.5, **TINY)
    om = omegas(both)
    assert om["lift"] == {"rel": 10.0, "rot": 2.0, "pos": 0.5}
    # the pointwise shortcuts stay translation-stationary
    assert "pos" not in om["blocks.0.shortcut"]
    learned = build_model("se2_learned", **TINY)
    assert learned.config["learn_omega"]
    assert all(m.kernel_net.omega_rot.requires_grad for m in learned.modules() if hasattr(m, "kernel_net"))
    assert build_model("se2_rot", learn_omega=True, **TINY).config["learn_omega"]
    with pytest.raises(ValueError, match="unknown model variant"):
        build_model("nope")


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
