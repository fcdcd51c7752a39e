"""Tables for the terminal, the issue-6 targets, and the JSON result file."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

SCHEMA = "relaxedconv-bench/1"

# Issue 6's H100 targets, checked wherever the rows they need were measured.
SPEEDUP_MIN = 20.0  # triton vs materialize, fwd+bwd, translation non-stationary T1/T2
MEMORY_RATIO_MAX = 0.1  # triton peak / materialize peak, same cases
G4_RATIO_MAX = 1.0  # triton / expand_conv, fwd+bwd
AUTO_SLACK = 1.05  # auto within 5% of the best backend (issue 10: every case and dtype)
G3_BF16_TFLOPS_MIN = 200.0  # triton forward, factored FLOPs

CONCRETE = ("triton", "expand_conv", "materialize", "factored_torch")

TFLOPS_LEGEND = (
    "f+b TFLOP/s dir/fac: fwd+bwd throughput counting the direct convolution's multiply-adds "
    "(dir: conv2d on the expanded bank, B·P·N·C_out·C_in·N_in·K²) / the factored form's (fac: design.md §2, "
    "with the H+1 hidden features); ×2 per MAC, backward counted as 2× forward. fwd TFLOP/s fac: forward "
    "alone, factored count."
)
AUTO_LEGEND = (
    "auto / best: auto's fwd+bwd time over the fastest concrete backend of the same case and dtype, the two "
    f"timed interleaved (a b, b a, ...) so a drift of the machine hits both: 1.00 = as fast as the best, "
    f"≤ {AUTO_SLACK} passes; 'within noise' when the per-round ratios' 20th percentile is ≤ 1 (auto was as "
    "often faster as slower). When auto ran that same backend the ratio is timing noise by construction."
)


def _fmt(v, spec=".2f", none="-") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return none
    return format(v, spec)


def _table(header, rows) -> str:
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) if rows else len(str(h)) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    out = [line(header), line(["-" * w for w in widths])]
    out += [line(r) for r in rows]
    return "\n".join(out)


def _note(row) -> str:
    if row["status"] == "ok":
        mode = row.get("compile") or "off"
        notes = ([f"-> {row['auto_choice']}"] if row.get("auto_choice") else []) + ([f"compiled ({mode})"] if mode != "off" else [])
        return ", ".join(notes)
    reason = row.get("reason") or ""
    if row["status"] == "not timed" and reason:
        return reason
    return f"{row['status']}: {reason[:90]}" if reason else row["status"]


def layer_table(rows) -> str:
    header = ["case", "dtype", "backend", "fwd ms", "bwd ms", "f+b ms", "f+b TFLOP/s dir/fac", "fwd TFLOP/s fac", "peak MiB", "note"]
    body = []
    for r in rows:
        tf = r.get("tflops") or {}
        d, f = tf.get("direct", {}), tf.get("factored", {})
        fb = f"{_fmt(d.get('fwdbwd'), '.3g')}/{_fmt(f.get('fwdbwd'), '.3g')}" if tf else "-"
        body.append([
            r["case"], r["dtype"], r["backend"], _fmt(r["fwd_ms"], ".3f"), _fmt(r["bwd_ms"], ".3f"),
            _fmt(r["fwdbwd_ms"], ".3f"), fb, _fmt(f.get("fwd"), ".3g"), _fmt(r["peak_mib"], ".0f"), _note(r),
        ])
    return _table(header, body)


def backends_summary(backends) -> str:
    """{layer: backend} -> "expand_conv x7, factored_torch x1" (which backend the layers ran)."""
    if not backends:
        return ""
    counts = {}
    for b in backends.values():
        counts[b] = counts.get(b, 0) + 1
    return ", ".join(f"{b} x{n}" for b, n in sorted(counts.items(), key=lambda kv: -kv[1]))


E2E_LEGEND = (
    "x floor: time over the conv2d row of the same model, i.e. the same network with plain nn.Conv2d weights of the "
    "expanded shapes and no kernel net (step: training step; infer: eval forward under no_grad). host ms: the step's "
    "time until its Python call returned, the device idle at its start; near step ms, the step is host-bound."
)


def e2e_table(rows) -> str:
    header = ["model", "backend", "dtype", "batch", "images/s", "step ms", "host ms", "x floor", "infer img/s",
              "infer x floor", "peak MiB", "layers ran / note"]
    body = [
        [r["label"], r["backend"], r["dtype"], r["batch"], _fmt(r["images_per_s"], ".1f"), _fmt(r["step_ms"], ".1f"),
         _fmt(r.get("step_host_ms"), ".1f"), _fmt(r.get("x_floor"), ".2f"), _fmt(r.get("infer_images_per_s"), ".1f"),
         _fmt(r.get("infer_x_floor"), ".2f"),
         _fmt(r["peak_mib"], ".0f"), backends_summary(r.get("backends")) if r["status"] == "ok" else _note(r)]
        for r in rows
    ]
    return _table(header, body)


def _get(rows, case, dtype, backend):
    for r in rows:
        if r["case"] == case and r["dtype"] == dtype and r["backend"] == backend and r["status"] == "ok":
            return r
    return None


def _target(name, value, limit, op, detail) -> dict:
    if value is None:
        return {"target": name, "value": None, "limit": f"{op} {limit}", "status": "not measured", "detail": detail}
    ok = value >= limit if op == ">=" else value <= limit
    return {"target": name, "value": value, "limit": f"{op} {limit}", "status": "pass" if ok else "fail", "detail": detail}


def _auto_target(rows, case, dt) -> dict:
    auto = _get(rows, case, dt, "auto")
    best = [r for b in CONCRETE if (r := _get(rows, case, dt, b)) is not None]
    name = f"{case} {dt}: auto / best backend"
    if auto is None or not best:
        return _target(name, None, AUTO_SLACK, "<=", "fwd+bwd; needs the auto row and one concrete backend")
    fastest = min(best, key=lambda r: r["fwdbwd_ms"])
    inter = auto.get("auto_vs_best")
    if inter and inter.get("against") == fastest["backend"]:
        value, lo = inter["ratio"], inter["pair_p20_p80"][0]
        how = f"interleaved over {inter['rounds']} rounds, per-round p20-p80 {lo:.2f}-{inter['pair_p20_p80'][1]:.2f}"
    else:
        value, lo = auto["fwdbwd_ms"] / fastest["fwdbwd_ms"], None
        how = "separate medians (not interleaved)"
    detail = f"auto ran {auto['auto_choice']}, best {fastest['backend']}; {how}"
    if auto["auto_choice"] == fastest["backend"]:
        detail += "; same backend: the ratio is timing noise"
    t = _target(name, value, AUTO_SLACK, "<=", detail)
    if t["status"] == "fail" and (auto["auto_choice"] == fastest["backend"] or (lo is not None and lo <= 1.0)):
        t["status"] = "within noise"
    return t


def targets(rows) -> list[dict]:
    """Issue 6's and issue 10's targets for the cases present in ``rows`` (a case the run never
    tried gets no row; one it tried without the needed measurements is 'not measured')."""
    out = []
    present = {r["case"] for r in rows}
    dtypes = sorted({r["dtype"] for r in rows})
    for dt in dtypes:
        for case in ("T1", "T2"):
            if case not in present:
                continue
            tri, mat = _get(rows, case, dt, "triton"), _get(rows, case, dt, "materialize")
            speedup = mem = None
            if tri is not None and mat is not None:
                speedup = mat["fwdbwd_ms"] / tri["fwdbwd_ms"]
                if tri["peak_mib"] is not None and mat["peak_mib"]:
                    mem = tri["peak_mib"] / mat["peak_mib"]
            out.append(_target(
                f"{case} {dt}: triton f+b speedup over materialize", speedup, SPEEDUP_MIN, ">=", "fwd+bwd median ms ratio",
            ))
            out.append(_target(
                f"{case} {dt}: triton / materialize peak memory", mem, MEMORY_RATIO_MAX, "<=", "CUDA peak MiB of one fwd+bwd",
            ))
        if "G4" in present:
            tri, exp = _get(rows, "G4", dt, "triton"), _get(rows, "G4", dt, "expand_conv")
            ratio, detail = None, "fwd+bwd"
            if tri is not None and exp is not None:
                ratio = tri["fwdbwd_ms"] / exp["fwdbwd_ms"]
                detail += f"; forward alone {tri['fwd_ms'] / exp['fwd_ms']:.2f}"
            out.append(_target(f"G4 {dt}: triton / expand_conv time", ratio, G4_RATIO_MAX, "<=", detail))
        for case in dict.fromkeys(r["case"] for r in rows if r["dtype"] == dt):
            out.append(_auto_target(rows, case, dt))
    if "G3" in present and "bf16" in dtypes:
        tri = _get(rows, "G3", "bf16", "triton")
        out.append(_target(
            "G3 bf16: triton forward TFLOP/s (factored)", tri["tflops"]["factored"]["fwd"] if tri else None,
            G3_BF16_TFLOPS_MIN, ">=", "forward median",
        ))
    return out


def targets_table(items) -> str:
    body = [[t["target"], _fmt(t["value"], ".3g"), t["limit"], t["status"], t["detail"]] for t in items]
    return _table(["target (issues 6 and 10, H100)", "value", "limit", "status", "detail"], body)


def write_json(path, payload: dict) -> None:
    """Write atomically (the runner rewrites the file after every measurement)."""
    path = Path(path)
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str) + "\n", encoding="utf-8")
    try:
        os.replace(tmp, path)
    except OSError:  # e.g. path is a directory: leave no stray temporary file behind
        tmp.unlink(missing_ok=True)
        raise


def json_saver(path, payload, fail):
    """``save()`` for a tool that rewrites its result after every row (a run cut short keeps what it
    measured): writes ``payload()`` to ``path`` with :func:`write_json`, nothing when ``path`` is
    empty. Tried once here, so a path that cannot be written fails now (``fail(message)``, which
    exits), not after the first measurement's minutes."""
    def save():
        if path:
            write_json(path, payload())

    try:
        save()
    except OSError as e:
        fail(f"--json {path}: cannot write the result file ({e.strerror or e})")
    return save


def _md_table(header, rows) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def markdown(payload: dict) -> str:
    """A result file as Markdown: provenance line, layer table (fwd+bwd), targets, e2e table."""
    m = payload["meta"]
    s = payload.get("settings", {})
    lines = [
        f"**{m['card']}** · torch {m['torch']} · triton {m['triton']} · CUDA {m.get('cuda')} · "
        f"commit `{str(m.get('commit'))[:10]}`{' (dirty)' if m.get('commit_dirty') else ''} · "
        f"source `{m.get('source_hash')}` · {m['date']}",
        "",
        f"Command: `{payload.get('command')}`" + (" — cases **scaled down for CPU**" if s.get("scaled_down") else ""),
        "",
    ]
    if payload.get("layers"):
        lines += ["fwd+bwd median ms per backend" + (" (peak MiB)" if payload["meta"].get("device") == "cuda" else "")
                  + "; → the backend auto chose:", "", markdown_pivot(payload), ""]
        # a run cut short has no targets yet: from its rows, as summarize() does
        measured = [t for t in payload.get("targets") or targets(payload["layers"]) if t["status"] != "not measured"]
        if measured and payload["meta"].get("device") == "cuda":  # the targets are for an H100
            lines += [_md_table(["target (H100)", "value", "limit", "status"],
                                [[t["target"], _fmt(t["value"], ".3g"), t["limit"], t["status"]] for t in measured]), ""]
    if payload.get("e2e"):
        c = payload.get("e2e_config") or {}
        lines += [
            f"End-to-end training step (design.md §7 model, batch {c.get('batch')}, {c.get('size')}x{c.get('size')}, "
            f"widths {tuple(c.get('widths', ()))}, {c.get('dtype')}"
            + (", scaled down for CPU" if c.get("scaled_down") else "") + "):",
            "",
            _md_table(["model", "backend", "images/s", "step ms", "host ms", "× floor", "infer img/s",
                       "infer × floor", "peak MiB", "note"],
                      [[r["label"], r["backend"], _fmt(r["images_per_s"], ".1f"), _fmt(r["step_ms"], ".1f"),
                        _fmt(r.get("step_host_ms"), ".1f"), _fmt(r.get("x_floor"), ".2f"),
                        _fmt(r.get("infer_images_per_s"), ".1f"),
                        _fmt(r.get("infer_x_floor"), ".2f"), _fmt(r["peak_mib"], ".0f"),
                        "" if r["status"] == "ok" else _note(r).replace("|", "/")]
                       for r in payload["e2e"]]),
            "",
        ]
    return "\n".join(lines)


def summarize(payload: dict) -> str:
    """Terminal tables of a result file (targets recomputed from the rows if the run was cut short)."""
    out = []
    if payload.get("layers"):
        out += [layer_table(payload["layers"]), "", targets_table(payload.get("targets") or targets(payload["layers"])), ""]
    if payload.get("e2e"):
        out += [e2e_table(payload["e2e"]), ""]
    return "\n".join(out)


def markdown_pivot(payload: dict) -> str:
    """Compact Markdown: one row per (case, dtype), one column per backend, fwd+bwd ms (peak MiB on
    a GPU); 'n/a', 'not timed', 'oom', 'skipped' where a backend did not run."""
    rows = payload.get("layers") or []
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    keys = list(dict.fromkeys((r["case"], r["dtype"]) for r in rows))
    cell = {}
    for r in rows:
        if r["status"] == "ok":
            v = _fmt(r["fwdbwd_ms"], ".3g")
            if r["peak_mib"] is not None:
                v += f" ({r['peak_mib']:.0f})"
            if r.get("auto_choice"):
                v += f" → {r['auto_choice']}"
        else:
            v = r["status"]
        cell[r["case"], r["dtype"], r["backend"]] = v
    cases = payload.get("cases", {})
    body = [[c, cases.get(c, {}).get("description", ""), d] + [cell.get((c, d, b), "") for b in backends] for c, d in keys]
    return _md_table(["case", "layer", "dtype"] + backends, body)
