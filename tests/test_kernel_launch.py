"""Host-side behaviour of the fused kernels: batch-chunked column buffer, pinned tile configs,
config pruning and autotune-key buckets (kernels under the interpreter on CPU, or on CUDA)."""
import pytest
import torch
import triton

from relaxedconv.kernels import common
from relaxedconv.kernels import relaxed_conv_bwd as bwd
from relaxedconv.reference import ConvGeometry
from relaxedconv.triton_conv import relaxed_conv_triton
from relaxedconv.benchmark.opcount import OpCounter
from _triton_cases import DEVICE, rel_err


@pytest.fixture(autouse=True)
def _triton_backward_route(monkeypatch):
    """These tests are about the Triton backward's host side (column buffer, U, repacks): run
    stationary layers through it too, not through the conv2d bank."""
    monkeypatch.setenv(bwd.STATIONARY_BACKWARD_ENV, "fused")


def _op_inputs(per_position, *, batch=3, hidden=17, dtype=torch.float64):
    g = ConvGeometry(in_channels=2, out_channels=3, in_rotations=2, out_rotations=2, kernel_size=3, padding=1)
    h, w = 3, 4
    x = torch.randn(batch, 4, h, w, dtype=dtype, device=DEVICE, requires_grad=True)
    zshape = (2, h * w, g.window, hidden) if per_position else (2, g.window, hidden)
    z = torch.randn(zshape, dtype=dtype, device=DEVICE, requires_grad=True)
    w_ext = torch.randn(3, 2, hidden, dtype=dtype, device=DEVICE, requires_grad=True)
    bias = torch.randn(3, dtype=dtype, device=DEVICE, requires_grad=True)
    return g, (x, z, w_ext, bias)


def _grads(g, inputs):
    y = relaxed_conv_triton(*inputs, g)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(y)
    return [y.detach()] + list(torch.autograd.grad((y * dy).sum(), inputs))


@pytest.mark.parametrize("per_position", [False, True], ids=["stationary", "per-position"])
def test_input_gradient_is_the_same_when_the_column_buffer_is_built_in_batch_chunks(per_position, monkeypatch, poisoned_outputs):
    torch.manual_seed(0)
    g, inputs = _op_inputs(per_position)
    whole = _grads(g, inputs)
    # A budget of one image's columns: dX is built image by image (3 chunks).
    one_image = 12 * 9 * 4 * 8
    monkeypatch.setattr(bwd, "COLUMN_BUFFER_BYTES", one_image)
    chunked = _grads(g, inputs)
    for a, b in zip(whole, chunked):
        assert not torch.isnan(b).any()
        assert rel_err(b, a) < 1e-13


def test_a_pinned_config_is_used_and_gives_the_same_result(monkeypatch):
    torch.manual_seed(1)
    g, inputs = _op_inputs(True)
    ref = _grads(g, inputs)
    calls = []
    real = common.launch

    def spy(name, kernel, autotuned, grid, args, consts, fixed, **kw):
        calls.append((name, common.pinned_config(name)))
        return real(name, kernel, autotuned, grid, args, consts, fixed, **kw)

    monkeypatch.setattr(common, "launch", spy)
    monkeypatch.setenv("RELAXEDCONV_KERNEL_CONFIG", "u:BLOCK_M=32,BLOCK_K=32; v:BLOCK_N=32 ;fold:BLOCK_Q=32,BLOCK_C=16")
    pinned = _grads(g, inputs)
    for a, b in zip(ref, pinned):
        assert rel_err(b, a) < 1e-12
    seen = dict(calls)
    assert seen["u"] == ({"BLOCK_M": 32, "BLOCK_K": 32}, {})
    assert seen["fold"] == ({"BLOCK_Q": 32, "BLOCK_C": 16}, {})
    assert seen["dz"] is None  # not pinned: the usual launch


def test_deterministic_algorithms_run_an_untimed_config(monkeypatch):
    """Under torch.use_deterministic_algorithms an autotuned kernel runs the first config its
    pruning keeps (a function of the shapes), never the autotuner's timed choice, which may differ
    from process to process and round differently: reruns give the same bits, and the result
    is the fixed tile's to rounding."""
    from triton.runtime.autotuner import Autotuner

    torch.manual_seed(2)
    g, inputs = _op_inputs(True, dtype=torch.float32)
    ref = _grads(g, inputs)  # the fixed tile (no autotuning off a GPU)
    monkeypatch.setattr(common, "use_autotune", lambda device, dtype: True)
    monkeypatch.setattr(Autotuner, "run", lambda *a, **k: pytest.fail("timed autotuning under deterministic algorithms"))
    chosen = []
    real = common.untimed_configs
    monkeypatch.setattr(common, "untimed_configs", lambda *a: chosen.append(real(*a)[0]) or real(*a))
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first, second = _grads(g, inputs), _grads(g, inputs)
    finally:
        torch.use_deterministic_algorithms(before)
    assert chosen  # every autotuned launch (u, dz, v, fold) went through it
    for meta, opts in chosen:
        assert meta and set(opts) <= set(common.LAUNCH_OPTIONS)
    for a, b, r in zip(first, second, ref):
        assert torch.equal(a, b)
        assert rel_err(a, r) < 1e-5


def test_deterministic_launch_skips_a_config_the_card_cannot_run(monkeypatch):
    """Like the autotuner, the untimed choice passes over a config whose launch raises
    OutOfResources (a card with less shared memory than the pruning plans for) to the next kept
    one; when none can run, the error reaches the caller."""
    from triton.runtime.errors import OutOfResources

    class Tuner:
        arg_names = ["x_ptr", "ROWS"]
        configs = [triton.Config({"BLOCK_M": m}, num_warps=4, num_stages=s) for m, s in ((128, 4), (64, 3), (32, 2))]
        early_config_prune = None

    launched = []

    class Kernel:
        def __getitem__(self, grid):
            def run(*args, **kw):
                launched.append(kw["BLOCK_M"])
                if kw["BLOCK_M"] == 128 or refuse_all:
                    raise OutOfResources(300000, 232448, "shared memory")
            return run

    monkeypatch.setattr(common, "use_autotune", lambda device, dtype: True)
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    refuse_all = False
    common.launch("u", Kernel(), Tuner(), lambda meta: (1,), (None, 64), {}, {"BLOCK_M": 16},
                  device=torch.device("cuda"), dtype=torch.bfloat16)
    assert launched == [128, 64]
    refuse_all = True
    with pytest.raises(OutOfResources):
        common.launch("u", Kernel(), Tuner(), lambda meta: (1,), (None, 64), {}, {"BLOCK_M": 16},
                      device=torch.device("cuda"), dtype=torch.bfloat16)


def test_a_pin_takes_what_it_leaves_out_from_the_fixed_launch(monkeypatch):
    launched = []

    class Kernel:
        def __getitem__(self, grid):
            return lambda *args, **kw: launched.append((grid, kw))

    fixed = {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 8, "num_stages": 2}
    monkeypatch.setenv("RELAXEDCONV_KERNEL_CONFIG", "u:BLOCK_M=128,maxnreg=96")
    assert common.pinned_config("u") == ({"BLOCK_M": 128}, {"maxnreg": 96})
    common.launch("u", Kernel(), None, lambda meta: (meta["BLOCK_M"],), (1,), {"C": 3}, fixed,
                  device=torch.device("cpu"), dtype=torch.float32)
    assert launched == [((128,), {"C": 3, "BLOCK_M": 128, "BLOCK_N": 32, "num_warps": 8, "num_stages": 2, "maxnreg": 96})]


@pytest.mark.parametrize("spec", ["u:BLOCK_M", "u:BLOCK_M=big", "u:BLOCK_M=16,num_warps"])
def test_a_malformed_pinned_config_says_what_is_expected(spec, monkeypatch):
    monkeypatch.setenv("RELAXEDCONV_KERNEL_CONFIG", spec)
    with pytest.raises(ValueError, match="KEY=INTEGER"):
        common.pinned_config("u")


def test_configs_larger_than_the_problem_are_pruned_but_one_always_survives():
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_K": k}) for m, k in [(16, 16), (64, 32), (128, 64), (256, 64)]]
    prune = common.prune_by_size({"BLOCK_M": "ROWS", "BLOCK_K": "J"})
    kept = prune(configs, {"ROWS": 96, "J": 49})
    assert [c.kwargs for c in kept] == [{"BLOCK_M": 16, "BLOCK_K": 16}, {"BLOCK_M": 64, "BLOCK_K": 32}, {"BLOCK_M": 128, "BLOCK_K": 64}]
    assert len(prune(configs[2:], {"ROWS": 3, "J": 3})) == 1


def test_configs_the_card_cannot_hold_or_that_spill_in_exact_fp32_are_pruned():
    """kernel report 2026-11-27: 256-row configs plan 240-252 KB of shared memory in fp32 (227 KB
    allowed); exact fp32 (FMA units) spills beyond 64x64x32 tiles."""
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_stages=s)
               for m, n, k, s in [(256, 64, 64, 3), (128, 64, 64, 3), (64, 64, 32, 4), (64, 32, 64, 4)]]
    prune = common.prune_by_size({})
    bf16 = {"x_ptr": torch.empty(1, dtype=torch.bfloat16)}
    fp32 = {"x_ptr": torch.empty(1, dtype=torch.float32)}

    def kept(named, **kw):
        return [tuple(c.kwargs.values()) for c in prune(configs, named, **kw)]

    assert kept(bf16, PRECISION=None) == [(256, 64, 64), (128, 64, 64), (64, 64, 32), (64, 32, 64)]
    assert kept(fp32, PRECISION="tf32") == [(128, 64, 64), (64, 64, 32), (64, 32, 64)]
    assert kept(fp32, PRECISION="ieee", FP64=False) == [(64, 64, 32), (64, 32, 64)]


def test_batch_sizes_in_one_bucket_share_an_autotune_key():
    assert common.bucket(33) == common.bucket(64) == 64
    assert common.bucket(64) != common.bucket(65)
    assert common.bucket(0) == 1


@pytest.mark.parametrize("hidden, expected", [(33, (32, True)), (17, (16, True)), (9, (9, False)), (65, (64, True)), (40, (40, False))])
def test_hidden_split(hidden, expected):
    assert common.hidden_split(hidden) == expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_aligned_hidden_casts_and_pads_rows_to_sixteen_in_one_copy(dtype):
    z = torch.randn(2, 5, 33)
    with OpCounter() as ops:
        za = common.aligned_hidden(z, dtype)
    assert za.shape == (2, 5, 48) and za.stride(-2) % 16 == 0 and za.dtype == dtype
    assert torch.equal(za[..., :33], z.to(dtype))
    assert ops.counts["copy_"] == 1 and ops.total - ops.counts["empty"] - ops.counts["slice"] == 1
    # already aligned and in the dtype asked for: no copy at all
    z32 = torch.randn(2, 5, 32)
    assert common.aligned_hidden(z32, torch.float32) is z32


@pytest.mark.parametrize("per_position", [False, True], ids=["stationary", "per-position"])
def test_recomputing_u_in_backward_gives_the_same_gradients(per_position, monkeypatch):
    from relaxedconv.kernels import relaxed_conv_fwd as fwd

    calls = []
    real = fwd.hidden_projection
    monkeypatch.setattr(bwd, "hidden_projection", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(2)
    g, inputs = _op_inputs(per_position)
    kept = _grads(g, inputs)
    assert not calls, "the backward recomputed U although the forward kept it"
    monkeypatch.setenv("RELAXEDCONV_TRITON_RECOMPUTE_U", "1")
    recomputed = _grads(g, inputs)
    assert len(calls) == 1
    for a, b in zip(kept, recomputed):
        assert torch.equal(a, b)


class _RecordingKernel:
    """Stands in for a JIT kernel / autotuner: records how it was launched."""

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        return lambda *args, **kw: self.calls.append(kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fp32_on_cuda_uses_the_verified_window_columns_config(dtype, monkeypatch):
    """H200, Triton 3.6: v's largest fp32 config faulted; fp32 takes the config that ran cleanly,
    16-bit inputs keep autotuning over the other configs, and a pinned config still wins over both."""
    from relaxedconv.kernels.relaxed_conv_bwd import FP32_WINDOW_COLUMNS_CONFIG, _window_columns_autotuned

    tuner = _window_columns_autotuned
    args = {"du_ptr": torch.empty(1, dtype=dtype), "ROWS": 4096, "J": 392, "N_ROT": 8, "HMAIN": 32}
    kept = tuner.early_config_prune(tuner.configs, args, PRECISION="tf32" if dtype == torch.float32 else None, FP64=False)
    if dtype == torch.float32:
        assert kept == [FP32_WINDOW_COLUMNS_CONFIG]
    else:
        assert FP32_WINDOW_COLUMNS_CONFIG not in kept and len(kept) > 1
    monkeypatch.setattr(common, "use_autotune", lambda device, dtype: True)
    monkeypatch.setenv("RELAXEDCONV_KERNEL_CONFIG", "v:BLOCK_M=128,num_stages=3")
    kernel, autotuned = _RecordingKernel(), _RecordingKernel()
    common.launch("v", kernel, autotuned, lambda meta: (1,), (), {}, {"BLOCK_M": 16}, device=torch.device("cuda"), dtype=dtype)
    assert kernel.calls == [{"BLOCK_M": 128, "num_stages": 3}] and autotuned.calls == []


@pytest.mark.parametrize("per_position", [False, True], ids=["stationary", "per-position"])
def test_the_backward_reuses_the_forwards_packed_input_and_aligned_z(per_position, monkeypatch):
    """The channels-last repack and the Z alignment run once per forward+backward (the repack of
    G4's input took 265 us on an H200); RELAXEDCONV_TRITON_RECOMPUTE_U=1 keeps nothing and rebuilds."""
    calls = {"pack": 0, "align": 0}
    pack, align = common.channels_last_padded, common.aligned_hidden

    def counting(name, fn):
        def wrapped(*a):
            calls[name] += 1
            return fn(*a)
        return wrapped

    monkeypatch.setattr(common, "channels_last_padded", counting("pack", pack))
    monkeypatch.setattr(common, "aligned_hidden", counting("align", align))
    torch.manual_seed(3)
    g, inputs = _op_inputs(per_position)
    kept = _grads(g, inputs)
    assert calls == {"pack": 1, "align": 1}
    monkeypatch.setenv("RELAXEDCONV_TRITON_RECOMPUTE_U", "1")
    rebuilt = _grads(g, inputs)
    assert calls == {"pack": 3, "align": 3}
    for a, b in zip(kept, rebuilt):
        assert torch.equal(a, b)


def test_eager_calls_skip_the_custom_operator_dispatch(monkeypatch):
    """Eager mode runs the host functions behind a plain autograd.Function (the custom operator's
    dispatch cost ~200 us of host time per step); torch.compile keeps the opaque custom operator
    (tests/test_compile.py), and both give the same result there."""
    from relaxedconv import triton_conv

    def refuse(*args, **kwargs):
        raise AssertionError("eager mode went through the custom operator")

    monkeypatch.setattr(triton_conv, "triton_conv_fwd", refuse)
    monkeypatch.setattr(triton_conv, "triton_conv_bwd", refuse)
    torch.manual_seed(5)
    g, inputs = _op_inputs(True)
    grads = _grads(g, inputs)
    assert all(t is not None and torch.isfinite(t).all() for t in grads)


@pytest.mark.parametrize("per_position", [False, True], ids=["stationary", "per-position"])
def test_factors_keep_their_dtype_beside_a_lower_precision_input(per_position, exact_fp32, poisoned_outputs):
    """The triton backend takes the factors as they are (the layer's fp32 parameters beside a bf16
    input): the kernels read them in x's dtype through their packing copy, and dZ, dW_ext come back
    in the factors' dtype, not rounded to x's. Here fp64 factors beside an fp32 input."""
    from relaxedconv import reference

    torch.manual_seed(7)
    g = ConvGeometry(in_channels=2, out_channels=3, in_rotations=2, out_rotations=2, kernel_size=3, padding=1)
    h, w = 4, 5
    x = torch.randn(2, 4, h, w, device=DEVICE, requires_grad=True)
    zshape = (2, h * w, g.window, 5) if per_position else (2, g.window, 5)
    z = torch.randn(zshape, dtype=torch.float64, device=DEVICE, requires_grad=True)
    w_ext = torch.randn(3, 2, 5, dtype=torch.float64, device=DEVICE, requires_grad=True)
    dy = torch.randn(2, 6, h, w, device=DEVICE)
    y = relaxed_conv_triton(x, z, w_ext, None, g)
    y.backward(dy)
    assert y.dtype == x.grad.dtype == torch.float32 and z.grad.dtype == w_ext.grad.dtype == torch.float64
    # the reference in fp64 from the factors as the kernels saw them (rounded to fp32)
    xr, zr, wr = (t.detach().to(torch.float32).double().requires_grad_() for t in (x, z, w_ext))
    yr = reference.conv_factored(xr, zr, wr, None, g)
    yr.backward(dy.double())
    assert rel_err(y.detach(), yr.detach()) < 1e-5
    for got, ref in ((x.grad, xr.grad), (z.grad, zr.grad), (w_ext.grad, wr.grad)):
        assert rel_err(got, ref) < 1e-5


@pytest.mark.parametrize("shape, padding", [((2, 5, 4, 6), 1), ((1, 40, 3, 35), 3), ((3, 1, 5, 5), 0), ((2, 33, 7, 2), 2)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "transposed"])
def test_channels_last_padded_is_pad_then_permute_in_one_kernel(shape, padding, layout, poisoned_outputs):
    """The Triton repack writes every element (outputs start as NaN), the zero border included,
    from any input strides, with more than one tile along W and C."""
    torch.manual_seed(8)
    x = torch.randn(shape, dtype=torch.float64, device=DEVICE)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "transposed":
        x = torch.randn(*shape[:2], shape[3], shape[2], dtype=torch.float64, device=DEVICE).transpose(2, 3)
    want = torch.nn.functional.pad(x, (padding,) * 4).permute(0, 2, 3, 1).contiguous()
    got = common.channels_last_padded(x, padding)
    assert got.shape == want.shape and got.is_contiguous()
    assert torch.equal(got, want)


def test_z_is_packed_in_one_copy_and_dz_comes_back_without_a_round_trip(monkeypatch):
    """A per-position layer on the triton backend, fwd+bwd with a bf16 input and the layer's fp32
    factors: the only operator that reads or writes a Z-sized tensor on the way into the kernels is
    the one packing copy (no cast then pad), and dZ reaches the kernel net without being cast to
    bf16 and back (T2 on an H200: the backward fell 3.08 -> 2.34 ms with these passes gone)."""
    from relaxedconv import layers as layers_mod
    from relaxedconv.benchmark import cases as cases_mod
    from relaxedconv.benchmark.opcount import OpSizes

    monkeypatch.setattr(layers_mod, "ONES_COLUMN_FUSED_MIN", 0)  # the one-pass ones column at any size
    monkeypatch.setattr(common, "launch", lambda *a, **k: None)  # host operators only (bf16 on CPU)
    case = cases_mod.Case("tiny", 4, 3, 2, 6, 2, kernel_size=3, hidden=15, translation_nonstationary=True)
    layer = cases_mod.build_layer(case, torch.device("cpu"))
    x = cases_mod.make_input(case, torch.device("cpu"), torch.bfloat16).requires_grad_()
    z_numel = layer.factored_kernel((6, 6))[0].numel()

    with OpSizes() as ops:
        layer(x, backend="triton").sum().backward()
    big = ops.at_least(z_numel)
    assert "_to_copy" not in big and "constant_pad_nd" not in big, big
    assert big.count("copy_") == 1, big  # the cast-and-align copy


@pytest.mark.skipif(DEVICE == "cuda", reason="the interpreter's limit: on CUDA bf16 is what the kernels are for")
def test_bf16_in_the_interpreter_is_refused_not_computed():
    """Triton's interpreter has no bf16: a bf16 triton call on CPU (or one under CPU bf16 autocast)
    computed garbage (errors of ~1e9 relative) without a word; it is refused with what to use."""
    import relaxedconv as rc

    layer = rc.LiftingConv(2, 3, 3, 4, hidden_channels=8)
    x = torch.randn(2, 2, 6, 6)
    with pytest.raises(TypeError, match=r"interpreter, which has no bfloat16.*factored_torch"):
        layer(x.bfloat16(), backend="triton")
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(TypeError, match="no bfloat16"):
        layer(x, backend="triton")
    ref = layer(x, backend="materialize")
    assert rel_err(layer(x.half(), backend="triton").float(), ref) < 5e-3  # fp16 is computed correctly
