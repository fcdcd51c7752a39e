"""The benchmark runner (relaxedconv bench) on CPU: FLOP formulas, the JSON it writes, how it
reports backends that cannot run. Tiny shapes only; the timings themselves are not checked."""
import itertools
import json
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from relaxedconv import dispatch
from relaxedconv.benchmark import cases as cases_mod
from relaxedconv.benchmark import flops, report, runner
from relaxedconv.benchmark.layer_bench import NO_GPU

TINY = cases_mod.Case("tiny", group_order=2, in_channels=2, out_channels=3, size=5, batch=2, kernel_size=3, hidden=4)


def _hand_count(c):
    """Count multiply-adds by enumerating the sums of design.md §2 term by term."""
    k2, positions, hp = c.kernel_size**2, c.positions, c.hidden + 1
    direct = factored = 0
    for _b, _p, _n in itertools.product(range(c.batch), range(positions), range(c.group_order)):
        # direct: y[o] = sum_{i, n', Delta} k[o, i, n', Delta] x[i, n', p + Delta]
        for _o, _i, _m, _d in itertools.product(range(c.out_channels), range(c.in_channels), range(c.in_rotations), range(k2)):
            direct += 1
        # factored: U[i, h] = sum_{n', Delta} z[n', Delta, h] x[i, n', p + Delta]; y[o] = sum_{i, h} W[o, i, h] U[i, h]
        for _i, _h in itertools.product(range(c.in_channels), range(hp)):
            factored += c.in_rotations * k2
        factored += c.in_channels * hp * c.out_channels
    return direct, factored


@pytest.mark.parametrize("lifting", [False, True])
def test_flop_formulas_match_a_hand_count(lifting):
    c = cases_mod.Case("tiny", 2, 2, 3, 5, 2, kernel_size=3, hidden=4, lifting=lifting)
    macs = flops.case_macs(c)
    direct, factored = _hand_count(c)
    assert macs == {"direct": direct, "factored": factored}
    # design.md §2: factored / direct = H'/C_out + H'/(N_in K^2)
    ratio = (c.hidden + 1) / c.out_channels + (c.hidden + 1) / (c.in_rotations * c.kernel_size**2)
    assert macs["factored"] / macs["direct"] == pytest.approx(ratio)


def test_direct_flops_equal_torch_count_of_the_expanded_conv2d():
    c = TINY
    x = torch.randn(c.batch, c.in_channels * c.in_rotations, c.size, c.size)
    w = torch.randn(cases_mod.expanded_weight_shape(c))
    with FlopCounterMode(display=False) as counter:
        F.conv2d(x, w, padding=c.padding)
    assert counter.get_total_flops() == flops.pass_flops(flops.case_macs(c)["direct"], "fwd")


def test_tflops_of_passes():
    assert flops.tflops(10**12, "fwd", 1000.0) == pytest.approx(2.0)
    assert flops.tflops(10**12, "bwd", 1000.0) == pytest.approx(4.0)
    assert flops.tflops(10**12, "fwdbwd", 1000.0) == pytest.approx(6.0)
    assert flops.tflops(10**12, "fwd", None) is None


def _tiny_cases(monkeypatch):
    tiny = {
        "G1": cases_mod.Case("G1", 2, 2, 3, 6, 2, kernel_size=3, hidden=4),
        "T1": cases_mod.Case("T1", 1, 2, 2, 6, 2, kernel_size=3, hidden=4, translation_nonstationary=True),
    }
    monkeypatch.setattr(cases_mod, "CASES", tiny)
    monkeypatch.setattr(cases_mod, "QUICK", ("G1", "T1"))


REQUIRED_META = ("date", "device", "card", "torch", "triton", "commit", "source_hash", "python", "cpu_threads")


def test_quick_run_writes_json_with_metadata_and_marks_backends(tmp_path, monkeypatch, capsys):
    _tiny_cases(monkeypatch)
    monkeypatch.setattr(dispatch, "_policy_override", None)
    out = tmp_path / "bench.json"
    argv = ["--quick", "--device", "cpu", "--scale", "full", "--json", str(out),
            "--e2e-variants", "t2,se2", "--e2e-batch", "2", "--e2e-size", "28", "--e2e-widths", "2,4",
            "--e2e-group-order", "2"]
    assert runner.main(argv) == 0
    printed = capsys.readouterr().out
    assert NO_GPU in printed
    assert report.TFLOPS_LEGEND in printed and report.AUTO_LEGEND in printed  # the columns and ratio explained
    assert re.search(r"G1 +fp32 +auto / (expand_conv|materialize|factored_torch) interleaved: ", printed)
    data = json.loads(out.read_text())
    assert data["schema"] == report.SCHEMA
    for key in REQUIRED_META:
        assert key in data["meta"], key
    assert data["meta"]["device"] == "cpu" and data["meta"]["date"]
    assert data["args"]["quick"] is True and data["command"].startswith("relaxedconv bench --quick")
    rows = {(r["case"], r["backend"]): r for r in data["layers"]}
    assert {c for c, _ in rows} == {"G1", "T1"}
    # the fused kernel is not timed without a GPU, and says so
    for case in ("G1", "T1"):
        assert rows[case, "triton"]["status"] == "not timed"
        assert rows[case, "triton"]["reason"] == NO_GPU
    # expand_conv cannot express translation non-stationarity: n/a, not an error
    assert rows["T1", "expand_conv"]["status"] == "n/a"
    assert rows["G1", "expand_conv"]["status"] == "ok"
    for backend in ("materialize", "factored_torch", "auto", "conv2d"):
        for case in ("G1", "T1"):
            r = rows[case, backend]
            assert r["status"] == "ok", r
            assert r["fwd_ms"] > 0 and r["fwdbwd_ms"] > 0 and r["bwd_ms"] >= 0
            assert r["peak_mib"] is None  # no allocator counter on CPU
            assert r["tflops"]["factored"]["fwd"] > 0
    assert rows["T1", "auto"]["auto_choice"] == "factored_torch"
    assert rows["G1", "auto"]["auto_choice"] == "expand_conv"
    inter = rows["G1", "auto"]["auto_vs_best"]
    assert inter["backend"] == "auto" and inter["ratio"] > 0 and inter["rounds"] >= 5
    assert inter["pair_p20_p80"][0] <= inter["pair_p20_p80"][1]
    assert data["cases"]["G1"]["macs_fwd"] == flops.case_macs(cases_mod.CASES["G1"])
    assert any(t["status"] == "not measured" for t in data["targets"])
    assert data["routes"] == []  # nothing may be timed off a GPU: no route was chosen by timing
    e2e = {(r["variant"], r["backend"]): r for r in data["e2e"]}
    assert e2e["t2", "auto"]["status"] == "ok" and e2e["t2", "auto"]["images_per_s"] > 0
    # which backend each layer ran (static rule on CPU: every layer of T(2) is stationary)
    assert set(e2e["t2", "auto"]["backends"].values()) == {"expand_conv"}
    assert "expand_conv x" in printed
    assert e2e["se2", "triton"]["status"] == "not timed"
    # the plain-conv floor (issue 13) and every row's ratio to it, training step and inference
    floor, auto = e2e["t2", "conv2d"], e2e["t2", "auto"]
    assert floor["status"] == "ok" and floor["x_floor"] == 1.0 and floor["backends"] is None
    assert auto["x_floor"] == pytest.approx(auto["step_ms"] / floor["step_ms"])
    assert auto["infer_ms"] > 0 and auto["infer_x_floor"] == pytest.approx(auto["infer_ms"] / floor["infer_ms"])
    # each call's host part is within its total (so are the medians); on a CPU the host does the work
    assert 0.5 * auto["step_ms"] <= auto["step_host_ms"] <= auto["step_ms"]
    assert report.E2E_LEGEND in printed


def test_time_budget_skips_and_cli_dispatch(tmp_path, monkeypatch, capsys):
    _tiny_cases(monkeypatch)
    from relaxedconv import cli

    out = tmp_path / "b.json"
    assert cli.main(["bench", "--quick", "--device", "cpu", "--suite", "layers", "--time-budget", "0",
                     "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["layers"] and all(r["status"] == "skipped" for r in data["layers"])
    assert data["e2e"] == []
    assert "skipped" in capsys.readouterr().out


def test_cpu_scaling_keeps_the_method_ratios():
    for case in cases_mod.CASES.values():
        s = cases_mod.cpu_scaled(case)
        assert (s.group_order, s.kernel_size, s.hidden) == (case.group_order, case.kernel_size, case.hidden)
        assert s.batch <= case.batch and s.size <= case.size and "scaled down" in s.note
    assert cases_mod.select(["T2-b64-32px", "G1"], scale="full")[0].name == "G1"  # priority order


def _row(case, backend, fb, fwd=None, peak=None, tf=None, dtype="bf16", status="ok", choice="expand_conv", inter=None):
    return {"case": case, "dtype": dtype, "backend": backend, "status": status, "fwdbwd_ms": fb,
            "fwd_ms": fwd or (fb and fb / 3), "peak_mib": peak, "auto_choice": choice if backend == "auto" else None,
            "auto_vs_best": inter, "tflops": {"factored": {"fwd": tf}}}


def test_targets_pass_and_fail():
    row = _row
    rows = [
        row("T1", "triton", 1.0, peak=10.0), row("T1", "materialize", 30.0, peak=200.0),
        row("T2", "triton", None, status="not timed"),
        row("G4", "triton", 2.0), row("G4", "expand_conv", 1.0),
        row("G1", "expand_conv", 1.0), row("G1", "materialize", 3.0), row("G1", "auto", 1.02),
        row("G3", "triton", 5.0, tf=250.0),
    ]
    got = {t["target"]: t["status"] for t in report.targets(rows)}
    assert got["T1 bf16: triton f+b speedup over materialize"] == "pass"
    assert got["T1 bf16: triton / materialize peak memory"] == "pass"
    assert got["T2 bf16: triton f+b speedup over materialize"] == "not measured"  # run, but triton not timed
    assert got["G4 bf16: triton / expand_conv time"] == "fail"
    assert got["G1 bf16: auto / best backend"] == "pass"
    assert got["G3 bf16: triton forward TFLOP/s (factored)"] == "pass"


def test_targets_only_for_cases_the_run_tried():
    """Issue 12 item 10: no 'not measured' rows for cases (G2, G3, T2 ...) that --quick never runs."""
    rows = [_row("G1", "expand_conv", 1.0), _row("G1", "auto", 1.0), _row("T1", "factored_torch", 2.0)]
    names = [t["target"] for t in report.targets(rows)]
    assert not any(n.startswith(("G2", "G3", "G4", "T2")) for n in names), names
    assert "G1 bf16: auto / best backend" in names and "T1 bf16: auto / best backend" in names  # every case tried


def test_auto_over_best_is_noise_aware():
    """Issue 12 item 10: auto ran the best backend itself, or the interleaved rounds overlap 1:
    a ratio beyond 5% is noise, not a failure; a real loss still fails."""
    def verdict(auto_choice, inter, auto_ms=1.3):
        rows = [_row("G1", "expand_conv", 1.0), _row("G1", "materialize", 3.0),
                _row("G1", "auto", auto_ms, choice=auto_choice, inter=inter)]
        (t,) = [t for t in report.targets(rows) if t["target"] == "G1 bf16: auto / best backend"]
        return t

    same = verdict("expand_conv", None)
    assert same["status"] == "within noise" and "timing noise" in same["detail"]
    overlap = verdict("materialize", {"against": "expand_conv", "ratio": 1.2, "pair_p20_p80": [0.9, 1.4], "rounds": 7})
    assert overlap["status"] == "within noise" and overlap["value"] == 1.2 and "interleaved" in overlap["detail"]
    loses = verdict("materialize", {"against": "expand_conv", "ratio": 2.9, "pair_p20_p80": [2.7, 3.1], "rounds": 7})
    assert loses["status"] == "fail"
    wins = verdict("materialize", {"against": "expand_conv", "ratio": 1.01, "pair_p20_p80": [0.97, 1.05], "rounds": 7})
    assert wins["status"] == "pass"


def test_plain_conv_floor_is_the_same_network_without_kernel_nets():
    from relaxedconv.benchmark.floor import plain_conv_floor
    from relaxedconv.layers import _RelaxedGroupConv
    from relaxedconv.models import build_model

    model = build_model("se2_rot", group_order=4, widths=(2, 4), kernel_size=3, hidden_channels=4)
    floor = plain_conv_floor(model)
    relaxed = {n: m for n, m in model.named_modules() if isinstance(m, _RelaxedGroupConv)}
    assert relaxed and not any(isinstance(m, _RelaxedGroupConv) for m in floor.modules())
    assert not any("kernel_net" in n for n, _ in floor.named_parameters())
    for name, layer in relaxed.items():
        conv = floor.get_submodule(name)
        g = layer.geometry
        assert isinstance(conv, torch.nn.Conv2d)
        assert conv.weight.shape == (g.out_channels * g.out_rotations, g.in_channels * g.in_rotations, g.kernel_size, g.kernel_size)
        assert conv.padding == (g.padding, g.padding) and (conv.bias is None) == (layer.bias is None)
    # everything else is the model itself
    others = lambda m: [(n, type(s)) for n, s in m.named_modules() if not isinstance(s, (torch.nn.Conv2d, _RelaxedGroupConv))
                        and not n.startswith(tuple(relaxed))]  # noqa: E731
    assert others(floor) == others(model)
    x = torch.randn(2, 3, 16, 16)
    assert floor(x).shape == model(x).shape


def test_module_entry_point_help():
    res = subprocess.run([sys.executable, "-m", "relaxedconv.benchmark", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0 and "--quick" in res.stdout


def test_row_deadline_interrupts_a_slow_measurement_and_restores_the_timer():
    import signal
    import time

    from relaxedconv.benchmark.deadline import RowTimeout, row_deadline

    before = signal.getsignal(signal.SIGALRM)
    t0 = time.perf_counter()
    with pytest.raises(RowTimeout, match="0.05 s time limit"):
        with row_deadline(0.05):
            while True:  # a step that never ends
                sum(range(1000))
    assert time.perf_counter() - t0 < 5
    assert signal.getsignal(signal.SIGALRM) is before and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    with row_deadline(None):  # no limit: nothing fires
        time.sleep(0.01)


def test_an_e2e_row_past_its_time_limit_is_recorded_and_the_run_goes_on():
    from relaxedconv.benchmark import e2e

    cfg = e2e.cpu_config(quick=True)
    cfg.row_time_limit_s = 0.01  # building the model alone takes longer
    row = e2e.measure_step("t2", "expand_conv", torch.device("cpu"), cfg)
    assert row["status"] == "timeout" and "time limit" in row["reason"]
    cfg.row_time_limit_s = None
    assert e2e.measure_step("t2", "expand_conv", torch.device("cpu"), cfg)["status"] == "ok"


def test_layer_rows_under_torch_compile(tmp_path, monkeypatch, capsys):
    """--layer-compile: every row's callable goes through torch.compile with the mode asked for (here
    Dynamo + AOTAutograd without code generation: Inductor's C++ compile takes minutes on 2 cores),
    its compilation outside the timed calls, and the row and table say it was compiled."""
    from relaxedconv.benchmark import layer_bench

    _tiny_cases(monkeypatch)
    monkeypatch.setattr(dispatch, "_policy_override", None)
    monkeypatch.setattr(layer_bench, "COMPILE_BACKEND", "aot_eager")
    modes = []
    real_compile = torch.compile

    def spy(fn, mode=None, backend="inductor", **kw):
        modes.append((mode, backend))
        return real_compile(fn, mode=mode, backend=backend, **kw)

    monkeypatch.setattr(torch, "compile", spy)
    out = tmp_path / "c.json"
    argv = ["--suite", "layers", "--device", "cpu", "--scale", "full", "--cases", "T1", "--dtypes", "fp32",
            "--backends", "factored_torch,materialize,conv2d", "--layer-compile", "default", "--json", str(out)]
    assert runner.main(argv) == 0
    rows = json.loads(out.read_text())["layers"]
    assert [r["backend"] for r in rows] == ["factored_torch", "materialize", "conv2d"]
    for r in rows:
        assert r["status"] == "ok" and r["compile"] == "default" and r["fwdbwd_ms"] > 0, r
    assert modes == [(None, "aot_eager")] * 3
    assert "compiled (default)" in capsys.readouterr().out
    with pytest.raises(ValueError, match="unknown compile mode"):
        layer_bench.compiled(lambda: None, "fast")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("backend", ["conv2d", "triton"])
def test_layer_rows_under_cuda_graphs_cuda(backend):
    """reduce-overhead rows run: the warm-up replays must not add into gradients that an earlier
    replay overwrote ("accessing tensor output of CUDAGraphs that has been overwritten")."""
    from relaxedconv.benchmark import layer_bench
    from relaxedconv.benchmark.timing import TimingConfig

    case = cases_mod.Case("tiny", 1, 4, 4, 8, 2, kernel_size=3, hidden=4, translation_nonstationary=True)
    device = torch.device("cuda")
    layer = cases_mod.build_layer(case, device)
    row = layer_bench.measure(case, layer, "bf16", backend, device, TimingConfig(warmup_ms=5, rep_ms=10),
                              "reduce-overhead")
    assert row["status"] == "ok" and row["compile"] == "reduce-overhead", row


def test_metadata_records_the_switches_that_change_what_is_measured(monkeypatch):
    from relaxedconv.benchmark import environment

    monkeypatch.setenv("RELAXEDCONV_FUSED_KERNEL_NET", "1")
    monkeypatch.setenv("RELAXEDCONV_KERNEL_CONFIG", "u:num_warps=4")
    monkeypatch.setenv("RELAXEDCONV_COMMIT", "abc123")
    meta = environment.collect(torch.device("cpu"))
    assert meta["env"]["RELAXEDCONV_FUSED_KERNEL_NET"] == "1"
    assert meta["env"]["RELAXEDCONV_KERNEL_CONFIG"] == "u:num_warps=4"
    assert "RELAXEDCONV_COMMIT" not in meta["env"] and meta["commit"] == "abc123"
    monkeypatch.delenv("RELAXEDCONV_FUSED_KERNEL_NET")
    assert "RELAXEDCONV_FUSED_KERNEL_NET" not in environment.collect(torch.device("cpu"))["env"]


def _never(why):
    """A stand-in for a measurement that the test's bad input must prevent."""
    def never(*a, **k):
        raise AssertionError(f"measured {why}")
    return never


def _fake_split(case, backend, device, dtype):
    """time_split.split_case's row, without the profiler."""
    part = {"wall_ms": 1.0, "device_ms": None, "aten_ops": 3}
    return {"case": case.name, "backend": backend, "dtype": "float32", "whole": part, "kernel_net": part,
            "conv": part, "top": ""}


@pytest.mark.parametrize("argv, says", [
    (["--dtypes", "bf61"], "unknown dtype 'bf61'"),
    (["--dtypes", ","], "--dtypes is empty"),
    (["--cases", ""], "--cases is empty"),
    (["--cases", "T9"], "unknown case 'T9'"),
    (["--backends", "tritn"], "unknown backend(s) tritn in --backends"),
    (["--suite", "e2e", "--e2e-variants", "se2,se2_rott"], "unknown model variant(s) se2_rott"),
    (["--suite", "e2e", "--e2e-backends", "conv2d,expand"], "unknown backend(s) expand in --e2e-backends"),
    (["--e2e-backends", ""], "(none given) in --e2e-backends"),
    (["--suite", "e2e", "--e2e-widths", "0,8"], "--e2e-widths must be positive"),
    (["--suite", "e2e", "--e2e-batch", "0"], "--e2e-batch must be at least 1"),
    (["--suite", "e2e", "--e2e-size", "16"], "--e2e-size 16 is smaller than the e2e model takes (28 = kernel size 7"),
    (["--threads", "-1"], "--threads must be at least 1"),
    (["--rep-ms", "0"], "--rep-ms must be above 0"),
    (["--warmup-ms", "-5"], "--warmup-ms must be above 0"),
    (["--row-time-limit", "-1"], "--row-time-limit must be at least 0"),
])
def test_a_bad_option_is_one_line_and_exit_2_before_anything_is_measured(argv, says, monkeypatch, capsys):
    """A typo in a GPU session's command line must stop it at once with a clear line, not raise a
    traceback (--dtypes), nor run silently into error rows after the layer suite's minutes (e2e)."""
    never = _never("despite a bad option")
    monkeypatch.setattr(runner, "measure", never)
    monkeypatch.setattr(runner.e2e_mod, "measure_step", never)
    with pytest.raises(SystemExit) as exc:
        runner.main([*argv, "--device", "cpu", "--json", ""])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert says in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_a_result_path_that_cannot_be_written_fails_before_the_first_measurement(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(runner, "measure", _never("although the result could not be saved"))
    (tmp_path / "file").write_text("")
    for path in (tmp_path, tmp_path / "file" / "run.json"):  # a directory; under a file
        with pytest.raises(SystemExit) as exc:
            runner.main(["--device", "cpu", "--suite", "layers", "--cases", "G1", "--json", str(path)])
        err = capsys.readouterr().err.strip()
        assert exc.value.code == 2 and "cannot write the result file" in err and len(err.splitlines()) == 1
    assert not list(tmp_path.parent.glob(f"{tmp_path.name}.tmp"))  # no temporary file left beside the directory


def test_e2e_widths_must_be_integers(capsys):
    with pytest.raises(SystemExit) as exc:
        runner.build_parser().parse_args(["--e2e-widths", "a,b"])
    assert exc.value.code == 2 and "comma-separated integers" in capsys.readouterr().err
    assert runner.build_parser().parse_args(["--e2e-widths", "8,16"]).e2e_widths == [8, 16]
    assert runner.build_parser().parse_args(["--e2e-widths", "8,8"]).e2e_widths == [8, 8]
    assert runner.build_parser().parse_args(["--cases", "G1,T1,G1", "--backends", "auto,auto"]).cases == ["G1", "T1"]


def test_summarize_reads_result_files_and_refuses_others(tmp_path, capsys):
    good = tmp_path / "run.json"
    report.write_json(good, {"schema": report.SCHEMA, "meta": {"card": "cpu", "torch": "t", "triton": "t", "date": "d",
                                                               "commit": "c"},
                             "command": "relaxedconv bench", "settings": {}, "layers": [], "e2e": [], "targets": []})
    assert runner.main(["--summarize", str(good)]) == 0
    other = tmp_path / "time_split.json"
    other.write_text(json.dumps({"device": "cpu", "rows": []}))
    for path, says in ((tmp_path / "missing.json", "cannot read"), (other, "not a relaxedconv bench result")):
        with pytest.raises(SystemExit) as exc:
            runner.main(["--summarize", str(path)])
        err = capsys.readouterr().err.strip()
        assert exc.value.code == 2 and says in err and len(err.splitlines()) == 1


def test_list_names_every_case_variant_and_backend(capsys):
    """time_split's and launch_trace's --help point at `relaxedconv bench --list` for the case names."""
    from relaxedconv.models import VARIANTS

    assert runner.main(["--list"]) == 0
    out = capsys.readouterr().out
    for name in [*cases_mod.CASES, *VARIANTS, *runner.BENCH_BACKENDS]:
        assert re.search(rf"(^|[\s,]){re.escape(name)}($|[\s,])", out, re.M), name


def test_an_e2e_run_cut_short_keeps_the_floor_ratios_of_what_it_measured(tmp_path, monkeypatch):
    """device_check.sh ends a step past its limit with SIGINT; the rows saved by then must carry
    x_floor (computed at the end only, they had none)."""
    from relaxedconv.benchmark import e2e

    def fake(variant, backend, device, cfg):
        if backend == "expand_conv":
            raise KeyboardInterrupt  # the step's timeout
        row = e2e.base_row(variant, backend, cfg)
        ms = {"conv2d": 2.0, "auto": 3.0}[backend]
        row.update(status="ok", step_ms=ms, infer_ms=ms / 2, images_per_s=cfg.batch / ms * 1e3)
        return row

    monkeypatch.setattr(runner.e2e_mod, "measure_step", fake)
    out = tmp_path / "e2e.json"
    with pytest.raises(KeyboardInterrupt):
        runner.main(["--suite", "e2e", "--device", "cpu", "--e2e-variants", "t2",
                     "--e2e-backends", "conv2d,auto,expand_conv", "--json", str(out)])
    rows = {r["backend"]: r for r in json.loads(out.read_text())["e2e"]}
    assert set(rows) == {"conv2d", "auto"}
    assert rows["auto"]["x_floor"] == pytest.approx(1.5) and rows["auto"]["infer_x_floor"] == pytest.approx(1.5)


@pytest.mark.parametrize("module, argv, says", [
    ("auto_cost", ["--cases", "G1,T9"], "unknown case 'T9'"),
    ("auto_cost", ["--cases", ","], "--cases is empty"),
    ("opcount", ["--variants", "t2,se3"], "unknown variant(s) se3"),
    ("opcount", ["--backends", "expand"], "unknown backend(s) expand"),
    ("time_split", ["--backends", "tritn"], "unknown backend(s) ['tritn']"),
    ("time_split", ["--cases", ""], "unknown case(s) (none given)"),
])
def test_helper_commands_refuse_a_bad_name_before_running(module, argv, says, capsys):
    import importlib

    main = importlib.import_module(f"relaxedconv.benchmark.{module}").main
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2 and says in capsys.readouterr().err


def test_time_split_keeps_the_rows_of_a_run_cut_short(tmp_path, monkeypatch):
    from relaxedconv.benchmark import time_split

    def fake(case, backend, device, dtype):
        if case.name == "T2":
            raise KeyboardInterrupt  # device_check.sh's timeout
        return _fake_split(case, backend, device, dtype)

    monkeypatch.setattr(time_split, "split_case", fake)
    monkeypatch.setattr(time_split, "small_op_host_us", lambda device: 1.0)
    out = tmp_path / "split.json"
    with pytest.raises(KeyboardInterrupt):
        time_split.main(["--cases", "T1,T2", "--backends", "factored_torch", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [(r["case"], r["backend"]) for r in rows] == [("T1", "factored_torch")] and "top" not in rows[0]


def _bench_script(name):
    from _bench_scripts import load_bench_script

    return load_bench_script(name)


@pytest.mark.parametrize("script, argv, says", [
    ("layer_passes", ["T1", "T9"], "unknown case(s) T9"),
    ("knet_traffic", ["T9"], "unknown case(s) T9"),
    ("layer_host_time", ["--calls", "0"], "--calls must be at least 1"),
])
def test_bench_scripts_refuse_bad_arguments_in_one_line(script, argv, says, capsys):
    with pytest.raises(SystemExit) as exc:
        _bench_script(script).main(argv)
    assert exc.value.code == 2 and says in capsys.readouterr().err


def test_knet_opcount_script_refuses_an_unknown_case():
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "bench" / "knet_opcount.py"
    res = subprocess.run([sys.executable, str(script), "T9"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "unknown case(s) T9" in res.stderr and "Traceback" not in res.stderr


# ---- bench/device_check.sh: run on a GPU machine with minutes to spare, so a wrong option, an
# unknown case or a summary that cannot read its JSON must show here, on a CPU, first.
def _device_check():
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "device_check.sh"
    return path, re.sub(r"\\\n\s*", " ", path.read_text())  # continuation lines joined


def _device_check_commands(out_dir) -> list[tuple[str, list[str]]]:
    """(step name, argv after "$PY") of every run_step, with $OUT replaced."""
    import shlex

    _, text = _device_check()
    found = []
    for line in text.splitlines():
        m = re.search(r'\brun_step (\w+) \d+ "\$PY" (.*)$', line)
        if m:
            found.append((m.group(1), shlex.split(m.group(2).replace("$OUT", str(out_dir)))))
    return found


def test_device_check_steps_are_the_ones_it_knows():
    _, text = _device_check()
    all_steps = re.search(r'^ALL_STEPS="([^"]+)"', text, re.M).group(1).split()
    wanted = set(re.findall(r"\bwant (\w+)", text))
    assert set(all_steps) == wanted, (set(all_steps) ^ wanted)
    for suggested in re.findall(r'STEPS="([^"$]+)"', text):  # the header's suggested calls
        assert set(suggested.split()) <= set(all_steps), suggested


def test_device_check_refuses_an_unknown_step_before_doing_anything(tmp_path):
    path, _ = _device_check()
    env = {**os.environ, "STEPS": "tests kernel", "OUT": str(tmp_path / "out"), "PYTHON": "false"}
    res = subprocess.run(["bash", str(path)], capture_output=True, text=True, timeout=60, env=env)
    assert res.returncode == 2 and "unknown step 'kernel'" in res.stderr
    assert not (tmp_path / "out").exists()


def test_device_check_command_lines_parse_and_its_summary_reads_their_json(tmp_path, monkeypatch):
    """Every command device_check.sh runs, with its own options, on this CPU: the benchmark runs
    with --time-budget 0 (every row skipped, the JSON written as on a GPU), the other tools up to
    the point where they would need the GPU; then the script's summary block on those files."""
    from relaxedconv.benchmark import auto_cost, time_split
    from relaxedconv.kernels import step_bench

    monkeypatch.setattr(dispatch, "_policy_override", None)  # auto_cost sets the measure policy
    threads = torch.get_num_threads()  # and one thread
    monkeypatch.setattr(time_split, "small_op_host_us", lambda device: 1.0)
    monkeypatch.setattr(time_split, "split_case", _fake_split)
    monkeypatch.setattr(auto_cost, "first_call_cost", lambda case, device: {
        "case": case.name, "layer": case.describe(), "first_s": 1.0, "steady_s": 0.1, "choosing_s": 0.9,
        "backends_timed": ["expand_conv"], "chosen": "expand_conv", "median_ms": {"expand_conv": 1.0}, "skipped": {},
        "calls_per_backend": 8})
    commands = _device_check_commands(tmp_path)
    written = []
    for name, argv in commands:
        assert argv[0] == "-m", (name, argv)
        module, args = argv[1], argv[2:]
        if module == "relaxedconv.benchmark":
            assert runner.main([*args, "--time-budget", "0", "--device", "cpu"]) == 0, name
            written.append(args[args.index("--json") + 1])
        elif module == "relaxedconv.kernels.step_bench":
            with monkeypatch.context() as m:
                m.setattr(torch.cuda, "is_available", lambda: False)
                assert step_bench.main(args) == 2, name  # options and cases accepted; then "no CUDA device"
        elif module == "relaxedconv.benchmark.time_split":
            assert time_split.main(args) == 0, name
            assert json.loads(open(args[args.index("--json") + 1]).read())["rows"], name
        elif module == "relaxedconv.benchmark.auto_cost":
            assert auto_cost.main(args) == 0, name
        elif module == "pytest" and "bench/test_bench_layers.py" in args:
            pytest.importorskip("pytest_benchmark")
            res = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", *args], capture_output=True,
                                 text=True, timeout=120, cwd=str(_device_check()[0].parents[1]))
            assert res.returncode == 0 and "test_layer_fwd_bwd[G4-auto]" in res.stdout, res.stdout + res.stderr
        elif module == "pytest":
            assert args[-1] == "tests", (name, args)
        else:
            raise AssertionError(f"device_check.sh runs {module} ({name}): teach this test to check it")
    torch.set_num_threads(threads)
    assert {n for n, _ in commands} >= {"tests", "kernel_steps", "bench_layers", "bench_e2e", "auto_cost"}

    _, text = _device_check()
    call = re.search(r'"\$PY" - ((?:"\$OUT/[\w.]+" *)+)<<\'EOF\'', text)
    summarized = [p.replace("$OUT", str(tmp_path)) for p in re.findall(r'"(\$OUT/[\w.]+)"', call.group(1))]
    assert sorted(summarized) == sorted(written), "the summary reads every benchmark JSON the check writes"
    block = re.findall(r"<<'EOF' 2>&1 \| tee -a \"\$SUMMARY\"\n(.*?)\nEOF\n", text, re.S)[-1]
    (tmp_path / "partial.json").write_text(open(written[0]).read()[:200])  # a file cut mid-way: reported, not fatal
    res = subprocess.run([sys.executable, "-", *summarized, str(tmp_path / "partial.json"), str(tmp_path / "none.json")],
                         input=block, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stdout + res.stderr
    for path in summarized:
        assert f"{path}: " in res.stdout and f"{path}: missing" not in res.stdout, path
    assert "partial.json: unreadable" in res.stdout and "none.json: missing" in res.stdout
    assert "rows: {'skipped':" in res.stdout and "target (issues 6 and 10, H100)" in res.stdout


def test_cuda_graph_modes_without_a_gpu_say_that_no_graphs_are_captured(tmp_path, capsys):
    """torch.compile(mode='reduce-overhead') on a CPU silently runs Inductor alone: rows marked
    reduce-overhead would pass for CUDA-graph figures."""
    out = tmp_path / "g.json"
    assert runner.main(["--device", "cpu", "--cases", "T1", "--layer-compile", "reduce-overhead", "--e2e-compile",
                        "reduce-overhead", "--time-budget", "0", "--json", str(out)]) == 0
    notes = json.loads(out.read_text())["notes"]
    for option in ("--layer-compile", "--e2e-compile"):
        assert any(n.startswith(f"{option} reduce-overhead without CUDA: no CUDA graphs") for n in notes), notes
    assert "no CUDA graphs are captured" in capsys.readouterr().out


def test_markdown_of_a_run_cut_short_shows_the_targets_its_rows_give():
    """A GPU run killed before its end has "targets": []; --summarize recomputed them from the rows,
    --summarize --markdown left them out."""
    rows = [_row("T1", "triton", 1.0, peak=10.0), _row("T1", "materialize", 30.0, peak=200.0)]
    payload = {"meta": {"card": "GPU", "torch": "t", "triton": "t", "date": "d", "device": "cuda"}, "command": "c",
               "settings": {}, "cases": {}, "layers": rows, "targets": [], "e2e": []}
    md = report.markdown(payload)
    assert "| T1 bf16: triton f+b speedup over materialize | 30 | >= 20.0 | pass |" in md
    assert md == report.markdown({**payload, "targets": report.targets(rows)})


@pytest.mark.parametrize("suite, backends, e2e_backends, expect", [
    ("e2e", "triton", "conv2d,expand_conv", set()),
    ("e2e", "auto", "conv2d,triton", {NO_GPU}),
    ("layers", "auto", "triton", {"scaled"}),
    ("layers", "triton,auto", "conv2d", {"scaled", NO_GPU}),
])
def test_notes_are_about_the_suite_that_runs(suite, backends, e2e_backends, expect, tmp_path):
    out = tmp_path / "n.json"
    assert runner.main(["--device", "cpu", "--suite", suite, "--cases", "G1", "--backends", backends,
                        "--e2e-backends", e2e_backends, "--time-budget", "0", "--json", str(out)]) == 0
    notes = json.loads(out.read_text())["notes"]
    assert {("scaled" if n.startswith("cases scaled down for CPU") else n) for n in notes} == expect, notes


def test_a_bad_relaxedconv_auto_is_one_line_and_exit_2(monkeypatch, capsys):
    monkeypatch.setenv("RELAXEDCONV_AUTO", "fastest")
    with pytest.raises(SystemExit) as exc:
        runner.main(["--device", "cpu", "--cases", "G1", "--json", ""])
    assert exc.value.code == 2
    assert "got 'fastest'; fix or unset RELAXEDCONV_AUTO" in capsys.readouterr().err


def test_e2e_tf32_without_cuda_says_it_measures_fp32(tmp_path):
    out = tmp_path / "t.json"
    assert runner.main(["--device", "cpu", "--suite", "e2e", "--e2e-dtype", "tf32", "--e2e-variants", "t2",
                        "--e2e-backends", "conv2d", "--time-budget", "0", "--json", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert payload["e2e_config"]["dtype"] == "fp32"
    assert "e2e: tf32 requested without CUDA: measured as fp32" in payload["notes"]


def test_device_check_states_its_worst_case_from_its_own_limits():
    """The header's and README's worst case is the sum of the steps' timeouts and the install's 45 s."""
    from pathlib import Path

    _, text = _device_check()
    limits = [int(n) for n in re.findall(r'\brun_step \w+ (\d+) "\$PY"', text)]
    install = int(re.search(r'timeout (\d+) "\$PY" -m pip install', text).group(1))
    total = f"{sum(limits) + install:,}"
    assert f"the limits add up to {total} s" in text
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert f"time limits add up to {total} s" in readme
    assert f"~{-(-(sum(limits) + install) // 60)} min worst case" in readme  # minutes, rounded up


def test_helper_commands_refuse_a_result_path_they_cannot_write_before_measuring(tmp_path, monkeypatch, capsys):
    from relaxedconv.benchmark import opcount, time_split

    never = _never("although the result could not be saved")
    monkeypatch.setattr(time_split, "split_case", never)
    monkeypatch.setattr(opcount, "training_step_counts", never)
    bad = str(tmp_path)  # a directory
    for main, argv in ((time_split.main, ["--cases", "T1", "--backends", "factored_torch"]),
                       (opcount.main, ["--variants", "t2", "--backends", "expand_conv"])):
        with pytest.raises(SystemExit) as exc:
            main([*argv, "--json", bad])
        assert exc.value.code == 2 and "cannot write" in capsys.readouterr().err
