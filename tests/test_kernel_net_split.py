"""The kernel net's second layer by angle addition (kernel_net.SirenKernelNet._second_layer_split):

    W2 sin(a + b) + b2 = [sin a | cos a | 1] @ [[cos b | sin b]^T * [W2 | W2]^T ; b2]

for translation non-stationary layers, where ``b`` (abs_pos) varies over positions only. An
identity: every value and gradient must be the direct form's, the layer's included."""
from __future__ import annotations

import pytest
import torch

import relaxedconv as rc
from relaxedconv import kernel_net as kn
from relaxedconv import layers as layers_mod
from relaxedconv.benchmark import cases
from relaxedconv.benchmark.opcount import OpSizes
from relaxedconv.groups import coordinate_groups

F64 = torch.float64


def _direct_hidden(net, coords):
    """The SIREN's hidden features as the module docstring writes them (no split)."""
    z = torch.sin(net.first_preactivation(coords))
    for layer in net.hidden_layers:
        z = torch.sin(layer(z))
    return z


def _net_and_lattice(lifting: bool, depth: int, dtype=F64, hidden=8):
    torch.manual_seed(0)
    groups = ("rel_pos", "abs_pos") if lifting else ("rel_pos", "rel_rot", "abs_rot", "abs_pos")
    net = kn.SirenKernelNet(groups, 3, 2, hidden_channels=hidden, depth=depth, omega_pos=1.3, omega_rot=0.7,
                            learn_omega_rel=True).to(dtype)
    coords = coordinate_groups(out_rotations=4, in_rotations=None if lifting else 3, kernel_size=5, out_size=(6, 7),
                               rotation_nonstationary=not lifting, dtype=dtype)
    return net, coords


def _param_grads(net, out, grad):
    """Gradients of every trained parameter the hidden features depend on (not the output layer)."""
    params = [p for name, p in net.named_parameters() if p.requires_grad and not name.startswith("out.")]
    return torch.autograd.grad(out, params, grad)


@pytest.mark.parametrize("lifting", [True, False], ids=["lifting", "group"])
@pytest.mark.parametrize("depth", [3, 4])
def test_split_is_the_direct_form_in_values_and_every_gradient(lifting, depth, monkeypatch):
    monkeypatch.setattr(kn, "SPLIT_MIN_VALUES", 0)
    net, coords = _net_and_lattice(lifting, depth)
    assert net.splits_position(coords)
    got, want = net.hidden(coords), _direct_hidden(net, coords)
    assert got.shape == want.shape and got.is_contiguous()
    assert torch.allclose(got, want, rtol=0, atol=1e-13)
    grad = torch.randn_like(want)
    for g, w in zip(_param_grads(net, got, grad), _param_grads(net, want, grad)):  # omegas and first layer included
        assert torch.allclose(g, w, rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("keep_product", [True, False], ids=["kept", "recomputed"])
def test_split_function_passes_gradcheck(keep_product):
    """The hand-written backward of the fused sine-of-product, every input, through an axis order
    that differs from the product's; with the product kept for backward or recomputed there."""
    torch.manual_seed(1)
    a = torch.randn(6, 4, dtype=F64, requires_grad=True)
    b = torch.randn(5, 4, dtype=F64, requires_grad=True)
    w = torch.randn(4, 4, dtype=F64, requires_grad=True)
    bias = torch.randn(4, dtype=F64, requires_grad=True)

    def arrange(t):  # product rows (2, 3) and columns (5,): order [3, 5, 2, H]
        return t.reshape(2, 3, 5, 4).permute(1, 2, 0, 3)

    assert torch.autograd.gradcheck(lambda *t: kn._SecondSineLayer.apply(*t, arrange, keep_product), (a, b, w, bias))


def test_split_is_used_where_it_pays():
    """T2 (3,136 rows of (n, n', offset), 26 M values) splits; T1 (49 rows: the split's [2H, P*H]
    operand would outgrow the values), stationary layers (no positions) and depth 2 (no second
    layer) do not."""
    def lattice_of(name):
        layer = cases.build_layer(cases.CASES[name], torch.device("meta"))
        hw = (cases.CASES[name].out_size,) * 2
        return layer.kernel_net, layer._lattice(hw, torch.device("cpu"), torch.float32)

    net, coords = lattice_of("T2")
    assert net.splits_position(coords)
    net, coords = lattice_of("T1")
    assert not net.splits_position(coords)
    net, coords = lattice_of("G1")
    assert not net.splits_position(coords)
    shallow = kn.SirenKernelNet(("rel_pos", "abs_pos"), 2, 2, depth=2)
    _, coords = _net_and_lattice(True, 2)
    assert not shallow.splits_position(coords)


def _nonstationary_layer(depth):
    torch.manual_seed(2)
    return rc.GroupConv(3, 2, 3, 4, hidden_channels=8, kernel_depth=depth, translation_nonstationary=True, omega_pos=1.0,
                        rotation_nonstationary=True, omega_rot=0.5).double()


@pytest.mark.parametrize("backend", ["factored_torch", "materialize"])
def test_layer_with_the_split_gives_the_same_output_and_gradients(backend, monkeypatch):
    layer = _nonstationary_layer(3)
    x = torch.randn(2, 12, 5, 6, dtype=F64, requires_grad=True)

    def run():
        layer.zero_grad(set_to_none=True)
        x.grad = None
        y = layer(x, backend=backend)
        y.square().sum().backward()
        return [y.detach(), x.grad.clone()] + [p.grad.clone() for p in layer.parameters() if p.grad is not None]

    want = run()
    monkeypatch.setattr(kn, "SPLIT_MIN_VALUES", 0)
    got = run()
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert torch.allclose(g, w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("depth", [3, 4])
def test_large_split_layer_recomputes_only_the_product(depth, monkeypatch):
    """Where one [N, P, J, H] activation reaches CHECKPOINT_BYTES, the split depth-3 net is not
    checkpointed (which would recompute the whole SIREN): it keeps only its small operands for
    backward and recomputes the one product there, with the same gradients. A deeper net keeps
    more activations, and is checkpointed."""
    calls = []
    real = layers_mod.checkpoint
    monkeypatch.setattr(layers_mod, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(kn, "SPLIT_MIN_VALUES", 0)
    layer = _nonstationary_layer(depth)
    x = torch.randn(2, 12, 5, 6, dtype=F64)
    hidden_values = layer.group_order * 30 * layer.in_rotations * 9 * 8

    def run():
        layer.zero_grad(set_to_none=True)
        kept = []

        def pack(t):
            kept.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = layer(x, backend="factored_torch")
        y.square().sum().backward()
        return max(kept), [p.grad.clone() for p in layer.parameters() if p.grad is not None]

    largest_small, want = run()
    monkeypatch.setattr(layers_mod, "CHECKPOINT_BYTES", 1)
    largest_large, got = run()
    assert len(calls) == (0 if depth == 3 else 1)
    if depth == 3:
        assert largest_small >= hidden_values > largest_large  # the product was kept, then not
    for g, w in zip(got, want):
        assert torch.allclose(g, w, rtol=1e-11, atol=1e-13)


def test_large_split_layer_under_compile_keeps_no_hidden_sized_tensor(monkeypatch):
    """Compiled, the split is plain operators whose product the partitioner would keep: a large
    layer is checkpointed there as before, and keeps nothing of the hidden features' size."""
    monkeypatch.setattr(kn, "SPLIT_MIN_VALUES", 0)
    monkeypatch.setattr(layers_mod, "CHECKPOINT_BYTES", 1)
    layer = _nonstationary_layer(3)
    x = torch.randn(2, 12, 5, 6, dtype=F64)
    hidden_values = layer.group_order * 30 * layer.in_rotations * 9 * 8
    kept = []

    def pack(t):
        kept.append(t.numel())
        return t

    compiled = torch.compile(lambda t: layer(t, backend="factored_torch"), fullgraph=True, backend="aot_eager")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = compiled(x)
    y.sum().backward()
    assert kept and max(kept) < hidden_values


def test_split_passes_over_large_tensors_are_fewer(monkeypatch):
    """What the split is for: fewer operators that read or write a tensor of the hidden features'
    size in the kernel net's forward + backward (direct: the first layer's add, sine, the
    product's input, their backward and reductions; split: the product, the sine, its backward)."""
    net, coords = _net_and_lattice(False, 3, torch.float32, hidden=8)
    values = _direct_hidden(net, coords).numel()

    def large_ops():
        net.zero_grad(set_to_none=True)
        with OpSizes() as seq:
            net.hidden(coords).sum().backward()
        return len(seq.at_least(values // 2))

    direct = large_ops()
    monkeypatch.setattr(kn, "SPLIT_MIN_VALUES", 0)
    split = large_ops()
    assert split <= direct - 5, (split, direct)


def test_split_under_bf16_autocast_matches_the_direct_form_to_bf16_rounding(monkeypatch):
    """Under autocast the product runs in bf16 (as the direct form's nn.Linear does); the gradients
    return in the parameters' fp32."""
    net, coords = _net_and_lattice(False, 3, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = _direct_hidden(net, coords)
        monkeypatch.setattr(kn, "SPLIT_MIN_VALUES", 0)
        got = net.hidden(coords)
    assert got.dtype == want.dtype == torch.bfloat16
    exact = _direct_hidden(net, coords)

    def err(t):
        e = t.float() - exact
        return e.abs().max(), e.pow(2).mean().sqrt()

    # bf16 products err ~5e-3 RMS either way (the direct form's input is rounded to bf16 too)
    (split_max, split_rms), (direct_max, direct_rms) = err(got), err(want)
    assert split_rms <= 1.25 * direct_rms and split_max <= 1.25 * direct_max, (split_rms, direct_rms)
    ones = torch.ones_like(exact)
    exact_grads = _param_grads(net, exact, ones)
    for g, d, e in zip(_param_grads(net, got.float(), ones), _param_grads(net, want.float(), ones), exact_grads):
        assert g.dtype == torch.float32 and torch.isfinite(g).all()
        # Within bf16's resolution of the largest gradient (2^-8): the split rounds d/d[sin a | cos a]
        # to bf16 before combining the halves (da = ds_sin cos a - ds_cos sin a), where the direct
        # form rounds one product and then multiplies in fp32 (here 1.7e-3 against 1.5e-4 of the
        # largest, the omega_rel gradient).
        assert (g - e).abs().max() <= 1.5 * (d - e).abs().max() + 2**-8 * e.abs().max()


def test_split_compiles_to_one_graph_with_the_eager_result(monkeypatch):
    monkeypatch.setattr(kn, "SPLIT_MIN_VALUES", 0)
    layer = _nonstationary_layer(3)
    x = torch.randn(2, 12, 5, 6, dtype=F64)

    def grads(fn):
        layer.zero_grad(set_to_none=True)
        y = fn(x)
        y.square().sum().backward()
        return [y.detach()] + [p.grad.clone() for p in layer.parameters() if p.grad is not None]

    eager = grads(lambda t: layer(t, backend="factored_torch"))
    compiled = torch.compile(lambda t: layer(t, backend="factored_torch"), fullgraph=True, backend="aot_eager")
    for g, e in zip(grads(compiled), eager):
        assert torch.allclose(g, e, rtol=1e-10, atol=1e-12)


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@CUDA
@pytest.mark.parametrize("autocast", [None, torch.bfloat16, torch.float16], ids=["fp32", "bf16-autocast", "fp16-autocast"])
def test_split_on_cuda_matches_the_direct_form(autocast, monkeypatch):
    """On a GPU, in fp32 (TF32 off, as PyTorch leaves it) and under autocast: the split's values
    and gradients against the direct form's in the same precision, and both against fp64."""
    net, coords = _net_and_lattice(False, 3, torch.float32, hidden=32)
    net, coords = net.cuda(), {k: v.cuda() for k, v in coords.items()}
    exact_net = _net_and_lattice(False, 3, F64, hidden=32)[0].cuda()
    exact_coords = {k: v.double() for k, v in coords.items()}
    exact = _direct_hidden(exact_net, exact_coords)
    ones = torch.ones_like(exact)
    exact_grads = _param_grads(exact_net, exact, ones)

    def run(split):
        monkeypatch.setattr(kn, "SPLIT_MIN_VALUES", 0 if split else 1 << 62)
        monkeypatch.setattr(kn, "SPLIT_MIN_ROWS_PER_HIDDEN", 0)
        with torch.autocast("cuda", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            z = net.hidden(coords) if split else _direct_hidden(net, coords)
        return z, _param_grads(net, z.float(), ones.float())

    (zs, gs), (zd, gd) = run(True), run(False)
    err = lambda t: (t.double() - exact).abs().max().item()  # noqa: E731
    assert err(zs) <= 1.5 * err(zd) + (1e-6 if autocast is None else 1e-3)
    # 16-bit: the split rounds its [2H+1, P*H] weight gradient per position before summing them
    # in fp32, and d/d[sin a | cos a] before combining its halves, where the direct form rounds one
    # product each: up to ~2e-3 of the largest (CPU, bf16 and fp16); bf16's resolution is 2^-8
    slack = 1e-4 if autocast is None else 2**-8
    for s, d, e in zip(gs, gd, exact_grads):
        assert s.dtype == torch.float32 and torch.isfinite(s).all()
        assert (s.double() - e).abs().max() <= 1.5 * (d.double() - e).abs().max() + slack * e.abs().max()


@CUDA
def test_split_layer_on_cuda_through_the_triton_backend(monkeypatch):
    """A translation non-stationary layer with the split, bf16 input, on the triton backend: the
    output and every gradient against the same layer without the split."""
    torch.manual_seed(3)
    layer = rc.GroupConv(4, 4, 3, 4, hidden_channels=32, translation_nonstationary=True, omega_pos=1.0).cuda()
    x = torch.randn(2, 16, 8, 8, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def run(split):
        monkeypatch.setattr(kn, "SPLIT_MIN_VALUES", 0 if split else 1 << 62)
        monkeypatch.setattr(kn, "SPLIT_MIN_ROWS_PER_HIDDEN", 0)
        layer.zero_grad(set_to_none=True)
        x.grad = None
        y = layer(x, backend="triton")
        y.float().square().sum().backward()
        return [y.float()] + [t.grad.float() for t in (x, *layer.parameters()) if t.grad is not None]

    for s, d in zip(run(True), run(False)):
        assert torch.isfinite(s).all()
        assert (s - d).abs().max() <= 3e-2 * d.abs().max() + 1e-6
