"""Less work per step (issue 13): the lattice built once per layer and shape, the generated kernel
cached for inference until a parameter changes, no host synchronisation inside a step."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import relaxedconv as rc
from relaxedconv import layers as layers_mod
from relaxedconv.benchmark.opcount import count
from relaxedconv.models import build_model

CPU_BACKENDS = ("materialize", "expand_conv", "factored_torch")


def _layer(trans=False, backend="auto", **kw):
    torch.manual_seed(0)
    return rc.GroupConv(2, 3, 3, 4, hidden_channels=4, translation_nonstationary=trans, omega_pos=1.0 if trans else 0.0,
                        rotation_nonstationary=True, omega_rot=1.0, backend=backend, **kw)


class Counting:
    """Counts calls of ``obj.name`` (wrapping it in place; undone by monkeypatch)."""

    def __init__(self, monkeypatch, obj, name):
        self.calls = 0
        real = getattr(obj, name)

        def wrapper(*a, **k):
            self.calls += 1
            return real(*a, **k)

        monkeypatch.setattr(obj, name, wrapper)


# ---- the lattice -----------------------------------------------------------------------------------
def test_lattice_and_mask_are_built_once_per_layer_dtype_and_shape(monkeypatch):
    coords = Counting(monkeypatch, layers_mod, "coordinate_groups")
    masks = Counting(monkeypatch, layers_mod, "disk_mask")
    stat, trans = _layer(), _layer(trans=True)
    built = coords.calls  # construction (the init-scale statistics) builds each lattice once
    for _ in range(3):
        stat(torch.randn(2, 8, 5, 6)).sum().backward()
        stat(torch.randn(2, 8, 7, 7))  # another size: the same lattice when translation-stationary
    assert coords.calls == built
    trans(torch.randn(2, 8, 5, 6)).sum().backward()
    trans(torch.randn(2, 8, 5, 6))
    assert coords.calls == built + 1  # per-position coordinates: one lattice per output size
    trans(torch.randn(2, 8, 7, 7))
    assert coords.calls == built + 2
    stat.double()(torch.randn(2, 8, 5, 6, dtype=torch.float64))  # follows the module to a new dtype
    assert coords.calls == built + 3
    assert masks.calls <= 3  # once per layer (construction) and once for the new dtype


def test_cached_lattice_follows_dtype_and_matches_a_fresh_layer():
    layer = _layer(trans=True)
    x = torch.randn(2, 8, 5, 6, dtype=torch.float64)
    layer(x.float())  # fills the float32 caches
    fresh = copy.deepcopy(layer)
    fresh.__dict__.pop("_lattice_cache", None)  # (a deepcopy carries no cache since _RelaxedGroupConv.__getstate__)
    fresh.__dict__.pop("_inference_cache", None)
    assert torch.equal(layer.double()(x), fresh.double()(x))


def test_state_dict_is_the_same_in_train_and_eval_and_holds_no_cache():
    layer = _layer()
    keys = list(layer.state_dict())
    layer(torch.randn(2, 8, 5, 6)).sum().backward()
    layer.eval()
    with torch.no_grad():
        layer(torch.randn(2, 8, 5, 6))
    assert list(layer.state_dict()) == keys and all("cache" not in k for k in keys)
    assert layer._inference_cache  # a kernel is cached, outside the state_dict


# ---- the inference cache -----------------------------------------------------------------------------
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("trans", [False, True])
def test_inference_reuses_the_generated_kernel_and_gives_the_same_output(monkeypatch, backend, trans):
    if trans and backend == "expand_conv":
        pytest.skip("expand_conv cannot run translation non-stationary layers")
    layer = _layer(trans, backend).eval()
    x = torch.randn(2, 8, 5, 6)
    y_grad_path = layer(x)  # grad enabled, parameters require grad: no cache
    assert y_grad_path.requires_grad and not layer.__dict__.get("_inference_cache")
    hidden = Counting(monkeypatch, layer.kernel_net, "hidden")
    with torch.no_grad():
        y1 = layer(x)
        y2 = layer(torch.cat([x, x]))  # another batch: the same kernel
    assert hidden.calls == 1
    assert torch.equal(y1, y_grad_path.detach()) and torch.equal(y2[:2], y1)
    # a cached call is the convolution alone: no kernel-net operator (sin), far fewer operators
    with torch.no_grad():
        cached = count(lambda: layer(x)).counts
        layer.clear_kernel_cache()
        uncached = count(lambda: layer(x)).counts
    kernel_net_ops = {"sin", "addmm", "constant_pad_nd"}  # its layers, and [z | 1]
    assert uncached["sin"] >= 2 and kernel_net_ops <= set(uncached)
    assert not kernel_net_ops & set(cached) and sum(cached.values()) < sum(uncached.values())
    if backend == "expand_conv":
        assert dict(cached) == {"convolution": 1}  # deployed at plain-convolution speed


def test_inference_cache_is_dropped_when_a_parameter_changes(monkeypatch):
    layer = _layer(backend="expand_conv")
    x = torch.randn(2, 8, 5, 6)
    hidden = Counting(monkeypatch, layer.kernel_net, "hidden")

    def fresh_output():
        ref = copy.deepcopy(layer)
        del ref.kernel_net.hidden  # the copy of the counting wrapper would call the original
        ref.__dict__.pop("_inference_cache", None)
        with torch.no_grad():
            return ref(x)

    def check(expected_calls):
        with torch.no_grad():
            y = layer(x)
        assert hidden.calls == expected_calls
        assert torch.equal(y, fresh_output())

    check(1)
    check(1)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    layer(x).square().sum().backward()  # a training step (grad path; drops the cache)
    opt.step()
    check(3)
    with torch.no_grad():
        layer.kernel_net.omega_rot.add_(0.5)  # in place, a parameter that is not even trained
    check(4)
    layer.load_state_dict(_layer(backend="expand_conv").state_dict())
    check(5)
    layer.kernel_net.out.weight = torch.nn.Parameter(layer.kernel_net.out.weight.detach() * 2)  # replaced
    check(6)


def test_translation_relaxed_inference_cache_holds_one_input_size(monkeypatch):
    """A translation non-stationary layer's kernel depends on the output size: the cache kept one
    Z (N*P*J*(H+1) values, 424 MB for T2 at 32x32) per size it ever saw, without bound. It keeps
    the latest size's, reused while the size stays."""
    layer = _layer(trans=True, backend="factored_torch").eval()
    hidden = Counting(monkeypatch, layer.kernel_net, "hidden")

    def held_sizes():
        cache = layer.__dict__["_inference_cache"]
        # every entry belongs to the output size its "state" names (last field)
        return {cache["state"][-1]} if len(cache) > 1 else set()

    with torch.no_grad():
        for size in (5, 6, 7, 7, 7):
            x = torch.randn(2, 8, size, size + 1)
            y = layer(x)
            assert held_sizes() == {(size, size + 1)}
            fresh = copy.deepcopy(layer)
            del fresh.kernel_net.hidden  # the copy of the counting wrapper would count its calls
            fresh.clear_kernel_cache()
            assert torch.equal(y, fresh(x))
    assert hidden.calls == 3  # one kernel per new size; the same size again is the cached one


@pytest.mark.parametrize("train", [False, True])
def test_clear_kernel_cache_is_the_way_out_after_a_write_through_data(train):
    """The README's recipe for writes through ``.data`` (no version counter records them): after
    ``clear_kernel_cache()`` every call sees them. A fixed omega's scaled coordinates are kept for
    training calls too, and clear_kernel_cache left them, so even then a training call was stale."""
    layer = _layer(backend="expand_conv").train(train)
    x = torch.randn(2, 8, 5, 6)
    with torch.no_grad():
        layer(x)
    layer(x)  # a training call: the kernel net's coordinates of the fixed omega_rel are kept
    layer.kernel_net.omega_rel.data.fill_(3.0)
    layer.kernel_net.out.weight.data.mul_(2.0)
    layer.clear_kernel_cache()
    fresh = copy.deepcopy(layer)
    fresh.kernel_net.__dict__.pop("_coordinate_cache", None)
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            assert torch.equal(layer(x), fresh(x))


def test_saved_and_copied_layers_carry_no_cache():
    """torch.save(model) and copy.deepcopy(model) after one no-grad forward carried every cached
    kernel along (a small se2_trans model: 0.3 MB -> 295 MB); the copies compute the same."""
    import io
    import pickle

    layer = _layer(trans=True, backend="factored_torch").eval()
    x = torch.randn(2, 8, 9, 9)
    buf = io.BytesIO()
    torch.save(layer, buf)
    fresh_bytes = buf.tell()
    with torch.no_grad():
        y = layer(x)
    assert layer.__dict__["_inference_cache"] and layer.__dict__["_lattice_cache"]
    buf = io.BytesIO()
    torch.save(layer, buf)
    assert buf.tell() <= fresh_bytes + 512
    buf.seek(0)
    for copy_ in (torch.load(buf, weights_only=False), copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert not copy_.__dict__.get("_inference_cache") and not copy_.__dict__.get("_parameter_slots")
        with torch.no_grad():
            assert torch.equal(copy_(x), y)
    assert layer.__dict__["_inference_cache"]  # the original keeps its own


def _data_parallel_replica(root, scale=1.0):
    """What nn.parallel.replicate does to each module (torch/nn/parallel/replicate.py), with the
    broadcast to another GPU replaced by a differentiable copy on the CPU (times ``scale``)."""
    modules = list(root.modules())
    replicas = {m: m._replicate_for_data_parallel() for m in modules}
    for m in modules:
        r = replicas[m]
        r._former_parameters = {}
        for k, child in m._modules.items():
            setattr(r, k, None if child is None else replicas[child])
        for k, p in m._parameters.items():
            copy_ = None if p is None else p * scale  # not a leaf, not a Parameter: a plain attribute
            setattr(r, k, copy_)
            if copy_ is not None:
                r._former_parameters[k] = copy_
        for k, b in m._buffers.items():
            if b is not None:
                setattr(r, k, b.clone())
    return replicas[root]


def test_a_data_parallel_replica_trains_and_infers_with_its_own_parameters():
    """Under nn.DataParallel a replica's parameters() is empty (they are plain attributes), so
    its kernel looked gradient-free and came from the cache it shares with the original: the
    relaxed layers got no gradient in training, and inference returned the original's kernel."""
    layer = _layer(backend="expand_conv")
    x = torch.randn(2, 8, 5, 6)
    with torch.no_grad():
        layer(x)  # the original's cache, which replicas share
    expected = layer(x)
    expected.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.requires_grad}
    layer.zero_grad()
    replica = _data_parallel_replica(layer)
    y = replica(x)
    assert y.requires_grad and torch.allclose(y, expected)
    y.square().sum().backward()
    for n, p in layer.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.allclose(p.grad, grads[n], atol=1e-6), n
    doubled = _data_parallel_replica(layer, scale=2.0)  # parameters unlike the original's
    reference = copy.deepcopy(layer)
    with torch.no_grad():
        for p in reference.parameters():
            p.mul_(2.0)
        assert torch.allclose(doubled(x), reference(x), atol=1e-6)


@pytest.mark.parametrize("trans", [False, True])
def test_vmap_over_an_ensemble_of_layers(trans):
    """torch.func's model-ensembling recipe (stack_module_state, functional_call under vmap) raised
    'Cannot access data pointer of Tensor that doesn't have storage': the cache's version check read
    the batched parameters' storage."""
    from torch.func import functional_call, stack_module_state, vmap

    layers = [_layer(trans=trans).eval() for _ in range(3)]
    for i, m in enumerate(layers):
        torch.nn.init.normal_(m.kernel_net.out.weight, std=0.1 * (i + 1))
    params, buffers = stack_module_state(layers)
    base = copy.deepcopy(layers[0]).to("meta")
    x = torch.randn(2, 8, 5, 6)
    expected = torch.stack([m(x) for m in layers])
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            y = vmap(lambda p, b: functional_call(base, (p, b), (x,)))(params, buffers)
        assert torch.allclose(y, expected, atol=1e-6)


class _Doubled(torch.nn.Module):
    def forward(self, w):
        return 2 * w


@pytest.mark.parametrize("replace", ["output_layer", "kernel_net", "parametrization"])
def test_inference_cache_is_dropped_when_a_submodule_is_replaced(replace):
    """The parameters were looked up once, in the submodules' own dicts: after
    ``layer.kernel_net.out = nn.Linear(...)`` (or another layer's kernel net) a no-grad call kept
    returning the kernel of the old weights; after a parametrization registered on a weight, an
    in-place change of its ``original`` went unseen."""
    layer = _layer(backend="expand_conv").eval()
    x = torch.randn(2, 8, 5, 6)
    with torch.no_grad():
        before = layer(x)
    donor = _layer(backend="expand_conv")
    torch.nn.init.normal_(donor.kernel_net.out.weight)
    if replace == "output_layer":
        layer.kernel_net.out = donor.kernel_net.out
    elif replace == "kernel_net":
        layer.kernel_net = donor.kernel_net
    else:
        torch.nn.utils.parametrize.register_parametrization(layer.kernel_net.out, "weight", _Doubled())
        with torch.no_grad():
            assert not torch.equal(layer(x), before)
            layer.kernel_net.out.parametrizations.weight.original.mul_(3)
    fresh = copy.deepcopy(layer)
    fresh.__dict__.pop("_inference_cache", None)
    fresh.__dict__.pop("_parameter_slots", None)
    with torch.no_grad():
        after, expected = layer(x), fresh(x)
    assert not torch.equal(before, expected)
    assert torch.equal(after, expected)


def test_no_cache_when_the_parameters_need_gradients_even_in_eval():
    layer = _layer(backend="expand_conv").eval()
    x = torch.randn(2, 8, 5, 6)
    layer(x).sum().backward()
    assert layer.kernel_net.out.weight.grad is not None and layer.kernel_net.first.weight.grad is not None
    # frozen parameters: the cached kernel serves, and the input still gets its gradient
    layer.requires_grad_(False)
    xg = x.clone().requires_grad_(True)
    y = layer(xg)
    y.sum().backward()
    assert layer._inference_cache and xg.grad is not None
    xr = x.clone().requires_grad_(True)
    rc.conv_materialize(xr, layer.full_kernel((5, 6)), layer.bias, layer.geometry).sum().backward()
    assert torch.allclose(xg.grad, xr.grad, rtol=1e-5, atol=1e-6)


def test_inference_mode_then_no_grad_then_training():
    layer = _layer(backend="expand_conv")
    x = torch.randn(2, 8, 5, 6)
    with torch.inference_mode():
        a = layer(x)
    with torch.no_grad():
        b = layer(x)  # not the inference-mode tensors: rebuilt outside inference mode
    c = layer(x.requires_grad_())
    c.sum().backward()
    assert torch.equal(a, b) and torch.equal(b, c.detach())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_kernel_cached_under_autocast_is_not_reused_outside_it(backend):
    """A validation pass under bf16 autocast, then a full-precision pass (the trainer's final
    equivariance probe): the second must not run the first's bf16 factors (on an H200 it raised
    "expected mat1 and mat2 to have the same dtype", 2026-11-27)."""
    layer = _layer(trans=backend != "expand_conv", backend=backend).eval()
    x = torch.randn(2, 8, 5, 6)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = layer(x)
        full = layer(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low_again = layer(x)
    fresh = copy.deepcopy(layer).train()
    with torch.no_grad():
        want = fresh(x)
    assert full.dtype == torch.float32 and torch.allclose(full, want, rtol=1e-5, atol=1e-6)
    assert low.dtype == low_again.dtype == torch.bfloat16 and torch.equal(low, low_again)


def test_a_lattice_first_built_under_inference_mode_serves_training_later():
    """The first call of a shape under inference_mode (a translation non-stationary layer at a new
    size, a model moved with .double()) must not leave inference tensors in the lattice, the mask
    or the folded coordinates, which a later training step saves for backward."""
    for layer, x in [
        (_layer(trans=True, backend="factored_torch"), torch.randn(2, 8, 5, 6)),
        (_layer(backend="expand_conv").double(), torch.randn(2, 8, 5, 6, dtype=torch.float64)),
    ]:
        with torch.inference_mode():
            want = layer(x)
        got = layer(x.clone().requires_grad_())
        got.square().sum().backward()
        assert layer.kernel_net.first.weight.grad is not None
        assert torch.allclose(got.detach(), want, rtol=1e-5, atol=1e-6)


def test_a_layer_made_under_inference_mode_runs_there():
    """Its parameters are inference tensors (no version counter to watch): nothing is cached, and
    each call computes its kernel afresh."""
    with torch.inference_mode():
        layer = _layer(backend="expand_conv")
        x = torch.randn(2, 8, 5, 6)
        a = layer(x)
        layer.kernel_net.out.bias.add_(1.0)  # a change the cache could not have seen
        b = layer(x)
    assert not layer.__dict__.get("_inference_cache") and not torch.equal(a, b)


def test_factored_per_position_keeps_fp64_under_autocast():
    """Autocast leaves fp64 alone; so does factored_torch's cast of its rows under autocast."""
    layer = _layer(trans=True, backend="factored_torch").double()
    x = torch.randn(2, 8, 5, 6, dtype=torch.float64)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = layer(x)
        want = layer(x)
    assert got.dtype == torch.float64 and torch.equal(got, want)


# ---- autocast: the casts stay at the backend's boundary ----------------------------------------------
class CastInputs(torch.utils._python_dispatch.TorchDispatchMode):
    """The shapes of the tensors cast (``aten._to_copy``) while active."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ == "_to_copy":
            self.shapes.append(tuple(args[0].shape))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", ["expand_conv", "factored_torch"])
@pytest.mark.parametrize("rotation_nonstationary", [False, True])
def test_a_stationary_kernel_net_casts_nothing_under_autocast(backend, rotation_nonstationary):
    """Under bf16 autocast a position-stationary layer's kernel net runs in fp32 (issue 13): its
    weights, coordinates and activations are never cast, forward or backward (autocast cast 8 of
    them per fwd+bwd, each a launch), and its factors are those of an fp32 call, bit for bit."""
    torch.manual_seed(0)
    layer = rc.GroupConv(3, 5, 5, 4, padding=2, hidden_channels=8, rotation_nonstationary=rotation_nonstationary,
                         omega_rot=0.5, backend=backend)
    x = torch.randn(2, 12, 7, 7, requires_grad=True)

    def step():
        layer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x)
        y.float().square().sum().backward()

    step()
    with CastInputs() as casts:
        step()
    net = layer.kernel_net
    coords = layer._lattice((7, 7), x.device, torch.float32).values()
    forbidden = {tuple(t.shape) for t in (*net.parameters(), *net.buffers(), *coords)}
    activations = [s for s in casts.shapes if s and s[-1] == net.hidden_channels]
    assert not activations and not forbidden & set(casts.shapes), casts.shapes
    assert len(casts.shapes) <= 10, casts.shapes  # x, z, [W_L | b_L], bias each way, y

    with torch.no_grad():
        want = layer.factored_kernel((7, 7))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = layer.factored_kernel((7, 7), compute_dtype=torch.bfloat16)
    assert all(g.dtype == torch.float32 and torch.equal(g, w) for g, w in zip(got, want))


@pytest.mark.parametrize("large", [False, True])
def test_a_translation_nonstationary_kernel_net_under_autocast_by_size(monkeypatch, large):
    """Per position the kernel net's values can be many (T2: 26 M): from
    AUTOCAST_KERNEL_NET_MIN_VALUES on its products and activations stay 16-bit under autocast,
    where fp32 would double their bytes; below (T1: 1.6 M) it runs in fp32, as a stationary one."""
    layer = _layer(trans=True, backend="factored_torch")
    values = layer._hidden_bytes((5, 6)) // 4  # N * P * J * H
    monkeypatch.setattr(layers_mod, "AUTOCAST_KERNEL_NET_MIN_VALUES", values if large else values + 1)
    with torch.no_grad():
        want, _ = layer.factored_kernel((5, 6))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            z, _ = layer.factored_kernel((5, 6), compute_dtype=torch.bfloat16)
    assert z.dtype == (torch.bfloat16 if large else torch.float32)
    if not large:
        assert torch.equal(z, want)


def test_opcount_under_autocast_counts_the_step_the_gpu_runs():
    """``opcount --autocast bf16`` counts autocast's casts (the GPU e2e step's operators), and the
    relaxed model's kernel nets add none of their own (issue 13)."""
    from relaxedconv.benchmark.opcount import training_step_counts

    kw = dict(widths=(2, 2), group_order=2, kernel_size=3, hidden=4, steps=2)
    for backend in ("conv2d", "expand_conv"):
        plain = training_step_counts("se2", backend, **kw)
        mixed = training_step_counts("se2", backend, autocast="bf16", **kw)
        assert mixed["autocast"] == "bf16" and plain["autocast"] is None
        assert "_to_copy" not in plain["fwd_bwd_top"] and mixed["fwd_bwd_top"]["_to_copy"] > 0
        assert 0 < mixed["fwd_bwd_not_views"] < mixed["fwd_bwd_ops"]
        if backend == "conv2d":
            floor_casts = mixed["fwd_bwd_top"]["_to_copy"]
        else:  # per relaxed layer only the backend's boundary casts: z, [W_L | b_L], bias, each way
            layers = len(mixed["layer_fwd_bwd_ops"])
            assert mixed["fwd_bwd_top"]["_to_copy"] <= floor_casts + 6 * layers


# ---- one training step -------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_a_training_step_never_synchronises_with_the_host(backend):
    """No .item()/float()/bool() of a tensor (aten._local_scalar_dense) in forward + backward: on
    a GPU each would wait for the queue to drain."""
    variant = "se2_rot_trans" if backend != "expand_conv" else "se2_rot"
    torch.manual_seed(0)
    model = build_model(variant, group_order=2, widths=(2, 2), kernel_size=3, hidden_channels=4, backend=backend)
    x, y = torch.randn(2, 3, 16, 16), torch.randint(0, 10, (2,))

    def step():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()

    step()
    c = count(step)
    assert c.total > 100 and c.syncs == 0, dict(c.counts)


def test_kernel_net_checkpointing_only_for_large_activations(monkeypatch):
    """Recomputing the SIREN in backward saves memory but costs ~30 host operators per step: a
    per-position layer checkpoints only when one activation reaches CHECKPOINT_BYTES, and both
    ways give the same gradients."""
    from relaxedconv import layers

    calls = []
    real = layers.checkpoint
    monkeypatch.setattr(layers, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(0)
    layer = rc.GroupConv(2, 3, 3, 4, hidden_channels=8, translation_nonstationary=True, omega_pos=1.0).double()
    x = torch.randn(2, 8, 5, 6, dtype=torch.float64)

    def grads():
        layer.zero_grad(set_to_none=True)
        layer(x, backend="factored_torch").square().sum().backward()
        return [p.grad.clone() for p in layer.parameters() if p.grad is not None]

    kept = grads()
    assert not calls  # 4 * 30 * 36 * 8 * 8 bytes: far below the threshold
    monkeypatch.setattr(layers, "CHECKPOINT_BYTES", 1)
    recomputed = grads()
    assert len(calls) == 1
    assert all(torch.allclose(a, b, rtol=1e-12, atol=0) for a, b in zip(kept, recomputed))


@pytest.mark.parametrize("masked", [True, False])
def test_ones_column_is_pad_and_mask_in_one_pass_each_way(masked, monkeypatch):
    """The constant feature and the window mask: the values and gradient of F.pad then a multiply,
    with one full-size operator forward and at most one backward (there were two each way) for a
    large z (here: any z), and the plain operators for a small one."""
    z = torch.randn(3, 4, 9, 5, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(9, dtype=torch.float64) if masked else None
    small = count(lambda: layers_mod.ones_column(z, mask))
    assert small.counts["constant_pad_nd"] == 1 and not small.counts["new_empty"]
    monkeypatch.setattr(layers_mod, "ONES_COLUMN_FUSED_MIN", 0)
    want = F.pad(z, (0, 1), value=1.0)
    want = want * mask[:, None] if masked else want
    grad = torch.randn_like(want)
    box = {}
    fwd = count(lambda: box.update(got=layers_mod.ones_column(z, mask)))
    got = box["got"]
    assert torch.equal(got, want)
    (dz_want,) = torch.autograd.grad(want, z, grad)
    bwd = count(lambda: box.update(dz=torch.autograd.grad(got, z, grad)[0]))
    dz = box["dz"]
    assert torch.equal(dz, dz_want)
    # forward: one pass over z (a multiply into the result, or a copy) and a write of the last column
    assert fwd.counts["mul"] + fwd.counts["copy_"] + fwd.counts["fill_"] == 2 and not fwd.counts["constant_pad_nd"]
    assert bwd.counts["mul"] == (1 if masked else 0) and not bwd.counts["constant_pad_nd"] and not bwd.counts["copy_"]
    assert torch.autograd.gradcheck(lambda t: layers_mod.ones_column(t, mask), (z,))
