"""dX without im2col columns (kernels/input_grad_direct.py) and the choice between dX's two routes
(kernels/route_tuning.py): agreement with an independent col2im reference, every element written,
gradients of whole layers, determinism, and the route choice's rules."""
import pytest
import torch
import torch.nn.functional as F

from relaxedconv.kernels import common, input_grad_direct, relaxed_conv_bwd, route_tuning
from relaxedconv.reference import ConvGeometry
from _triton_cases import CASES, DEVICE, case_id, make_layer, rel_err, run_with_grads

pytestmark = pytest.mark.usefixtures("exact_fp32")


def reference_dx(du, z, hid, g, x_shape):
    """dX by plain PyTorch: V[b, i, (n', kk), p] = sum_{n, h} dU[b, n, p, h, i] Z[n, p, (n', kk), h],
    then F.fold (col2im), whose channel order (i, n', kh, kw) is Z's row order within a channel."""
    bsz, cn, height, width = x_shape
    zp = z if z.dim() == 4 else z.unsqueeze(1).expand(-1, du.shape[2], -1, -1)
    v = torch.einsum("bnphi,npjh->bijp", du.double(), zp[..., :hid].double())
    return F.fold(v.reshape(bsz, -1, v.shape[-1]), (height, width), g.kernel_size, padding=g.padding)


# (C_in, N_in, N, K, padding, batch, (H, W), H+1, per position)
GEOMETRIES = [
    (1, 1, 1, 3, 1, 2, (4, 5), 9, True),     # T(2)-like: one rotation, no tail (H+1 = 9)
    (3, 2, 2, 3, 1, 1, (5, 6), 17, True),    # a tail column (H = 16)
    (2, 3, 3, 5, 0, 2, (6, 7), 9, True),     # 'valid', N_in not a power of two
    (2, 1, 1, 5, 2, 1, (6, 5), 33, True),    # H = 32 with its tail, H != W
    (3, 4, 4, 1, 0, 1, (3, 5), 9, True),     # pointwise
    (2, 3, 2, 3, 1, 1, (4, 4), 17, False),   # translation-stationary Z
    (2, 3, 2, 3, 3, 1, (3, 4), 9, True),     # padding beyond the window: border pixels get no gradient
    (5, 2, 2, 3, 1, 3, (7, 9), 17, True),    # rows over more than one tile, pixel blocks cut by the border
]


def _operands(case, dtype, seed=0):
    cin, nin, nout, k, pad, b, (h, w), hid, per_position = case
    g = ConvGeometry(in_channels=cin, out_channels=2, in_rotations=nin, out_rotations=nout, kernel_size=k, padding=pad)
    out_hw = g.out_size(h, w)
    p = out_hw[0] * out_hw[1]
    gen = torch.Generator().manual_seed(seed)
    du = torch.randn(b, nout, p, hid, cin, generator=gen, dtype=torch.float64)
    z = torch.randn((nout, p, g.window, hid) if per_position else (nout, g.window, hid), generator=gen, dtype=torch.float64)
    z_al = common.aligned_hidden(z.to(DEVICE, dtype))
    z_al[..., hid:] = float("nan")  # the kernel must not read the alignment padding
    return g, out_hw, du, z, du.to(DEVICE, dtype), z_al, (b, cin * nin, h, w), hid


@pytest.mark.parametrize("case", GEOMETRIES, ids=lambda c: f"C{c[0]}-Nin{c[1]}-N{c[2]}-K{c[3]}-pad{c[4]}-B{c[5]}-"
                         f"{c[6][0]}x{c[6][1]}-H{c[7]}-{'pp' if c[8] else 'stat'}")
def test_direct_dx_matches_col2im_fp64(case, poisoned_outputs):
    g, out_hw, du, z, du_d, z_al, x_shape, hid = _operands(case, torch.float64)
    got = input_grad_direct.direct_input_grad(du_d, z_al, hid, g, x_shape, out_hw, torch.float64)
    ref = reference_dx(du, z, hid, g, x_shape)
    assert not torch.isnan(got).any(), "an element of dX was never written"
    assert rel_err(got.cpu(), ref) < 1e-12


# the interpreter has no bf16 (it reads its bits as another type): bf16 is checked on CUDA only
HALF = [torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-6), (torch.float16, 2e-3)]
                         + ([(torch.bfloat16, 1.5e-2)] if DEVICE == "cuda" else []), ids=str)
def test_direct_dx_low_precision_against_fp64(dtype, tol):
    case = (4, 2, 2, 3, 1, 2, (5, 6), 33, True)
    g, out_hw, du, z, du_d, z_al, x_shape, hid = _operands(case, dtype, seed=1)
    got = input_grad_direct.direct_input_grad(du_d, z_al, hid, g, x_shape, out_hw, dtype)
    assert got.dtype == dtype
    assert rel_err(got.cpu(), reference_dx(du.to(dtype), z.to(dtype), hid, g, x_shape)) < tol


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_direct_dx_rounds_once_where_the_columns_route_rounds_every_column(dtype):
    """Half precision: the columns route stores V in the data dtype and sums K^2 rounded columns;
    the direct kernel accumulates in fp32 and rounds dX once, so it is at least as close to the
    exact result on average."""
    case = (4, 2, 2, 3, 1, 2, (5, 6), 33, True)
    g, out_hw, du, z, du_d, z_al, x_shape, hid = _operands(case, dtype, seed=2)
    exact = reference_dx(du.to(dtype), z.to(dtype), hid, g, x_shape)
    direct = input_grad_direct.direct_input_grad(du_d, z_al, hid, g, x_shape, out_hw, dtype)
    columns = relaxed_conv_bwd._input_grad(du_d, z_al, hid, g, x_shape, out_hw, dtype)
    err_direct = (direct.cpu().double() - exact).abs().mean()
    err_columns = (columns.cpu().double() - exact).abs().mean()
    assert err_direct < err_columns


TRANSLATION_CASES = [c for c in CASES if c[6]]


@pytest.mark.parametrize("case", TRANSLATION_CASES, ids=case_id)
def test_layer_gradients_through_the_direct_route_match_materialize(case, monkeypatch):
    monkeypatch.setenv(relaxed_conv_bwd.INPUT_GRAD_ENV, "direct")
    torch.manual_seed(0)
    layer, x = make_layer(case, dtype=torch.float64)
    _, grads, g = run_with_grads(layer, x, "triton")
    _, grads_ref, _ = run_with_grads(layer, x, "materialize", g)
    for name, ref in grads_ref.items():
        assert rel_err(grads[name], ref) < 1e-9, name


def test_direct_route_is_deterministic(monkeypatch):
    monkeypatch.setenv(relaxed_conv_bwd.INPUT_GRAD_ENV, "direct")
    torch.manual_seed(2)
    layer, x = make_layer(TRANSLATION_CASES[0], dtype=torch.float32)
    _, first, g = run_with_grads(layer, x, "triton")
    _, second, _ = run_with_grads(layer, x, "triton", g)
    assert torch.equal(first["x"], second["x"])


def test_a_route_name_that_does_not_exist_is_refused(monkeypatch):
    monkeypatch.setenv(relaxed_conv_bwd.INPUT_GRAD_ENV, "im2col")
    with pytest.raises(ValueError, match="RELAXEDCONV_TRITON_INPUT_GRAD must be 'auto', 'columns' or 'direct'"):
        relaxed_conv_bwd.input_grad_route()


# ---- the route choice -------------------------------------------------------------------------

@pytest.fixture
def fresh_choices():
    route_tuning.clear()
    yield
    route_tuning.clear()
    route_tuning.set_timer(None)


def test_the_faster_route_is_chosen_once_per_shape(fresh_choices):
    calls = []

    def timer(fn, route):
        calls.append(route)
        return {"columns": 2.0, "direct": 1.0}[route]

    route_tuning.set_timer(timer)
    ran = []
    routes = {"columns": lambda: ran.append("columns"), "direct": lambda: ran.append("direct")}
    kw = dict(default="columns", device=torch.device("cpu"), dtype=torch.float32)
    assert route_tuning.choose("dx", ("shape A",), routes, **kw) == "direct"
    assert route_tuning.choose("dx", ("shape A",), routes, **kw) == "direct"
    assert calls == ["columns", "direct"], "a known shape must not be timed again"
    assert ran == ["columns", "direct"], "every route runs once untimed before it is timed"
    choice = route_tuning.choices()[("dx", "shape A")]
    assert choice.times_ms == {"columns": 2.0, "direct": 1.0} and choice.skipped == {}


def test_a_route_that_fails_is_skipped_with_a_warning(fresh_choices):
    route_tuning.set_timer(lambda fn, route: 1.0)

    def broken():
        raise RuntimeError("PassManager::run failed")

    routes = {"columns": lambda: None, "direct": broken}
    with pytest.warns(RuntimeWarning, match=r"dx route 'direct' is skipped for this shape \(failed: RuntimeError"):
        route = route_tuning.choose("dx", ("shape B",), routes, default="columns", device=torch.device("cpu"),
                                    dtype=torch.float32)
    assert route == "columns"
    assert "PassManager::run failed" in route_tuning.choices()[("dx", "shape B")].skipped["direct"]


def test_a_route_whose_result_disagrees_is_not_chosen_however_fast(fresh_choices):
    """A kernel that computes something else on this card (it never ran on it before) must not
    win for being fast: each route's first result is compared with the default route's."""
    route_tuning.set_timer(lambda fn, route: {"columns": 2.0, "direct": 0.1}[route])
    ref = torch.linspace(-1, 1, 50)
    routes = {"columns": lambda: ref.clone(), "direct": lambda: ref.flip(0)}  # e.g. a transposed index
    with pytest.warns(RuntimeWarning, match="its result disagrees with the 'columns' route: largest difference"):
        route = route_tuning.choose("dx", ("shape E",), routes, default="columns", device=torch.device("cpu"),
                                    dtype=torch.float32, disagreement=route_tuning.relative_disagreement)
    assert route == "columns"
    assert set(route_tuning.choices()[("dx", "shape E")].times_ms) == {"columns"}


def test_rounding_agrees_and_garbage_does_not():
    check = route_tuning.relative_disagreement
    ref = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    assert check(ref.bfloat16(), ref.bfloat16().float().add(1e-3).bfloat16()) is None
    assert check(ref + 1e-4, ref) is None  # fp32, TF32-sized differences
    assert check(ref.double() + 1e-12, ref.double()) is None
    assert check(ref.double() + 1e-6, ref.double()) is not None  # fp64 is held to fp64's rounding
    assert check(torch.zeros_like(ref), ref) is not None
    assert check(ref.clone().index_fill_(0, torch.tensor([3]), float("nan")), ref) == "non-finite values"


def test_nothing_is_timed_or_recorded_where_timing_is_not_allowed(fresh_choices):
    """Off a GPU (and in the interpreter, or with RELAXEDCONV_AUTOTUNE=0) the default route runs."""
    def never(*a):
        raise AssertionError("a route ran during the choice")

    route = route_tuning.choose("dx", ("shape C",), {"columns": never, "direct": never}, default="columns",
                                device=torch.device("cpu"), dtype=torch.float32)
    assert route == "columns" and route_tuning.choices() == {}


def test_auto_runs_the_columns_route_where_nothing_may_be_timed(fresh_choices, monkeypatch):
    monkeypatch.delenv(relaxed_conv_bwd.INPUT_GRAD_ENV, raising=False)
    case = GEOMETRIES[1]
    g, out_hw, _, _, du_d, z_al, x_shape, hid = _operands(case, torch.float64)
    ran = []
    monkeypatch.setattr(relaxed_conv_bwd, "_input_grad", lambda *a: ran.append("columns"))
    monkeypatch.setattr(relaxed_conv_bwd, "direct_input_grad", lambda *a: ran.append("direct"))
    # fp64 never autotunes (common.use_autotune), on a GPU either
    relaxed_conv_bwd.input_grad(du_d, z_al, hid, g, x_shape, out_hw, torch.float64)
    assert ran == ["columns"] and route_tuning.choices() == {}


def test_auto_times_both_routes_and_both_give_the_same_dx(fresh_choices, monkeypatch):
    monkeypatch.delenv(relaxed_conv_bwd.INPUT_GRAD_ENV, raising=False)
    route_tuning.set_timer(lambda fn, route: {"columns": 3.0, "direct": 1.0}[route])
    g, out_hw, du, z, du_d, z_al, x_shape, hid = _operands(GEOMETRIES[3], torch.float64)
    dx = relaxed_conv_bwd.input_grad(du_d, z_al, hid, g, x_shape, out_hw, torch.float64)
    (choice,) = route_tuning.choices().values()
    assert choice.route == "direct" and set(choice.times_ms) == {"columns", "direct"} and choice.skipped == {}
    assert rel_err(dx.cpu(), reference_dx(du, z, hid, g, x_shape)) < 1e-12


def test_the_shipped_configs_keep_the_accumulator_in_registers():
    """The autotuner offers no config whose fp32 accumulator exceeds 64 values per thread (the
    sm_90a compiles spill at 256-wide tiles), and always one for a wide N_in."""
    tuner = input_grad_direct._input_grad_direct_autotuned
    for nin_block, rows in ((1, 2048), (8, 512), (32, 64)):
        kept = tuner.early_config_prune(tuner.configs, {"data": torch.empty(1, dtype=torch.bfloat16), "ROWS": rows},
                                        HMAIN=32, N_ROT=8, NIN_BLOCK=nin_block, PRECISION=None, FP64=False)
        assert kept
        for c in kept:
            acc = c.kwargs["BLOCK_M"] * nin_block * c.kwargs["QH"] * c.kwargs["QW"] / (32 * c.num_warps)
            assert acc <= input_grad_direct.MAX_ACC_PER_THREAD or len(kept) == 1


def test_deterministic_algorithms_keep_the_default_route(fresh_choices, monkeypatch):
    """``relaxedconv train --deterministic``: a run and its resumption must run the same route,
    even for a shape whose faster route was recorded before the switch."""
    monkeypatch.setattr(common, "use_autotune", lambda device, dtype: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(route_tuning, "_default_timer", lambda fn, route: {"columns": 2.0, "direct": 1.0}[route])
    kw = dict(default="columns", device=torch.device("cuda"), dtype=torch.bfloat16)
    routes = {"columns": lambda: None, "direct": lambda: None}
    assert route_tuning.may_time(torch.device("cuda"), torch.bfloat16)
    assert route_tuning.choose("dx", ("shape D",), routes, **kw) == "direct"
    old = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        assert not route_tuning.may_time(torch.device("cuda"), torch.bfloat16)
        assert route_tuning.choose("dx", ("shape D",), routes, **kw) == "columns"
    finally:
        torch.use_deterministic_algorithms(old[0], warn_only=old[1])


def test_hidden_widths_that_align_alike_are_chosen_apart(fresh_choices, monkeypatch):
    """H+1 = 17 (16 columns and a tail) and H+1 = 25 (no tail) both align Z to 32 columns."""
    monkeypatch.delenv(relaxed_conv_bwd.INPUT_GRAD_ENV, raising=False)
    timed = []
    route_tuning.set_timer(lambda fn, route: timed.append(route) or 1.0)
    monkeypatch.setattr(relaxed_conv_bwd, "_input_grad", lambda *a: torch.ones(3))
    monkeypatch.setattr(relaxed_conv_bwd, "direct_input_grad", lambda *a: torch.ones(3))
    for hid in (17, 25):
        g, out_hw, _, _, du_d, z_al, x_shape, _ = _operands((2, 1, 1, 3, 1, 1, (4, 4), hid, True), torch.float64)
        assert z_al.shape[-1] == 32
        relaxed_conv_bwd.input_grad(du_d, z_al, hid, g, x_shape, out_hw, torch.float64)
    assert len(route_tuning.choices()) == 2 and timed == ["columns", "direct"] * 2


@pytest.mark.parametrize("config", ["BLOCK_M=64,QH=4,QW=8,BLOCK_K=32", "BLOCK_M=64,QH=2,QW=2,BLOCK_K=64",
                                    "BLOCK_M=128,QH=8,QW=8,BLOCK_K=32", "BLOCK_M=64,QH=4,QW=8,BLOCK_K=16"])
def test_shipped_tiles_fp32(config, poisoned_outputs, monkeypatch):
    """The autotuner's tiles (the interpreter otherwise runs the fixed 16-row tile only)."""
    monkeypatch.setenv("RELAXEDCONV_KERNEL_CONFIG", "dx_direct:" + config)
    case = (8, 2, 2, 5, 2, 5, (7, 10), 33, True)  # 40 rows: a partial row tile; blocks cut by the border
    g, out_hw, du, z, du_d, z_al, x_shape, hid = _operands(case, torch.float32, seed=5)
    got = input_grad_direct.direct_input_grad(du_d, z_al, hid, g, x_shape, out_hw, torch.float32)
    assert not torch.isnan(got).any()
    assert rel_err(got.cpu(), reference_dx(du.float(), z.float(), hid, g, x_shape)) < 2e-6


@pytest.mark.skipif(DEVICE != "cuda", reason="times both routes with CUDA events")
def test_the_route_is_timed_on_a_gpu(fresh_choices, monkeypatch):
    """The real timer (do_bench) on the real kernels; configs pinned so nothing autotunes."""
    monkeypatch.setenv("RELAXEDCONV_AUTOTUNE", "1")
    monkeypatch.setenv("RELAXEDCONV_KERNEL_CONFIG", "v:BLOCK_M=64,BLOCK_N=32,BLOCK_K=32;fold:BLOCK_Q=64,BLOCK_C=32;"
                       "dx_direct:BLOCK_M=64,QH=4,QW=8,BLOCK_K=32")
    monkeypatch.delenv(relaxed_conv_bwd.INPUT_GRAD_ENV, raising=False)
    case = (32, 1, 1, 7, 3, 4, (16, 16), 33, True)
    g, out_hw, du, z, du_d, z_al, x_shape, hid = _operands(case, torch.bfloat16)
    dx = relaxed_conv_bwd.input_grad(du_d, z_al, hid, g, x_shape, out_hw, torch.bfloat16)
    (choice,) = route_tuning.choices().values()
    assert choice.skipped == {} and all(t > 0 for t in choice.times_ms.values())
    assert rel_err(dx.cpu(), reference_dx(du.bfloat16(), z.bfloat16(), hid, g, x_shape)) < 1.5e-2


def test_halo_rows_wider_than_sixteen_positions_fp64(poisoned_outputs, monkeypatch):
    """The tail steps reduce over one halo row, QW + K - 1 positions padded to a power of two:
    32 here (8-pixel-wide blocks, K = 11), the blocks cut by the border on both sides."""
    monkeypatch.setenv("RELAXEDCONV_KERNEL_CONFIG", "dx_direct:BLOCK_M=16,QH=2,QW=8,BLOCK_K=16")
    case = (2, 1, 1, 11, 5, 1, (5, 13), 17, True)
    g, out_hw, du, z, du_d, z_al, x_shape, hid = _operands(case, torch.float64, seed=3)
    got = input_grad_direct.direct_input_grad(du_d, z_al, hid, g, x_shape, out_hw, torch.float64)
    assert not torch.isnan(got).any()
    assert rel_err(got.cpu(), reference_dx(du, z, hid, g, x_shape)) < 1e-12
