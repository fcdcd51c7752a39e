"""The functional op and the backend table (issue 10): every backend from the same tensors."""
from __future__ import annotations

import pytest
import torch

import relaxedconv as rc
from relaxedconv import dispatch
from relaxedconv.functional import relaxed_conv
from relaxedconv.reference import ConvGeometry


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("trans", [False, True])
def test_every_backend_computes_the_op_and_its_gradients_from_z_and_w_ext(trans):
    torch.manual_seed(0)
    layer = rc.GroupConv(2, 3, 3, 4, hidden_channels=6, translation_nonstationary=trans).double()
    x = torch.randn(2, 8, 5, 6, dtype=torch.float64)
    z, w_ext = layer.factored_kernel(layer.geometry.out_size(5, 6))
    z, w_ext = z.detach(), w_ext.detach()
    bias = layer.bias.detach()
    results = {}
    for name in dispatch.runnable(device_type="cpu", dtype=torch.float64, per_position=trans, for_auto=True):
        leaves = [t.clone().requires_grad_(True) for t in (x, z, w_ext, bias)]
        y = relaxed_conv(*leaves, layer.geometry, backend=name)
        gy = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape)
        (y * gy).sum().backward()
        results[name] = (y.detach(), *(t.grad for t in leaves))
    assert set(results) == ({"materialize", "factored_torch"} if trans else {"materialize", "expand_conv", "factored_torch"})
    ref = results["materialize"]
    assert torch.allclose(ref[0], layer(x, backend="materialize"), rtol=1e-12, atol=1e-12)  # the layer is this op
    for name, got in results.items():
        for what, a, b in zip(("y", "dx", "dz", "dw_ext", "dbias"), got, ref):
            assert _rel(a, b) < 1e-10, f"{name}: {what}"


@pytest.mark.parametrize("trans", [False, True])
@pytest.mark.parametrize("backend", ["auto", "materialize", "expand_conv", "factored_torch"])
def test_gradcheck_fp64_with_any_subset_of_inputs_requiring_grad(backend, trans):
    # materialize is the others' reference: here every path is checked against finite differences,
    # with each input alone, and all together, requiring a gradient (the triton path: test_triton_backward).
    if trans and backend == "expand_conv":
        pytest.skip("expand_conv runs translation-stationary layers only")
    torch.manual_seed(1)
    g = ConvGeometry(1, 2, 2, 2, 3, 1)
    d = torch.float64
    x, w, b = torch.randn(1, 2, 3, 3, dtype=d), torch.randn(2, 1, 3, dtype=d), torch.randn(2, dtype=d)
    z = torch.randn(2, 9, 18, 3, dtype=d) if trans else torch.randn(2, 18, 3, dtype=d)
    for mask in [(1, 1, 1, 1), (1, 0, 0, 0), (0, 1, 0, 0), (0, 0, 1, 0), (0, 0, 0, 1)]:
        inputs = [t.clone().requires_grad_(bool(m)) for t, m in zip((x, z, w, b), mask)]
        assert torch.autograd.gradcheck(lambda *a: relaxed_conv(*a, g, backend=backend), inputs), mask


@pytest.mark.parametrize("field, value", [("in_channels", 0), ("out_rotations", -1), ("kernel_size", 0),
                                          ("padding", -1), ("in_channels", 2.0), ("kernel_size", True)])
def test_a_geometry_of_impossible_sizes_is_refused(field, value):
    args = dict(in_channels=2, out_channels=3, in_rotations=4, out_rotations=4, kernel_size=3, padding=1)
    with pytest.raises(ValueError, match=rf"ConvGeometry.{field} must be an integer >= {0 if field == 'padding' else 1}"):
        ConvGeometry(**{**args, field: value})
    assert ConvGeometry(**{**args, "padding": 0}).window == 36
    import numpy as np

    g = ConvGeometry(**{**args, "in_channels": np.int64(2)})  # NumPy integers are integers
    assert type(g.in_channels) is int and g == ConvGeometry(**args)


def test_bad_tensors_get_clear_errors():
    g = ConvGeometry(2, 3, 4, 4, 3, 1)
    x = torch.randn(2, 8, 5, 6)
    z, w = torch.randn(4, 36, 7), torch.randn(3, 2, 7)
    assert relaxed_conv(x, z, w, None, g, backend="factored_torch").shape == (2, 12, 5, 6)
    with pytest.raises(TypeError, match="geometry must be a relaxedconv.ConvGeometry"):
        relaxed_conv(x, z, w, None, (2, 3, 4, 4, 3, 1))
    with pytest.raises(ValueError, match=r"x must be \[B, C_in\*N_in = 8, H, W\]"):
        relaxed_conv(x[:, :4], z, w, None, g)
    with pytest.raises(ValueError, match=r"w_ext must be \[C_out = 3, C_in = 2, H\+1\]"):
        relaxed_conv(x, z, w[:2], None, g)
    with pytest.raises(ValueError, match=r"z must be \[N, J, H\+1\] = \[4, 36, 7\] or.*\[4, 30, 36, 7\]"):
        relaxed_conv(x, z[:, :9], w, None, g)
    with pytest.raises(ValueError, match=r"bias must be None or \[C_out = 3\]"):
        relaxed_conv(x, z, w, torch.zeros(4), g)
    with pytest.raises(ValueError, match="backend must be one of"):
        relaxed_conv(x, z, w, None, g, backend="cudnn")
    with pytest.raises(TypeError, match="bias must be floating point, got torch.int64"):
        relaxed_conv(x, z, w, torch.zeros(3, dtype=torch.long), g)
    for backend in ("auto", "factored_torch"):  # a misspelt policy is refused whichever backend runs
        with pytest.raises(ValueError, match=r"auto_policy must be one of \('measure', 'static'\) or None, got 'fastest'"):
            relaxed_conv(x, z, w, None, g, backend=backend, auto_policy="fastest")
    with pytest.raises(ValueError, match="backend='expand_conv' cannot run a translation non-stationary"):
        relaxed_conv(x, torch.randn(4, 30, 36, 7), w, None, g, backend="expand_conv")


def test_one_table_feeds_names_cli_choices_and_messages(monkeypatch):
    from relaxedconv.benchmark.layer_bench import BENCH_BACKENDS
    from relaxedconv.training.cli import train_parser

    assert dispatch.BACKENDS == ("auto", *dispatch.BACKEND_TABLE) == rc.BACKENDS
    (backend_action,) = [a for a in train_parser()._actions if a.dest == "backend"]
    assert tuple(backend_action.choices) == dispatch.BACKENDS
    assert set(BENCH_BACKENDS) == set(dispatch.BACKENDS) | {"conv2d"}
    # a backend added to the table is offered and suggested everywhere
    extra = dispatch.Backend("toy", "test entry", True, ("cpu",), dispatch.FLOAT_DTYPES,
                             dispatch.BACKEND_TABLE["factored_torch"].prepare, dispatch.BACKEND_TABLE["factored_torch"].apply)
    monkeypatch.setitem(dispatch.BACKEND_TABLE, "toy", extra)
    monkeypatch.setattr(dispatch, "BACKENDS", ("auto", *dispatch.BACKEND_TABLE))
    msg = dispatch.unsupported("expand_conv", device_type="cpu", dtype=torch.float32, per_position=True)[1]
    assert "'toy'" in msg and "'factored_torch'" in msg and "'expand_conv'" not in msg.split("Use")[1]
    assert "toy" in dispatch.runnable(device_type="cpu", dtype=torch.float32, per_position=True, for_auto=True)


def test_table_refusals():
    assert dispatch.unsupported("factored_torch", device_type="cpu", dtype=torch.float32, per_position=True) is None
    exc, msg = dispatch.unsupported("expand_conv", device_type="cuda", dtype=torch.bfloat16, per_position=True)
    assert exc is ValueError and "translation non-stationary" in msg
    exc, msg = dispatch.unsupported("factored_torch", device_type="cpu", dtype=torch.int32, per_position=False)
    assert exc is TypeError and "int32" in msg
    # the alternatives a refusal suggests fit the layer: no conv2d for a per-position kernel
    if dispatch.triton_available():
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("TRITON_INTERPRET", "0")
            msg = dispatch.unsupported("triton", device_type="cpu", dtype=torch.float32, per_position=True)[1]
            assert "on CPU use backend='auto', 'factored_torch' or 'materialize'" in msg, msg
            msg = dispatch.unsupported("triton", device_type="cpu", dtype=torch.float32, per_position=False)[1]
            assert "'expand_conv'" in msg
    # auto never times Triton's interpreter (a testing aid), even where TRITON_INTERPRET=1 lets it run
    assert "triton" not in dispatch.runnable(device_type="cpu", dtype=torch.float32, per_position=False, for_auto=True)


def test_triton_interpret_is_read_as_triton_reads_it(monkeypatch):
    # Triton takes only 1/true/on/yes as on: with TRITON_INTERPRET=off the kernels are compiled
    # for a GPU, so on CPU tensors the table must refuse triton with its message, not let a
    # launch fail in Triton's driver.
    for on in ("1", "true", "Yes", "ON"):
        monkeypatch.setenv("TRITON_INTERPRET", on)
        assert dispatch.interpreting()
    for off in ("0", "", "off", "false", "no", "2"):
        monkeypatch.setenv("TRITON_INTERPRET", off)
        assert not dispatch.interpreting()
        if dispatch.triton_available():
            exc, msg = dispatch.unsupported("triton", device_type="cpu", dtype=torch.float32, per_position=False)
            assert exc is ValueError and "set TRITON_INTERPRET=1" in msg
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not dispatch.interpreting()
