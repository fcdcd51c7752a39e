"""torch.compile(fullgraph=True) of the layers, every backend that runs on the device (issue 13).

Compiles are slow on a 2-core CPU, so the models are tiny and most tests use the "aot_eager"
compiler backend: Dynamo's full-graph capture and AOTAutograd's joint forward/backward trace
(where a graph break, an untraceable operator or a wrong fake implementation shows), without
Inductor's code generation; one test runs Inductor itself. All are marked ``compile``
(``pytest -m "not compile"`` skips them).
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

import relaxedconv as rc
from relaxedconv import auto_backend, dispatch, triton_conv

pytestmark = pytest.mark.compile


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    torch._dynamo.reset()
    auto_backend.clear()
    monkeypatch.setattr(dispatch, "_policy_override", None)
    monkeypatch.delenv(dispatch.AUTO_ENV, raising=False)
    yield
    torch._dynamo.reset()


def _grads(model, x, fn):
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    y = fn(x)
    (y * torch.linspace(-1, 1, y.numel(), device=y.device).reshape(y.shape)).sum().backward()
    return y.detach(), x.grad, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(eager, compiled, tol=1e-5):
    (y0, gx0, g0), (y1, gx1, g1) = eager, compiled
    assert torch.allclose(y1, y0, rtol=tol, atol=tol)
    assert torch.allclose(gx1, gx0, rtol=tol, atol=tol)
    assert g0.keys() == g1.keys() and g0
    for name in g0:
        assert torch.allclose(g1[name], g0[name], rtol=tol, atol=tol), name


def _mixed_model():
    """Every CPU backend and both kinds of non-stationarity in one small network."""
    torch.manual_seed(0)
    kw = dict(hidden_channels=4)
    return torch.nn.Sequential(
        rc.LiftingConv(2, 3, 3, 4, translation_nonstationary=True, omega_pos=1.0, backend="factored_torch", **kw),
        torch.nn.ReLU(),
        rc.GroupConv(3, 3, 3, 4, backend="expand_conv", **kw),
        torch.nn.ReLU(),
        rc.GroupConv(3, 2, 3, 4, rotation_nonstationary=True, omega_rot=1.0, backend="materialize", **kw),
        rc.PointwiseGroupConv(2, 2, 4, backend="auto", **kw),
        rc.InvariantPool(4),
    )


def test_full_graph_compile_matches_eager_for_every_cpu_backend_train_and_eval():
    model = _mixed_model()
    x = torch.randn(2, 2, 6, 7)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    _assert_same(_grads(model, x, model), _grads(model, x, compiled))
    # eval under no_grad: the eager model runs its cached kernels, the compiled one generates them
    model.eval()
    with torch.no_grad():
        eager = model(x)
        assert torch.equal(model(x), eager)  # the cached path gives the same bits again
        assert torch.allclose(compiled(x), eager, rtol=1e-5, atol=1e-6)


def test_inductor_compiles_a_layer_to_the_eager_result(exact_fp32):
    # On the GPU where there is one: the device a compiled model trains on. (torch 2.11's CPU
    # Inductor fails to lower this graph's convolution, "LoweringException: NotImplementedError:
    # View", H200 machine 2026-11-27; torch 2.13's compiles it.)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(1)
    layer = rc.GroupConv(2, 3, 3, 4, hidden_channels=4, rotation_nonstationary=True, omega_rot=1.0, backend="expand_conv").to(device)
    x = torch.randn(2, 8, 5, 6, device=device)
    _assert_same(_grads(layer, x, layer), _grads(layer, x, torch.compile(layer, fullgraph=True)), tol=1e-4)


def test_triton_path_is_an_opaque_operator_with_autograd():
    """The fused kernels (Triton's interpreter on CPU) inside a full graph: forward and every
    gradient as in eager mode; the operators' schema, fake implementations and autograd
    registration pass torch.library.opcheck."""
    torch.manual_seed(2)
    kw = dict(hidden_channels=4, backend="triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"  # compiled kernels on a GPU, else the interpreter
    model = torch.nn.Sequential(
        rc.LiftingConv(1, 2, 3, 2, translation_nonstationary=True, omega_pos=1.0, **kw),
        rc.GroupConv(2, 2, 3, 2, **kw),
    ).to(device)
    x = torch.randn(1, 1, 4, 4, device=device)
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    _assert_same(_grads(model, x, model), _grads(model, x, compiled))
    torch._dynamo.reset()
    torch.compile(model, fullgraph=True, backend=capture)(x)
    code = graphs[0].code
    assert code.count("relaxedconv.triton_conv_fwd") == 2, code  # one opaque call per layer

    layer = model[0]
    z, w_ext = layer.factored_kernel(layer.geometry.out_size(4, 4))
    args = (x.requires_grad_(), z.detach().requires_grad_(), w_ext.detach().requires_grad_(),
            layer.bias.detach().requires_grad_(), list(dataclasses.astuple(layer.geometry)))
    torch.library.opcheck(triton_conv.triton_conv_fwd, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_compiled_auto_runs_the_backend_measured_eagerly():
    class Timer:
        calls = 0

        def __call__(self, run, *, backend, device):
            self.calls += 1
            return {"materialize": 0.001, "expand_conv": 1.0, "factored_torch": 1.0}[backend]

    timer = Timer()
    auto_backend.set_timer(timer)
    try:
        dispatch.set_auto_policy("measure")
        torch.manual_seed(3)
        layer = rc.GroupConv(2, 2, 3, 4, hidden_channels=4)
        x = torch.randn(2, 8, 5, 5, requires_grad=True)
        layer(x)
        assert layer.last_backend == "materialize"
        graphs = []

        def capture(gm, example_inputs):
            graphs.append(gm.code)
            return gm.forward

        torch.compile(layer, fullgraph=True, backend=capture)(x)
        assert "unfold" in graphs[0] and "conv2d" not in graphs[0]  # materialize, not the static expand_conv
        # nothing measured yet for a new shape: the static rule, and nothing is timed while tracing
        timed = timer.calls
        torch.compile(layer, fullgraph=True, backend=capture)(torch.randn(2, 8, 6, 6, requires_grad=True))
        assert "conv2d" in graphs[-1] and timer.calls == timed
    finally:
        auto_backend.set_timer(None)
