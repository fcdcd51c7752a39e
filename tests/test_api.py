"""The module API: state_dict, omegas, the equivariance prior, pooling, backend selection, the CLI."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import relaxedconv as rc
from relaxedconv import dispatch
from relaxedconv.equivariance import rotate_feature_map


def small_model(**relax):
    torch.manual_seed(0)
    return nn.Sequential(
        rc.LiftingConv(3, 4, 3, 4, hidden_channels=8, **relax),
        nn.ReLU(),
        rc.GroupConv(4, 4, 3, 4, hidden_channels=8, **relax),
        nn.ReLU(),
        rc.PointwiseGroupConv(4, 2, 4, hidden_channels=8),
        rc.InvariantPool(4),
    )


# ---- state_dict --------------------------------------------------------------------------------------
@pytest.mark.parametrize("relax", [{}, dict(rotation_nonstationary=True, translation_nonstationary=True, omega_rot=1.0)])
def test_state_dict_same_in_train_and_eval(relax):
    model = small_model(**relax)
    x = torch.randn(2, 3, 8, 8)
    model.train()
    model(x)
    sd_train = model.state_dict()
    model.eval()
    with torch.no_grad():
        model(x)
    sd_eval = model.state_dict()
    assert list(sd_train) == list(sd_eval)
    for k in sd_train:
        if k.endswith("_extra_state"):  # the lattice record: a dict of ints and bools
            assert sd_train[k] == sd_eval[k], k
        else:
            assert torch.equal(sd_train[k], sd_eval[k]), k
    assert any(k.endswith("omega_rel") for k in sd_train)
    if relax:
        assert "0.kernel_net.omega_rot" in sd_train and "2.kernel_net.omega_pos" in sd_train


def test_fixed_omega_is_still_in_state_dict():
    fixed = rc.GroupConv(2, 2, 3, 4, rotation_nonstationary=True, omega_rot=0.5, learn_omega_rot=False, hidden_channels=8)
    learned = rc.GroupConv(2, 2, 3, 4, rotation_nonstationary=True, omega_rot=2.0, learn_omega_rot=True, hidden_channels=8)
    sd = fixed.state_dict()
    assert "kernel_net.omega_rot" in sd and float(sd["kernel_net.omega_rot"]) == 0.5
    assert "kernel_net.omega_rel" in sd  # learn_omega_rel=False by default, still saved
    assert not fixed.kernel_net.omega_rot.requires_grad
    assert learned.kernel_net.omega_rot.requires_grad
    assert set(fixed.state_dict()) == set(learned.state_dict())
    # The two load into each other; requires_grad (the learn flag) is kept by the destination.
    fixed.load_state_dict(learned.state_dict())
    assert fixed.omegas()["rot"] == 2.0 and not fixed.kernel_net.omega_rot.requires_grad
    # A fixed omega gets no gradient and is not trainable.
    fixed(torch.randn(1, 8, 5, 5)).sum().backward()
    assert fixed.kernel_net.omega_rot.grad is None and fixed.kernel_net.omega_rel.grad is None
    assert all(p is not fixed.kernel_net.omega_rot for p in fixed.parameters() if p.requires_grad)


def test_state_dict_round_trip_gives_the_same_function():
    model = small_model(rotation_nonstationary=True, omega_rot=1.0)
    strict = small_model()  # no rotation non-stationarity: no omega_rot keys
    assert set(strict.state_dict()) < set(model.state_dict())
    torch.manual_seed(7)
    other = small_model(rotation_nonstationary=True, omega_rot=0.0)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.1)
    x = torch.randn(2, 3, 8, 8)
    assert not torch.allclose(other(x), model(x))
    other.load_state_dict(model.state_dict())
    assert torch.equal(other(x), model(x))


# ---- the lattice record in the state_dict (issue 12, item 7) ----------------------------------------
@pytest.mark.parametrize(
    "other, field",
    [
        (dict(kernel_size=5), "kernel_size 3 \\(saved\\) vs 5"),
        (dict(group_order=8), "group_order 4 \\(saved\\) vs 8"),
        (dict(padding=0), "padding 1 \\(saved\\) vs 0"),
        (dict(mask=False), "mask True \\(saved\\) vs False"),
        (dict(in_channels=6, out_channels=2), "in_channels 4 \\(saved\\) vs 6"),  # C_out*C_in = 12 either way
    ],
)
def test_state_dict_from_another_lattice_is_refused(other, field):
    """Parameter shapes do not depend on K, N, padding or the mask: the recorded lattice catches it."""
    args = dict(in_channels=4, out_channels=3, kernel_size=3, group_order=4, hidden_channels=8, bias=False)
    saved = rc.GroupConv(**args).state_dict()
    target = rc.GroupConv(**{**args, **other})
    assert all(saved[k].shape == v.shape for k, v in target.state_dict().items() if not k.endswith("_extra_state"))
    with pytest.raises(ValueError, match=rf"GroupConv: the state_dict was saved from a layer on another lattice: .*{field}"):
        target.load_state_dict(saved)
    with pytest.raises(ValueError, match="build the layer with"):
        target.load_state_dict(saved, strict=False)


def test_state_dict_lattice_record_round_trips_and_old_checkpoints_still_load(tmp_path):
    model = small_model(rotation_nonstationary=True, omega_rot=1.0)
    sd = model.state_dict()
    assert sd["0._extra_state"]["lattice"] == dict(
        in_channels=3, out_channels=4, in_rotations=1, kernel_size=3, group_order=4, padding=1, mask=True,
        rotation_nonstationary=True, translation_nonstationary=False,
    )
    # plain data: a weights-only load reads it
    torch.save(sd, tmp_path / "sd.pt")
    loaded = torch.load(tmp_path / "sd.pt", weights_only=True)
    twin = small_model(rotation_nonstationary=True, omega_rot=0.0)
    twin.load_state_dict(loaded)
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(twin(x), model(x))
    # a state_dict saved by relaxedconv 0.1.0 (no _extra_state) loads strictly, unchecked
    old = {k: v for k, v in sd.items() if not k.endswith("_extra_state")}
    fresh = small_model(rotation_nonstationary=True, omega_rot=0.0)
    fresh.load_state_dict(old)
    assert torch.equal(fresh(x), model(x))
    # the record of the wrong kind of module is refused clearly
    bad = dict(sd, **{"0._extra_state": {"something": 1}})
    with pytest.raises(ValueError, match="not a relaxedconv lattice record"):
        fresh.load_state_dict(bad)


# ---- dtypes of whole models, and the meta device (issue 12, items 4 and 5) ---------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_converted_model_runs_in_its_dtype(dtype):
    from relaxedconv.models import build_model

    torch.manual_seed(5)
    model = build_model("se2_rot", group_order=4, widths=(4,), kernel_size=3, hidden_channels=8)
    x = torch.randn(2, 3, 12, 12)
    ref = model(x)
    converted = copy.deepcopy(model).to(dtype)
    y = converted(x.to(dtype))
    assert y.dtype == dtype
    y.float().sum().backward()
    assert all(p.grad is None or p.grad.dtype == dtype for p in converted.parameters())
    tol = 1e-5 if dtype == torch.float64 else 0.1
    y, ref = y.detach().double(), ref.detach().double()
    assert float((y - ref).norm() / ref.norm()) < tol
    # an fp32 model fed bf16 keeps an fp32 head, as under autocast
    assert model(x.bfloat16()).dtype == torch.float32


@pytest.mark.parametrize("cls, args, kw", [
    (rc.LiftingConv, (3, 16, 5, 4), dict(rotation_nonstationary=True, omega_rot=1.5)),
    (rc.GroupConv, (4, 16, 3, 4), dict(translation_nonstationary=True, omega_pos=2.0, omega_rel=3.0)),
    (rc.PointwiseGroupConv, (4, 16, 8), {}),
])
def test_meta_device_construction_then_to_empty_and_reset(cls, args, kw):
    with torch.device("meta"):
        layer = cls(*args, hidden_channels=8, **kw)
    assert all(p.is_meta for p in layer.parameters())
    layer.to_empty(device="cpu")
    layer.reset_parameters()
    torch.manual_seed(0)
    eager = cls(*args, hidden_channels=8, **kw)
    assert layer.omegas() == eager.omegas()
    # same initial statistics as an eagerly built layer: the kernel at nn.Conv2d's scale
    fan_in = layer.in_channels * layer.in_rotations * layer.kernel_size**2
    with torch.no_grad():
        k = layer.full_kernel((5, 5))
        keep = layer._mask_over_window(k.dtype).bool()
        vals = (k[:, keep] if k.dim() == 4 else k[:, :, keep]).flatten()
    assert 0.7 < float(vals.std()) * math.sqrt(3 * fan_in) < 1.4
    assert float(layer.kernel_net.out.bias.detach().abs().max()) == 0.0


@pytest.mark.parametrize("variant", ["t2", "se2_rot", "se2_rot_trans"])
def test_meta_model_runs_forward_and_backward_for_shapes(variant):
    """Shape inference on meta tensors (what the device error suggests: 'on META use backend=auto')
    used to stop at the autocast query, which raises for a device autocast does not know."""
    from relaxedconv.models import build_model

    with torch.device("meta"):
        model = build_model(variant, group_order=4, widths=(4,), kernel_size=3, hidden_channels=8)
        x = torch.empty(2, 3, 12, 12)
    out = model(x)
    assert out.is_meta and out.shape == (2, 10)
    out.sum().backward()
    assert all(p.grad is not None and p.grad.is_meta for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("variant, architecture", [("partial", "authors"), ("se2_rot", "simple")])
def test_meta_model_to_empty_then_reset_initialises_every_tensor(variant, architecture):
    """The README's recipe for a model built on the meta device: to_empty, then reset_parameters over
    the modules in reverse. RotationSubset's logits and GroupLayerNorm's affine had no
    reset_parameters and kept to_empty's uninitialised memory."""
    from relaxedconv.models import build_model

    kw = dict(group_order=4, widths=(2, 3), kernel_size=3, hidden_channels=4, architecture=architecture)
    with torch.device("meta"):
        model = build_model(variant, **kw)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            if t.is_floating_point():
                t.fill_(float("nan"))  # what uninitialised memory may hold
    for m in reversed(list(model.modules())):
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    eager = build_model(variant, **kw)
    for (name, t), (_, ref) in zip(model.state_dict().items(), eager.state_dict().items()):
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            assert not torch.isnan(t).any(), name
            if "kernel_net" not in name and not name.endswith(("lift.bias", "conv1.bias", "conv2.bias", "head.bias", "shortcut.bias", "fc.weight", "fc.bias")):
                assert torch.equal(t, ref), name  # deterministic initial values: the same as built eagerly


def test_meta_model_loads_a_state_dict_with_assign():
    from relaxedconv.models import build_model

    torch.manual_seed(6)
    kw = dict(group_order=4, widths=(4,), kernel_size=3, hidden_channels=8)
    real = build_model("se2_rot", **kw).eval()
    with torch.device("meta"):
        lazy = build_model("se2_rot", **kw)
    lazy.load_state_dict(real.state_dict(), assign=True)
    lazy.eval()
    x = torch.randn(2, 3, 12, 12)
    assert torch.equal(lazy(x), real(x))


# ---- omegas and the prior ---------------------------------------------------------------------------
def test_omegas_lists_every_layer():
    model = small_model(rotation_nonstationary=True, omega_rot=1.5)
    om = rc.omegas(model)
    assert list(om) == ["0", "2", "4"]
    assert om["0"] == {"rel": 10.0, "rot": 1.5}
    assert om["2"] == {"rel": 10.0, "rot": 1.5}
    assert om["4"] == {"rel": 10.0}
    with torch.no_grad():
        model[2].kernel_net.omega_rot.fill_(0.25)
    assert rc.omegas(model)["2"]["rot"] == 0.25
    # a bare layer is listed under its class name; translation non-stationarity adds 'pos'
    single = rc.LiftingConv(1, 1, 3, 1, translation_nonstationary=True, omega_pos=3.0, omega_rel=2.0, hidden_channels=8)
    assert rc.omegas(single) == {"LiftingConv": {"rel": 2.0, "pos": 3.0}}
    assert rc.omegas(nn.Sequential(nn.Linear(2, 2))) == {}


def test_equivariance_penalty_zero_and_differentiable():
    model = small_model(rotation_nonstationary=True, translation_nonstationary=True, omega_rot=0.0, omega_pos=0.0)
    pen = rc.equivariance_penalty(model, strength=0.3)
    assert pen.requires_grad and float(pen.detach()) == 0.0
    pen.backward()
    assert float(model[0].kernel_net.omega_rot.grad) == 0.0

    with torch.no_grad():
        model[0].kernel_net.omega_rot.fill_(1.5)
        model[2].kernel_net.omega_pos.fill_(-2.0)
    model.zero_grad()
    pen = rc.equivariance_penalty(model, strength=0.3)
    assert float(pen.detach()) == pytest.approx(0.3 * (1.5**2 + 2.0**2))
    pen.backward()
    assert float(model[0].kernel_net.omega_rot.grad) == pytest.approx(0.3 * 2 * 1.5)
    assert float(model[2].kernel_net.omega_pos.grad) == pytest.approx(0.3 * 2 * -2.0)
    assert float(model[2].kernel_net.omega_rot.grad) == 0.0
    assert model[0].kernel_net.omega_rel.grad is None  # omega_rel is not penalised
    # p = 1
    assert rc.equivariance_penalty(model, strength=1.0, p=1).item() == pytest.approx(1.5 + 2.0)
    # a strict model: zero
    assert float(rc.equivariance_penalty(small_model())) == 0.0


def test_penalty_pulls_omega_toward_zero_in_training():
    model = small_model(rotation_nonstationary=True, omega_rot=1.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(2, 3, 8, 8)
    before = rc.omegas(model)["0"]["rot"]
    for _ in range(3):
        opt.zero_grad()
        loss = 0.0 * model(x).sum() + rc.equivariance_penalty(model, strength=1.0)
        loss.backward()
        opt.step()
    after = rc.omegas(model)["0"]["rot"]
    assert 0 < after < before


def test_omega_rot_learns_from_the_data_loss():
    model = small_model(rotation_nonstationary=True, omega_rot=0.5)
    x = torch.randn(2, 3, 8, 8)
    model(x).square().sum().backward()
    g = model[0].kernel_net.omega_rot.grad
    assert g is not None and float(g) != 0.0


# ---- InvariantPool ----------------------------------------------------------------------------------
@pytest.mark.parametrize("reduce", ["max", "mean"])
@pytest.mark.parametrize("over", ["all", "rotation", "space"])
def test_invariant_pool_shapes_values_and_invariance(over, reduce):
    torch.manual_seed(1)
    n, c = 4, 3
    x = torch.randn(2, c * n, 5, 7, dtype=torch.float64)
    pool = rc.InvariantPool(n, over=over, reduce=reduce)
    y = pool(x)
    g = x.unflatten(1, (c, n))  # [B, C, N, H, W]
    red = (lambda t, d: t.amax(d)) if reduce == "max" else (lambda t, d: t.mean(d))
    expected = {"all": (red(g, (2, 3, 4)), (2, c)), "rotation": (red(g, 2), (2, c, 5, 7)), "space": (red(x, (2, 3)), (2, c * n))}
    want, shape = expected[over]
    assert y.shape == shape
    assert torch.allclose(y, want, rtol=0, atol=1e-14)

    # Rotate the group feature map (rot90 + roll of the rotation axis) and translate it (roll).
    for q in (1, 2, 3):
        y_rot = pool(rotate_feature_map(x, q, n))
        if over == "all":
            assert torch.allclose(y_rot, y, rtol=0, atol=1e-14)
        elif over == "rotation":  # rotation-invariant channel, spatially rotated
            assert torch.allclose(y_rot, torch.rot90(y, q, dims=(-2, -1)), rtol=0, atol=1e-14)
        else:  # spatially invariant, rotation axis rolled
            assert torch.allclose(y_rot, rotate_feature_map(y, q, n), rtol=0, atol=1e-14)
    shifted = pool(torch.roll(x, (1, -2), dims=(-2, -1)))
    if over == "rotation":
        assert torch.allclose(shifted, torch.roll(y, (1, -2), dims=(-2, -1)), rtol=0, atol=1e-14)
    else:
        assert torch.allclose(shifted, y, rtol=0, atol=1e-14)
    # not vacuous: the transformed outputs differ from the untransformed ones where they should
    if over == "space":
        assert not torch.allclose(rotate_feature_map(y, 1, n), y)
    if over == "rotation":
        assert not torch.allclose(torch.rot90(y, 2, dims=(-2, -1)), y)


def test_invariant_pool_group_order_one():
    x = torch.randn(2, 3, 4, 5)
    assert torch.equal(rc.InvariantPool(1)(x), x.amax((-2, -1)))
    assert torch.equal(rc.InvariantPool(1, over="rotation")(x), x)


# ---- backend selection and outputs ------------------------------------------------------------------
def test_auto_backend_on_cpu():
    torch.manual_seed(2)
    stat = rc.GroupConv(2, 3, 3, 4, hidden_channels=8)
    trans = rc.GroupConv(2, 3, 3, 4, translation_nonstationary=True, hidden_channels=8)
    x = torch.randn(2, 8, 6, 7)
    assert dispatch.choose_backend(stat, x) == "expand_conv"
    assert dispatch.choose_backend(trans, x) == "factored_torch"
    assert torch.equal(stat(x), stat(x, backend="expand_conv"))
    assert torch.equal(trans(x), trans(x, backend="factored_torch"))
    # the documented rule never picks triton off CUDA, even with triton installed
    assert dispatch.backend_rule(trans, "cpu", True) == "factored_torch"
    assert dispatch.backend_rule(stat, "cuda", False) == "expand_conv"
    assert dispatch.backend_rule(trans, "cuda", True) == "triton"


def test_constructor_backend_is_the_default_and_a_call_overrides_it():
    torch.manual_seed(3)
    layer = rc.LiftingConv(2, 3, 3, 4, hidden_channels=8, backend="materialize")
    x = torch.randn(2, 2, 6, 7)
    assert torch.equal(layer(x), layer(x, backend="materialize"))
    assert torch.allclose(layer(x), layer(x, backend="factored_torch"), rtol=1e-5, atol=1e-6)
    assert layer.backend == "materialize"
    assert "backend='materialize'" in repr(layer)


@pytest.mark.parametrize("padding, out_hw", [("same", (7, 9)), ("valid", (3, 5)), (1, (5, 7)), (3, (9, 11))])
def test_output_shape(padding, out_hw):
    layer = rc.GroupConv(2, 5, 5, 3, padding=padding, hidden_channels=8)
    y = layer(torch.randn(2, 6, 7, 9))
    assert y.shape == (2, 15, *out_hw)


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layer_dtype", [torch.float32, torch.float64])
def test_output_dtype_follows_the_input(x_dtype, layer_dtype):
    layer = rc.LiftingConv(2, 3, 3, 4, hidden_channels=8).to(layer_dtype)
    x = torch.randn(1, 2, 5, 6, dtype=x_dtype)
    for backend in ("materialize", "expand_conv", "factored_torch"):
        assert layer(x, backend=backend).dtype == x_dtype


def test_bias_is_shared_over_rotations():
    layer = rc.GroupConv(2, 3, 3, 4, hidden_channels=8)
    with torch.no_grad():
        layer.kernel_net.out.weight.zero_()
        layer.kernel_net.out.bias.zero_()
        layer.bias.copy_(torch.tensor([1.0, -2.0, 3.0]))
    y = layer(torch.randn(1, 8, 4, 5)).unflatten(1, (3, 4))
    assert torch.equal(y, torch.tensor([1.0, -2.0, 3.0])[None, :, None, None, None].expand_as(y))
    assert rc.GroupConv(2, 3, 3, 4, bias=False).bias is None


def test_layer_equivariance_errors_restores_training_mode_and_hooks():
    model = small_model(rotation_nonstationary=True, omega_rot=1.0)
    model.train()
    errs = rc.layer_equivariance_errors(model, torch.randn(2, 3, 9, 9))
    assert set(errs) == {"0", "2", "4"}
    assert model.training and all(m.training for m in model.modules())
    assert all(not m._forward_hooks for m in model.modules())
    model.eval()
    rc.layer_equivariance_errors(model, torch.randn(2, 3, 9, 9))
    assert not model.training


def test_layer_equivariance_errors_keeps_each_submodule_mode():
    model = small_model(rotation_nonstationary=True, omega_rot=1.0)
    model.train()
    model[1] = nn.BatchNorm2d(16)
    model[1].eval()  # frozen statistics
    modes = [m.training for m in model.modules()]
    rc.layer_equivariance_errors(model, torch.randn(2, 3, 9, 9))
    assert [m.training for m in model.modules()] == modes


def test_deepcopy_and_double_keep_the_function():
    torch.manual_seed(4)
    layer = rc.GroupConv(2, 3, 3, 4, rotation_nonstationary=True, omega_rot=1.0, hidden_channels=8)
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        y = layer(x)
        y64 = copy.deepcopy(layer).double()(x.double())
    assert y64.dtype == torch.float64 and layer.kernel_net.first.weight.dtype == torch.float32
    assert float((y.double() - y64).norm() / y64.norm()) < 1e-5


# ---- the command line --------------------------------------------------------------------------------
def test_cli_demo_runs(capsys):
    from relaxedconv.cli import main

    assert main(["demo", "--size", "12"]) == 0
    out = capsys.readouterr().out
    assert "logits (4, 10)" in out
    assert "rotation_90" in out and "whole model" in out


def test_cli_usage_and_unknown_command(capsys):
    from relaxedconv.cli import main

    assert main([]) == 0
    assert "usage: relaxedconv <command>" in capsys.readouterr().out
    assert main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_torch_jit_script_is_refused_with_the_ways_that_work():
    """Scripting failed deep in TorchScript's type inference, with a dump of the lattice cache's
    tensors; the message now names what works. torch.jit.trace does work and agrees."""
    model = nn.Sequential(rc.LiftingConv(2, 3, 3, 4, hidden_channels=8), nn.ReLU(), rc.GroupConv(3, 2, 3, 4, hidden_channels=8))
    with pytest.raises(TypeError, match=r"torch.jit.script cannot compile LiftingConv: .* torch.compile, torch.jit.trace"):
        torch.jit.script(model)
    x = torch.randn(2, 2, 7, 6)
    with torch.no_grad():
        assert torch.allclose(torch.jit.trace(model, x, check_trace=False)(x), model(x), atol=1e-6)


def _readme_python_blocks() -> dict[str, str]:
    """The README's ```python blocks, keyed by the heading of the section that holds them."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks, heading = {}, None
    for m in re.finditer(r"^## ([^\n]+)$|^```python\n(.*?)^```", text, flags=re.M | re.S):
        if m.group(1):
            heading = m.group(1).strip()
        else:
            blocks[heading] = m.group(2)
    return blocks


def test_readme_usage_snippet_runs_as_written():
    blocks = _readme_python_blocks()
    assert "Usage" in blocks, sorted(blocks)
    exec(compile(blocks["Usage"], "README.md:Usage", "exec"), {})


def test_readme_deploy_snippet_runs_as_written(tmp_path, monkeypatch):
    """The snippet indexed the saved mean and std (lists in ``model.meta``) as tensors: TypeError."""
    import shutil
    import sys
    from pathlib import Path

    from relaxedconv import deploy
    from relaxedconv.models import build_model

    code = next(v for k, v in _readme_python_blocks().items() if k.startswith("Deploy"))
    model = build_model("se2", group_order=4, widths=(2,), kernel_size=3, hidden_channels=4, num_classes=3).eval()
    normalize = {"scale": 1 / 255, "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]}  # what `relaxedconv export` saves
    rc.export.save(rc.export(model), tmp_path / "model.pt", meta={"normalize": normalize})
    shutil.copy(Path(deploy.__file__), tmp_path / "deploy.py")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "deploy", raising=False)
    images = torch.randint(0, 256, (2, 3, 6, 6)).float()
    namespace = {"images": images}
    exec(compile(code, "README.md:Deploy", "exec"), namespace)
    mean, std = torch.tensor(normalize["mean"])[:, None, None], torch.tensor(normalize["std"])[:, None, None]
    with torch.no_grad():
        assert torch.allclose(namespace["logits"], model((images / 255 - mean) / std), atol=1e-5)
