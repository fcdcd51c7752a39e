"""The kernels' FLOP/byte model: consistent with the benchmark's operation counts and with the
kernels' own configs, and printable for every benchmark case (it is quoted in bench/README.md)."""
import pytest
import torch

from relaxedconv.benchmark import flops
from relaxedconv.benchmark.cases import CASES
from relaxedconv.kernels import cost_model


@pytest.mark.parametrize("name", sorted(CASES))
def test_executed_work_covers_the_factored_operation_count(name):
    case = CASES[name]
    s = cost_model.shape_of_case(case)
    card = cost_model.CARDS["H100"]
    st = {x.name.split(":")[0].split(" [")[0]: x for x in cost_model.steps(s, card)["fwd"]}
    useful = flops.case_macs(case)["factored"]
    executed = st["u"].macs + st["Y = W U^T (cuBLAS)"].macs
    # Padding only adds work, and never more than the 16-wide tail tile and power-of-two tiles can.
    assert useful <= executed <= 4 * useful
    # The W_ext product is exact (cuBLAS, no tiles of ours).
    hp = case.hidden + 1
    assert st["Y = W U^T (cuBLAS)"].macs == case.batch * case.positions * case.group_order * case.in_channels * hp * case.out_channels


def test_per_position_z_and_column_buffer_scale_with_positions():
    t2 = cost_model.shape_of_case(CASES["T2"])
    big = cost_model.shape_of_case(CASES["T2-b64-32px"])
    card = cost_model.CARDS["H100"]
    a, b = cost_model.predict(t2, card), cost_model.predict(big, card)
    # 4x the batch and 4x the positions: roughly 16x the time, never less than 8x.
    assert b["fwdbwd_ms"] > 8 * a["fwdbwd_ms"]


def test_the_model_prints_every_case(capsys):
    assert cost_model.main(["--summary", "--cases", ",".join(sorted(CASES))]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in CASES)
    assert cost_model.main(["--cases", "T1"]) == 0
    assert "| T1 | bwd | fold" in capsys.readouterr().out


@pytest.mark.parametrize("cases", ["T9", ",", ""])
def test_an_unknown_case_is_a_usage_error(cases):
    with pytest.raises(SystemExit) as e:
        cost_model.main(["--cases", cases])
    assert e.value.code == 2


@pytest.mark.parametrize("cases", ["T1,T9", ""])
def test_step_bench_checks_its_cases_before_it_asks_for_a_gpu(cases, capsys):
    """A typo in device_check.sh's step_bench line shows on a CPU run of the same line, not only
    on the GPU."""
    from relaxedconv.kernels import step_bench

    with pytest.raises(SystemExit) as e:
        step_bench.main(["--cases", cases])
    assert e.value.code == 2 and "unknown case(s)" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-GPU message")
def test_step_bench_without_a_gpu_says_so_in_one_line(capsys):
    from relaxedconv.kernels import step_bench

    assert step_bench.main(["--cases", "T1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "no CUDA device" in err and len(err.splitlines()) == 1


def test_step_bench_refuses_a_result_path_it_cannot_write_before_measuring(tmp_path, monkeypatch, capsys):
    from relaxedconv.kernels import common, step_bench

    if not common.interpreting():
        pytest.skip("checked through --cpu-smoke, which needs the Triton interpreter")

    def never(*a, **k):
        raise AssertionError("measured although the result could not be saved")

    monkeypatch.setattr(step_bench, "measure", never)
    with pytest.raises(SystemExit) as e:
        step_bench.main(["--cpu-smoke", "--json", str(tmp_path)])  # a directory
    assert e.value.code == 2 and "cannot write" in capsys.readouterr().err


def test_step_bench_runs_every_step_and_compares_with_the_model(tmp_path, capsys):
    from relaxedconv.kernels import common, step_bench

    if not common.interpreting():
        pytest.skip("the CPU smoke run needs the Triton interpreter (a GPU run is the real use)")
    out = tmp_path / "steps.json"
    assert step_bench.main(["--cpu-smoke", "--json", str(out)]) == 0
    import json

    def no_nan(name):
        raise AssertionError(f"{name} in the JSON: not standard JSON, other readers refuse it")

    rows = json.loads(out.read_text(), parse_constant=no_nan)["rows"]
    steps = {r["step"] for r in rows}
    assert {"u", "dz", "v + fold", "dx direct", "forward (whole)", "backward (whole, U given)",
            "kernel net forward (fused, tf32 products)", "kernel net backward (fused, tf32x3 products)"} <= steps
    assert all(r["measured_us"] > 0 for r in rows)
    # every step has a prediction but the PyTorch kernel net's, which is the comparison, not a model
    unpredicted = {r["step"] for r in rows if not r["predicted_us"]}
    assert "kernel net fwd+bwd (PyTorch operators)" in unpredicted
    assert unpredicted <= {"kernel net fwd+bwd (PyTorch operators)",
                           "kernel net fwd+bwd (PyTorch operators, angle-addition split)"}


@pytest.mark.parametrize("name", ["G1", "G4"])
def test_stationary_backward_through_the_bank_costs_the_direct_convolutions_gradients(name):
    """The default stationary backward (relaxed_conv_bwd.bank_backward) is cuDNN's data and weight
    gradient at the direct operation count, plus GEMMs of the bank's size; per-position layers keep
    the Triton steps."""
    case = CASES[name]
    s = cost_model.shape_of_case(case)
    card = cost_model.CARDS["H100"]
    bank = {x.name: x for x in cost_model.steps(s, card)["bwd"]}
    fused = cost_model.steps(s, card, stationary_backward="fused")["bwd"]
    direct = flops.case_macs(case)["direct"]
    assert bank["dX = conv2d data gradient (cuDNN)"].macs == bank["dK = conv2d weight gradient (cuDNN)"].macs == direct
    assert all(x.engine != "triton" for x in bank.values())
    assert any(x.engine == "triton" for x in fused)
    t2 = cost_model.shape_of_case(CASES["T2"])
    assert cost_model.steps(t2, card)["bwd"] == cost_model.steps(t2, card, stationary_backward="fused")["bwd"]


def test_kernel_net_model_counts_every_value_of_z_and_is_issue_bound():
    card = cost_model.CARDS["H200"]
    t2, big = (cost_model.shape_of_case(CASES[c]) for c in ("T2", "T2-b64-32px"))
    steps = cost_model.kernel_net_steps(t2)
    values = t2.out_rotations * t2.positions * t2.window * t2.hidden
    # a bf16 layer (the benchmark shapes) runs one TF32 pass
    fwd_i, bwd_i = cost_model.KERNEL_NET_INSTRUCTIONS["tf32"]
    assert steps["fwd"][0].instructions == values * fwd_i / 32 and steps["bwd"][0].instructions == values * bwd_i / 32
    # z written forward and read backward, fp32 and H+1 wide
    assert steps["fwd"][0].dram_bytes == 4 * t2.out_rotations * t2.positions * t2.window * (t2.hidden + 1)
    assert cost_model.bound(steps["bwd"][0], card) == "issue"
    # fewer instructions per value: first kernels > TF32x3 > one TF32 pass, in both passes
    times = {v: {p: cost_model.step_time(x[0], card) for p, x in cost_model.kernel_net_steps(t2, v).items()}
             for v in ("first", "tf32x3", "tf32")}
    for p in ("fwd", "bwd"):
        assert times["first"][p] > times["tf32x3"][p] > times["tf32"][p]
    # 4x the positions (the batch does not enter): 4x the work
    assert cost_model.kernel_net_steps(big)["bwd"][0].instructions == 4 * steps["bwd"][0].instructions


def _positions_reaching(s, qy0, qx0, qh, qw):
    """Brute force: output positions whose K x K window ('same' padding) covers a pixel of the block."""
    k, pad, n = s.kernel_size, s.kernel_size // 2, s.size
    return sum(1 for py in range(n) for px in range(n)
               if any(0 <= qy + pad - py < k and 0 <= qx + pad - px < k
                      for qy in range(qy0, min(qy0 + qh, n)) for qx in range(qx0, min(qx0 + qw, n))))


@pytest.mark.parametrize("qh, qw", [(4, 8), (2, 4), (8, 8)])
def test_direct_dx_halos_are_the_positions_reaching_each_pixel_block(qh, qw):
    s = cost_model.shape_of_case(CASES["T2"])  # 16 x 16, K = 7: blocks cut by the border too
    expected = [_positions_reaching(s, y, x, qh, qw) for y in range(0, s.size, qh) for x in range(0, s.size, qw)]
    assert cost_model._halos(s, qh, qw) == expected


@pytest.mark.parametrize("name", ["T1", "T2", "T2-b64-32px"])
def test_direct_dx_executes_at_least_the_useful_work_and_needs_no_column_buffer(name):
    s = cost_model.shape_of_case(CASES[name])
    card = cost_model.CARDS["H100"]
    (direct,) = cost_model.input_grad_steps(s, card)["direct"]
    k, pad, n = s.kernel_size, s.kernel_size // 2, s.size
    per_axis = sum(1 for p in range(n) for kk in range(k) if 0 <= p + kk - pad < n)  # (position, offset) pairs
    useful = s.batch * s.in_channels * s.in_rotations * per_axis**2 * s.out_rotations * s.hidden
    # the banded B's zeros cost at most (QH + K - 1)(QW + K - 1) / K^2 < 4 times the useful work here
    assert useful <= direct.macs <= 4 * useful * (1 + 1 / s.hidden)
    peak = {r: cost_model.predict(s, card, input_grad=r)["peak_mib"] for r in ("columns", "direct")}
    v_mib = min(2 * s.batch * s.positions * s.kernel_size**2 * s.in_channels * s.in_rotations, 256 * 2**20) / 2**20
    assert peak["columns"] - peak["direct"] == pytest.approx(v_mib)
