"""``relaxedconv bench``: time the backends on the design.md §5 cases and the §7 model.

    relaxedconv bench --quick                     # < 1 min anywhere; GPU when there is one
    relaxedconv bench                             # every case, tf32 + bf16 on a GPU
    relaxedconv bench --suite e2e                 # only the end-to-end training-step figure
    python -m relaxedconv.benchmark --cases G3,T2 --dtypes bf16 --json out.json

Per (case, dtype, backend) it reports forward, backward (= fwd+bwd - fwd) and fwd+bwd median
times, achieved TFLOP/s counting direct-equivalent and factored FLOPs (design.md §2) and CUDA peak
memory; backends are triton, expand_conv, materialize, factored_torch, auto, and a plain F.conv2d
of the same expanded shape. Without a GPU the CPU paths run on scaled-down cases and the fused
kernel is reported as not timed. The JSON (``--json``) is rewritten after every measurement, so
an interrupted run keeps what it measured.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

import torch

from . import cases as cases_mod
from . import e2e as e2e_mod
from . import environment, report
from .flops import case_macs
from .. import dispatch
from .layer_bench import (BENCH_BACKENDS, COMPILE_MODES, CONCRETE_BACKENDS, DTYPES, NO_GPU, interleaved_ratio, measure,
                          resolve_dtypes, skipped_row)
from .timing import FULL, QUICK

DEFAULT_JSON = "relaxedconv_bench.json"
QUICK_BUDGET_S = 50.0  # --quick: the whole run (layers then e2e) stops starting new work after this
LAYER_SHARE = 0.7  # of a budget, when both suites run


def _csv(s: str) -> list[str]:
    """Comma-separated names, each once (a repeated case or backend would be measured twice)."""
    return list(dict.fromkeys(t.strip() for t in s.split(",") if t.strip()))


def _int_csv(s: str) -> list[int]:
    try:
        return [int(t) for t in s.split(",") if t.strip()]  # widths may repeat: 32,32 is two blocks
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, e.g. 32,64; got {s!r}") from None


def _fail(message: str):
    """A bad option: one line on stderr, exit status 2 (argparse's), no traceback."""
    print(f"relaxedconv bench: {message}", file=sys.stderr)
    raise SystemExit(2)


def _check_names(option: str, what: str, given: list[str], known) -> None:
    """``given`` (from ``option``) is not empty and every name in it is one of ``known``."""
    bad = [n for n in given if n not in known]
    if bad or not given:
        _fail(f"unknown {what}(s) {', '.join(bad) or '(none given)'} in {option}; expected some of {', '.join(known)}")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="relaxedconv bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true",
                    help=f"cases {','.join(cases_mod.QUICK)}, one dtype, short timings, a small e2e; "
                    f"stops starting work after {QUICK_BUDGET_S:.0f} s")
    ap.add_argument("--suite", choices=("all", "layers", "e2e"), default="all",
                    help="layers: the per-layer table; e2e: training-step images/s; all: both (default)")
    ap.add_argument("--cases", type=_csv, default=None,
                    help=f"comma-separated, from {','.join(cases_mod.CASES)} (default: all; --quick: "
                    f"{','.join(cases_mod.QUICK)})")
    ap.add_argument("--backends", type=_csv, default=list(BENCH_BACKENDS),
                    help=f"comma-separated, from {','.join(BENCH_BACKENDS)} (conv2d = plain F.conv2d of the "
                    "expanded shape)")
    ap.add_argument("--dtypes", type=_csv, default=None,
                    help=f"comma-separated, from {','.join(DTYPES)} (default: GPU tf32,bf16 / --quick bf16; "
                    "CPU fp32,bf16 / --quick fp32)")
    ap.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    ap.add_argument("--scale", choices=("auto", "full", "cpu"), default="auto",
                    help="case sizes: full (design.md §5) or cpu (scaled down); auto: full on CUDA, else cpu")
    ap.add_argument("--warmup-ms", type=float, default=None, help="GPU: do_bench warm-up time per timing")
    ap.add_argument("--rep-ms", type=float, default=None, help="GPU: do_bench repetition time per timing")
    ap.add_argument("--time-budget", type=float, default=None, metavar="S",
                    help="stop starting new measurements after S seconds; the rest are recorded as skipped "
                    f"(default: none; --quick: {QUICK_BUDGET_S:.0f})")
    ap.add_argument("--layer-compile", choices=COMPILE_MODES, default="off",
                    help="time every layer row under torch.compile with this mode (Inductor fuses the kernel net; "
                    "reduce-overhead: CUDA graphs); the first calls (compilation) are not timed; default off")
    ap.add_argument("--e2e-variants", type=_csv, default=list(e2e_mod.E2E_VARIANTS),
                    help=f"comma-separated model variants (default: {','.join(e2e_mod.E2E_VARIANTS)}; any of "
                    "relaxedconv.models.VARIANTS)")
    ap.add_argument("--e2e-backends", type=_csv, default=None,
                    help=f"default: {','.join(e2e_mod.E2E_BACKENDS)} (--quick: auto,{e2e_mod.FLOOR},triton); "
                    f"{e2e_mod.FLOOR} = the same network with plain nn.Conv2d weights of the expanded shapes, the floor "
                    "every other row is compared with")
    ap.add_argument("--e2e-compile", choices=("off", "default", "reduce-overhead", "max-autotune"), default=None,
                    help="run the e2e model under torch.compile with this mode (reduce-overhead: CUDA graphs); "
                    "default off")
    ap.add_argument("--e2e-infer-batch", type=int, default=None, help="inference batch (default 256 on CUDA, 8 on CPU)")
    ap.add_argument("--e2e-batch", type=int, default=None)
    ap.add_argument("--e2e-size", type=int, default=None)
    ap.add_argument("--e2e-widths", type=_int_csv, default=None, help="block widths, e.g. 32,64")
    ap.add_argument("--e2e-group-order", type=int, default=None)
    ap.add_argument("--e2e-dtype", choices=tuple(DTYPES), default=None,
                    help="default: bf16 (autocast) on CUDA, fp32 on CPU")
    ap.add_argument("--json", default=DEFAULT_JSON, metavar="PATH", help=f"result file (default {DEFAULT_JSON}); '' to skip")
    ap.add_argument("--commit", default=None, help="commit to record when the tree has no .git (else git rev-parse HEAD)")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads for torch (default: torch's; --quick on CPU: 1, since its tiny shapes gain "
                    "nothing from threads and stall when another process holds a core)")
    ap.add_argument("--auto-policy", choices=dispatch.AUTO_POLICIES, default=None,
                    help="how backend='auto' chooses: measure (time the runnable backends on the first call per "
                    "shape) or static (the documented rule); default: RELAXEDCONV_AUTO, else measure on CUDA and "
                    "static on CPU")
    ap.add_argument("--row-time-limit", type=float, default=None, metavar="S",
                    help="time limit of one e2e row (model build, warm-up, timed steps, inference); a row past it "
                    "is recorded as 'timeout' and the run goes on (default 60 s; 0: none)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--summarize", nargs="+", metavar="JSON", default=None,
                    help="print the tables of existing result files instead of running")
    ap.add_argument("--markdown", action="store_true", help="with --summarize: Markdown tables (for bench/README.md)")
    ap.add_argument("--list", action="store_true", help="list the layer cases (--cases), e2e variants and backends, and exit")
    return ap


class Budget:
    def __init__(self, seconds: float | None):
        self.start = time.perf_counter()
        self.seconds = seconds

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def spent(self, share: float = 1.0) -> bool:
        return self.seconds is not None and self.elapsed() >= share * self.seconds

    def reason(self) -> str:
        return f"time budget ({self.seconds:.0f} s) spent" if self.seconds is not None else "no time budget"


def _resolve(args, device: torch.device, layers: bool, e2e: bool, e2e_backends: list[str]):
    on_gpu = device.type == "cuda"
    scale = args.scale if args.scale != "auto" else ("full" if on_gpu else "cpu")
    names = args.cases if args.cases is not None else list(cases_mod.QUICK if args.quick else cases_mod.CASES)
    if not names:
        _fail(f"--cases is empty; expected some of {', '.join(cases_mod.CASES)}")
    try:
        cases = cases_mod.select(names, scale=scale)
    except ValueError as e:
        _fail(str(e))
    _check_names("--backends", "backend", args.backends, BENCH_BACKENDS)
    if args.dtypes is not None:
        dtypes = args.dtypes
    elif on_gpu:
        dtypes = ["bf16"] if args.quick else ["tf32", "bf16"]
    else:
        dtypes = ["fp32"] if args.quick else ["fp32", "bf16"]
    try:
        dtypes, notes = resolve_dtypes(dtypes, device)
    except ValueError as e:
        _fail(f"--dtypes: {e}")
    if not dtypes:
        _fail(f"--dtypes is empty; expected some of {', '.join(DTYPES)}")
    if scale == "cpu" and layers:  # (the e2e model has its own CPU configuration, printed with its table)
        notes.append("cases scaled down for CPU (batch/32, half the image, a quarter of the channels; N, K, H kept): "
                     "not comparable with GPU numbers")
    if not on_gpu and ((layers and "triton" in args.backends) or (e2e and "triton" in e2e_backends)):
        notes.append(NO_GPU)
    for option, mode, runs in (("--layer-compile", args.layer_compile, layers), ("--e2e-compile", args.e2e_compile, e2e)):
        if runs and mode == "reduce-overhead" and not on_gpu:  # torch.compile then runs Inductor alone, silently
            notes.append(f"{option} reduce-overhead without CUDA: no CUDA graphs are captured; the rows marked "
                         "reduce-overhead measure Inductor's code alone")
    return cases, dtypes, scale, notes


def _e2e_config(args, device, notes: list) -> e2e_mod.E2EConfig:
    cfg = e2e_mod.gpu_config(args.quick) if device.type == "cuda" else e2e_mod.cpu_config(args.quick)
    if args.e2e_batch:
        cfg.batch = args.e2e_batch
    if args.e2e_size:
        cfg.size = args.e2e_size
    if args.e2e_widths:
        cfg.widths = tuple(args.e2e_widths)
    if args.e2e_group_order:
        cfg.group_order = args.e2e_group_order
    if args.e2e_dtype:
        cfg.dtype = args.e2e_dtype
    if args.e2e_compile:
        cfg.compile = args.e2e_compile
    if args.e2e_infer_batch:
        cfg.infer_batch = args.e2e_infer_batch
    if args.row_time_limit is not None:
        cfg.row_time_limit_s = args.row_time_limit or None
    (cfg.dtype,), dtype_notes = resolve_dtypes([cfg.dtype], device)
    notes.extend(f"e2e: {n}" for n in dtype_notes)  # tf32 off CUDA runs as fp32: said, not silent
    return cfg


def _route_choices() -> list[dict]:
    """Which route each step took for each shape its first call timed (dX: columns or direct;
    kernels/route_tuning.py), with the times that decided it: the rows ran on these."""
    try:
        from ..kernels import route_tuning
    except ImportError:  # the kernels need triton, which a non-Linux install lacks
        return []
    return route_tuning.choice_records()


def _check_e2e_options(args, backends: list[str]) -> None:
    """Names the e2e suite would only reject row by row, after the layer suite's minutes."""
    from ..models import VARIANTS

    _check_names("--e2e-variants", "model variant", args.e2e_variants, VARIANTS)
    _check_names("--e2e-backends", "backend", backends, e2e_mod.E2E_BACKENDS)
    for name in ("e2e_batch", "e2e_size", "e2e_group_order", "e2e_infer_batch"):
        value = getattr(args, name)
        if value is not None and value < 1:
            _fail(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if args.e2e_widths is not None and (not args.e2e_widths or min(args.e2e_widths) < 1):
        _fail(f"--e2e-widths must be positive integers, got {args.e2e_widths}")


def _check_e2e_size(cfg, variants) -> None:
    """An image smaller than the model takes made every e2e row an error row (exit 0), after the
    layer suite's minutes: the smallest size, from the models themselves (built on meta tensors)."""
    from ..models import build_model

    need = 0
    with torch.device("meta"):
        for variant in variants:
            model = build_model(variant, num_classes=10, group_order=cfg.group_order, widths=cfg.widths,
                                kernel_size=cfg.kernel_size, hidden_channels=cfg.hidden)
            need = max(need, model.min_input_size() or 0)
    if cfg.size < need:
        _fail(f"--e2e-size {cfg.size} is smaller than the e2e model takes ({need} = kernel size {cfg.kernel_size} "
              f"x 2^{len(cfg.widths)} blocks); give --e2e-size {need} or more, or fewer --e2e-widths")


def _summarize(paths, markdown: bool) -> int:
    for path in paths:
        try:
            with open(path, encoding="utf-8") as f:
                payload = json.load(f)
        except (OSError, ValueError) as e:
            _fail(f"--summarize: cannot read {path}: {e}")
        if not isinstance(payload, dict) or payload.get("schema") != report.SCHEMA:
            _fail(f"--summarize: {path} is not a relaxedconv bench result (no \"schema\": \"{report.SCHEMA}\")")
        print(f"# {path}\n")
        print(report.markdown(payload) if markdown else report.summarize(payload))
    return 0


def _list() -> int:
    from ..models import VARIANTS

    print("layer cases (--cases; --quick: " + ",".join(cases_mod.QUICK) + "), at full size (a CPU run scales them down):")
    for name, case in cases_mod.CASES.items():
        print(f"  {name:<12} {case.describe()}")
    print("backends (--backends): " + ", ".join(BENCH_BACKENDS))
    print("dtypes (--dtypes, --e2e-dtype): " + ", ".join(DTYPES))
    print("e2e variants (--e2e-variants; default " + ",".join(e2e_mod.E2E_VARIANTS) + "): " + ", ".join(VARIANTS))
    print("e2e backends (--e2e-backends): " + ", ".join(e2e_mod.E2E_BACKENDS))
    return 0


def _check_numbers(args) -> None:
    for option, value, low, strict in (("--warmup-ms", args.warmup_ms, 0, True), ("--rep-ms", args.rep_ms, 0, True),
                                       ("--threads", args.threads, 1, False),
                                       ("--time-budget", args.time_budget, 0, False),
                                       ("--row-time-limit", args.row_time_limit, 0, False)):
        if value is not None and (value <= low if strict else value < low):
            _fail(f"{option} must be {'above' if strict else 'at least'} {low}, got {value:g}")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    _check_numbers(args)
    if args.list:
        return _list()
    if args.summarize:
        return _summarize(args.summarize, args.markdown)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            _fail("--device cuda but torch sees no GPU (leave --device out to run on the CPU)")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    dispatch.set_auto_policy(args.auto_policy)
    try:
        auto_policy = dispatch.auto_policy(device.type)
    except ValueError as e:  # RELAXEDCONV_AUTO
        _fail(f"{e}; fix or unset {dispatch.AUTO_ENV}, or pass --auto-policy")
    threads = args.threads or (1 if (args.quick and device.type == "cpu") else None)
    if threads:
        torch.set_num_threads(threads)
    budget_s = args.time_budget if args.time_budget is not None else (QUICK_BUDGET_S if args.quick else None)
    budget = Budget(budget_s)
    run_layers = args.suite in ("all", "layers")
    run_e2e = args.suite in ("all", "e2e")
    e2e_backends = args.e2e_backends if args.e2e_backends is not None else (
        ["auto", e2e_mod.FLOOR, "triton"] if args.quick else list(e2e_mod.E2E_BACKENDS))
    cases, dtypes, scale, notes = _resolve(args, device, run_layers, run_e2e, e2e_backends)
    cfg = QUICK if args.quick else FULL
    if args.warmup_ms is not None or args.rep_ms is not None:
        cfg = dataclasses.replace(cfg, warmup_ms=args.warmup_ms or cfg.warmup_ms, rep_ms=args.rep_ms or cfg.rep_ms)
    if run_e2e:
        _check_e2e_options(args, e2e_backends)
    e2e_cfg = _e2e_config(args, device, notes) if run_e2e else None
    if e2e_cfg is not None:
        _check_e2e_size(e2e_cfg, args.e2e_variants)

    payload = {
        "schema": report.SCHEMA,
        "meta": environment.collect(device, args.commit),
        "command": "relaxedconv bench " + " ".join(sys.argv[1:] if argv is None else argv),
        "args": {k: v for k, v in vars(args).items()},
        "settings": {
            "scale": scale,
            "scaled_down": scale == "cpu",
            "dtypes": dtypes,
            "timing": dataclasses.asdict(cfg),
            "time_budget_s": budget_s,
            "auto_policy": auto_policy,
            "fwd": "layer(x, backend=...) with autograd recording; x and parameters require grad",
            "bwd": "median(fwd+bwd) - median(fwd)",
            "peak_mib": "CUDA max_memory_allocated during one fwd+bwd minus memory allocated before it; "
                        "null on CPU (no allocator counter)",
            "tflops": "2 x MACs of design.md §2 per pass / median time; backward counted as 2x forward",
        },
        "notes": notes,
        "cases": {c.name: {**c.to_dict(), "macs_fwd": case_macs(c)} for c in cases} if run_layers else {},
        "layers": [],
        "e2e_config": e2e_cfg.to_dict() if e2e_cfg else None,
        "e2e": [],
        "targets": [],
        "elapsed_s": None,
    }

    def current():
        payload["elapsed_s"] = round(budget.elapsed(), 1)
        payload["routes"] = _route_choices()
        return payload

    save = report.json_saver(args.json, current, _fail)
    m = payload["meta"]
    print(f"relaxedconv bench on {m['card']} | torch {m['torch']} | triton {m['triton']} | "
          f"commit {str(m['commit'])[:10]} | {m['date']}")
    for n in notes:
        print(f"note: {n}")

    layer_share = LAYER_SHARE if (run_layers and run_e2e) else 1.0
    if run_layers:
        # Measurement order under a time budget: the design.md §5 cases in every dtype (first dtype
        # first), then the variants; within that, the order given. A budget cuts from the end.
        order = sorted(
            ((case, dt) for case in cases for dt in dtypes),
            key=lambda cd: (cd[0].priority, dtypes.index(cd[1])),
        )
        layers = {}
        for case, dt in order:
            rows = {}
            for backend in args.backends:
                if budget.spent(layer_share):
                    row = skipped_row(case, dt, backend, budget.reason(), args.layer_compile)
                else:
                    if case.name not in layers:
                        torch.manual_seed(args.seed)
                        layers[case.name] = cases_mod.build_layer(case, device)
                    row = measure(case, layers[case.name], dt, backend, device, cfg, args.layer_compile)
                    _progress(row, budget)
                rows[backend] = row
                payload["layers"].append(row)
                save()
            _compare_auto(rows, case, layers.get(case.name), dt, device, cfg, budget, layer_share, args.layer_compile)
            save()
        del layers
        payload["layers"] = _sorted_rows(payload["layers"], [c.name for c in cases], dtypes, args.backends, "case")
        payload["targets"] = report.targets(payload["layers"])
        save()

    if run_e2e:
        # auto and triton for every variant first, then the unfused baselines.
        for backend in e2e_backends:
            for variant in args.e2e_variants:
                slow = args.quick and device.type == "cpu" and e2e_mod.CPU_QUICK_SKIP.get(variant)
                if budget.spent() or slow:
                    row = e2e_mod.base_row(variant, backend, e2e_cfg)
                    row.update(status="skipped", reason=slow or budget.reason())
                else:
                    row = e2e_mod.measure_step(variant, backend, device, e2e_cfg)
                    print(f"  [{budget.elapsed():6.1f}s] e2e {variant:<14} {backend:<15} {row['status']:<9} "
                          f"{_num(row['images_per_s'], '.1f')} img/s, inference {_num(row['infer_images_per_s'], '.1f')} img/s"
                          + (f" ({row['reason'][:100]})" if row["reason"] else ""), flush=True)
                payload["e2e"].append(row)
                e2e_mod.add_floor_ratios(payload["e2e"])  # in every save: a run cut short keeps its ratios
                save()
        payload["e2e"] = _sorted_rows(payload["e2e"], args.e2e_variants, [e2e_cfg.dtype], e2e_backends, "variant")
        save()

    print()
    if run_layers:
        print(report.layer_table(payload["layers"]))
        print(report.TFLOPS_LEGEND)
        print()
        print(report.targets_table(payload["targets"]))
        print(report.AUTO_LEGEND)
        if device.type != "cuda":
            print("(the targets are issue 6's H100 targets; on a CPU they are shown for reference only)")
        print()
    if run_e2e:
        c = e2e_cfg
        print(f"end-to-end training step (design.md §7 model, batch {c.batch}, {c.size}x{c.size}, widths "
              f"{tuple(c.widths)}, N = {c.group_order}, {c.dtype}{', scaled down for CPU' if c.scaled_down else ''}"
              f"{'' if c.compile == 'off' else f', torch.compile mode {c.compile}'}) and inference (eval, no_grad, batch "
              f"{c.infer_batch})")
        print(report.e2e_table(payload["e2e"]))
        print(report.E2E_LEGEND)
        print()
    for n in notes:
        print(f"note: {n}")
    skipped = [r for r in payload["layers"] + payload["e2e"] if r["status"] == "skipped"]
    if skipped:
        print(f"note: {len(skipped)} measurements skipped ({'; '.join(sorted({r['reason'] for r in skipped}))})")
    print(f"done in {budget.elapsed():.1f} s" + (f"; wrote {args.json}" if args.json else ""))
    return 0


def _compare_auto(rows: dict, case, layer, dt: str, device, cfg, budget: Budget, share: float,
                  compile_mode: str = "off") -> None:
    """Time auto against the fastest concrete backend interleaved (issue 12, item 10); the result
    goes into the auto row and the auto / best target reads it."""
    auto = rows.get("auto")
    ok = [r for b, r in rows.items() if b in CONCRETE_BACKENDS and r["status"] == "ok"]
    if auto is None or auto["status"] != "ok" or not ok or budget.spent(share):
        return
    best = min(ok, key=lambda r: r["fwdbwd_ms"])["backend"]
    try:
        auto["auto_vs_best"] = interleaved_ratio(case, layer, dt, "auto", best, device, cfg, compile_mode)
    except Exception as e:  # noqa: BLE001 - a comparison that fails leaves the separate medians
        auto["auto_vs_best"] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
        return
    r = auto["auto_vs_best"]
    print(f"  [{budget.elapsed():6.1f}s] {case.name:<12} {dt:<5} auto / {best} interleaved: {r['ratio']:.3f} "
          f"(per-round p20-p80 {r['pair_p20_p80'][0]:.2f}-{r['pair_p20_p80'][1]:.2f}, {r['rounds']} rounds)", flush=True)


def _sorted_rows(rows, names, dtypes, backends, key):
    """Rows in table order: by case (or variant) as given, dtype, backend."""
    return sorted(rows, key=lambda r: (names.index(r[key]), dtypes.index(r["dtype"]), backends.index(r["backend"])))


def _num(v, spec):
    return "-" if v is None else format(v, spec)


def _progress(row, budget: Budget) -> None:
    extra = row["reason"] if row["status"] != "ok" else (
        f"fwd {_num(row['fwd_ms'], '.3f')} ms, f+b {_num(row['fwdbwd_ms'], '.3f')} ms"
        + (f", peak {row['peak_mib']:.0f} MiB" if row["peak_mib"] is not None else "")
        + (f" (auto -> {row['auto_choice']})" if row["auto_choice"] else "")
    )
    print(f"  [{budget.elapsed():6.1f}s] {row['case']:<12} {row['dtype']:<5} {row['backend']:<15} "
          f"{row['status']:<9} {extra}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
