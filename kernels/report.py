"""Kernel report: compile every shipped kernel config for an H100/H200 (sm_90a) on the CPU and say
what the GPU would run.

    python -m relaxedconv.kernels.report [--quick] [--dtypes bf16,fp32-tf32] [--filter u]
                                         [--jobs N] [--json PATH]

Per (kernel, config, dtype, specialisation) from ``kernels/registry.py``: registers, spill
stores/loads (ptxas), stack, shared memory (Triton's allocation), theoretical occupancy, how each
``tl.dot`` was lowered (Triton's GPU IR: wgmma = Hopper MMAv3, mma.sync = MMAv2, fma = no tensor
cores), whether the SASS issues HGMMA or only HMMA, whether the PTX has ``wgmma.mma_async`` and
``cp.async`` (software-pipelined loads), and the compile time. Findings at the end: bf16/fp16
configs that spill, tensor-core dtypes whose dots are not on tensor cores, shared memory over the
227 KB a block may use, and why dots that could be wgmma are not (Triton's MMAv3 rule).

No GPU is needed: Triton compiles ahead of time with ``triton.compile(ASTSource(...),
target=GPUTarget("cuda", 90, 32))`` and its bundled ptxas/cuobjdump. Exit status: 0 all compiled
(findings do not fail it), 1 a compile failed or a kernel is missing from the registry, 2 bad
arguments, 77 this Triton cannot compile ahead of time.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from . import registry

SM90_SMEM_PER_BLOCK = 227 * 1024  # cudaDevAttrMaxSharedMemoryPerBlockOptin on H100/H200
SM90_SMEM_PER_SM = 228 * 1024
SM90_RESERVED_SMEM = 1024  # the driver's per-block reservation on sm_80+
SM90_REGS_PER_SM = 65536
SM90_MAX_WARPS = 64
SM90_MAX_BLOCKS = 32
TENSOR_CORE_SASS = ("HGMMA", "HMMA")
SKIP = 77


# --- parsing the compiler's output (pure functions, unit-tested) --------------------------------

def parse_ptxas_log(text: str) -> dict | None:
    """``ptxas -v`` -> registers, stack frame, spill stores/loads (bytes); None if absent."""
    props = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", text)
    regs = re.search(r"Used (\d+) registers", text)
    if not (props and regs):
        return None
    return {"regs": int(regs.group(1)), "stack": int(props.group(1)),
            "spill_stores": int(props.group(2)), "spill_loads": int(props.group(3))}


def parse_resource_usage(text: str) -> dict | None:
    """``cuobjdump --dump-resource-usage`` -> REG, STACK, SHARED (static), LOCAL of the one kernel."""
    m = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", text)
    if not m:
        return None
    return dict(zip(("regs", "stack", "shared_static", "local"), map(int, m.groups())))


# One SASS instruction of a ``cuobjdump -sass`` listing: address, opcode (with its modifiers), operands.
_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
_BRANCH_TARGET = re.compile(r"\bBRA\b\s+(?:`\(\.L_x_\d+\)\s+)?0x([0-9a-f]+)")


def sass_opcodes(sass: str) -> Counter:
    """Base opcode counts (``HGMMA.64x32x16.F32.BF16`` -> ``HGMMA``) of a ``cuobjdump -sass`` listing."""
    return Counter(m.group(2).split(".")[0] for m in _SASS_LINE.finditer(sass))


def main_loop_instructions(sass: str) -> int | None:
    """SASS instructions in the kernel's widest loop (the backward branch spanning the most code),
    inner loops included; None without a loop. For the kernels whose time is instruction issue
    (the fused kernel net) this per-iteration count, over the values a thread holds, is the cost
    model's input; a code path that runs rarely (libdevice's slow sine) still counts."""
    lines = [(int(m.group(1), 16), m) for m in _SASS_LINE.finditer(sass)]
    spans = []
    for addr, m in lines:
        target = _BRANCH_TARGET.search(m.group(0)) if m.group(2).startswith("BRA") else None
        if target and int(target.group(1), 16) < addr:
            spans.append((int(target.group(1), 16), addr))
    if not spans:
        return None
    start, end = max(spans, key=lambda sp: sp[1] - sp[0])
    return sum(1 for addr, _ in lines if start <= addr <= end)


def sass_mma(counts: Counter) -> str:
    """HGMMA (wgmma) and/or HMMA (mma.sync), else FMA when the listing has no MMA instruction."""
    found = [op for op in TENSOR_CORE_SASS if counts.get(op)]
    if counts.get("DMMA"):
        found.append("DMMA")
    return "+".join(found) if found else "FMA"


_TYPE = r"(?:tensor|!ttg\.memdesc)<(\d+)x(\d+)x(\w+)(?:,\s*#([\w.]+)[^>]*)?"


def _aliases(ir: str) -> dict[str, int]:
    """``#mma1 = #ttg.nvidia_mma<{versionMajor = 2, ...`` -> {"mma1": 2}."""
    return {m.group(1): int(m.group(2))
            for m in re.finditer(r"^#(\w+) = #ttg\.nvidia_mma<\{versionMajor = (\d+)", ir, re.M)}


def ttgir_dots(ttgir: str) -> list[dict]:
    """How each dot op of the GPU IR is lowered: kind (wgmma, mma.sync, fma), M, N, K, operand
    element type, and where wgmma's A operand lives (shared memory or registers)."""
    versions = _aliases(ttgir)
    dots = []
    for line in ttgir.splitlines():
        op = re.search(r"= (ttng\.warp_group_dot|tt\.dot) ", line)
        if not op:
            continue
        types = re.findall(_TYPE, line.split(" : ", 1)[-1])
        if len(types) < 3:
            continue
        (m, k, elem, _), (_, n, _, _), (_, _, _, res_enc) = types[0], types[1], types[-1]
        if op.group(1) == "ttng.warp_group_dot":
            a_mem = "!ttg.memdesc" in line.split(" : ", 1)[-1].split(" * ")[0]
            kind, a_in = "wgmma", "smem" if a_mem else "regs"
        else:
            version = versions.get(res_enc or "")
            kind = {3: "wgmma", 2: "mma.sync"}.get(version, "fma")
            a_in = None
        dots.append({"kind": kind, "m": int(m), "n": int(n), "k": int(k), "elem": elem, "a_in": a_in})
    return dots


def ttir_dots(ttir: str) -> list[dict]:
    """The source program's dots (Triton IR, before layouts): M, N, K, element type, precision."""
    dots = []
    for line in ttir.splitlines():
        if not re.search(r"= tt\.dot ", line):
            continue
        types = re.findall(r"tensor<(\d+)x(\d+)x(\w+)>", line.split(" : ", 1)[-1])
        if len(types) < 3:
            continue
        prec = re.search(r"inputPrecision = (\w+)", line)
        dots.append({"m": int(types[0][0]), "k": int(types[0][1]), "n": int(types[1][1]), "elem": types[0][2],
                     "precision": prec.group(1) if prec else None})
    return dots


_BITS = {"bf16": 16, "f16": 16, "f32": 32, "f64": 64, "i8": 8}


def wgmma_blockers(dot: dict, num_warps: int) -> list[str]:
    """Why Triton would not lower this dot to wgmma on sm_90 (empty: eligible). Triton's rule,
    ``supportMMA(dotOp, 3)`` in lib/Analysis/Utility.cpp, called by getMMAVersionSafe in
    lib/Dialect/TritonGPU/Transforms/AccelerateMatmul.cpp: numWarps % 4 == 0, M % 64 == 0,
    N % 8 == 0, K >= 256 / bitwidth, operands f16/bf16/fp8/i8, or f32 only as tf32 (tf32x3 is
    three tf32 dots, Triton's F32DotTC pass, each judged by the same rule); otherwise it falls back
    to MMAv2 (mma.sync)."""
    out = []
    elem, bits = dot["elem"], _BITS.get(dot["elem"], 0)
    if num_warps % 4:
        out.append(f"num_warps={num_warps} not a multiple of 4")
    if dot["m"] % 64:
        out.append(f"M={dot['m']} not a multiple of 64")
    if dot["n"] % 8:
        out.append(f"N={dot['n']} not a multiple of 8")
    if bits and dot["k"] < 256 // bits:
        out.append(f"K={dot['k']} < {256 // bits}")
    if elem == "f64" or (elem == "f32" and dot.get("precision") not in (None, "tf32", "tf32x3")):
        out.append(f"{elem} {dot.get('precision') or ''} has no tensor-core form".replace("  ", " "))
    return out


def occupancy_warps(regs: int, num_warps: int, smem: int) -> int:
    """Theoretical resident warps per SM on sm_90 (64 at most), limited by registers (allocated per
    warp in units of 256), shared memory and the block limit."""
    per_warp = -(-regs * 32 // 256) * 256
    by_regs = (SM90_REGS_PER_SM // per_warp) // num_warps if per_warp else SM90_MAX_BLOCKS
    by_smem = SM90_SMEM_PER_SM // (smem + SM90_RESERVED_SMEM)
    blocks = min(by_regs, by_smem, SM90_MAX_WARPS // num_warps, SM90_MAX_BLOCKS)
    return blocks * num_warps


# --- tools ---------------------------------------------------------------------------------------

def nvidia_tool(name: str) -> str | None:
    """A CUDA binary: the one Triton ships (triton/backends/nvidia/bin), else one on PATH."""
    try:
        import triton.backends.nvidia as nv

        path = Path(nv.__file__).parent / "bin" / name
        if path.is_file():
            return str(path)
    except ImportError:
        pass
    for candidate in (shutil.which(name), f"/usr/local/cuda/bin/{name}"):
        if candidate and os.path.isfile(candidate):
            return candidate
    return None


def triton_ptxas() -> str | None:
    """The ptxas Triton itself uses for sm_90 (3.6: ptxas 12.8; 3.9: ptxas-blackwell 13.x)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return get_ptxas(90).path
    except Exception:  # noqa: BLE001 - another Triton layout: look on disk
        return nvidia_tool("ptxas")


def _run(cmd: list[str]) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout


# --- one compile ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Job:
    kernel: str
    dtype: str
    config: str
    spec: str

    @property
    def label(self) -> str:
        return f"{self.kernel} {self.config} {self.dtype} {self.spec}"


def _find(job: Job):
    kernel = next(k for k in registry.KERNELS if k.name == job.kernel)
    dtype = registry.DTYPES[job.dtype]
    config = next(c for c in registry.shipped_configs(kernel, dtype) if c.label == job.config)
    spec = dict(registry.specialisations(kernel))[job.spec]
    return kernel, dtype, config, spec


def compile_job(job: Job) -> dict:
    """Compile one row for sm_90a and measure it; failures come back as a row with ``error``."""
    row = {"kernel": job.kernel, "config": job.config, "dtype": job.dtype, "spec": job.spec, "ok": False}
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        kernel, dtype, config, spec = _find(job)
        fn = registry.resolve(kernel.fn)
        if not isinstance(fn, triton.runtime.JITFunction):
            raise registry.RegistryError(
                f"{kernel.fn} is a {type(fn).__name__}, not a @triton.jit function "
                "(TRITON_INTERPRET set when the kernels were imported?)")
        signature, constexprs, attrs = registry.compile_signature(fn, kernel, dtype, config, job.spec, spec)
        options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
        if config.maxnreg:
            options["maxnreg"] = config.maxnreg
        row.update(num_warps=config.num_warps, num_stages=config.num_stages, fixed=config.fixed,
                   autotune_reachable=registry.autotuner_keeps(kernel, dtype, config, job.spec, spec))
        log = io.StringIO()
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(log):  # TRITON_DUMP_PTXAS_LOG prints ptxas -v here
            compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs),
                                      target=GPUTarget("cuda", 90, 32), options=options)
        row["compile_s"] = round(time.perf_counter() - t0, 2)
    except Exception as e:  # noqa: BLE001 - every failure becomes a row, the run goes on
        row["error"] = f"{type(e).__name__}: {str(e).strip()[:1500]}"
        return row
    try:
        row.update(measure(compiled, log.getvalue(), config.num_warps))
    except Exception as e:  # noqa: BLE001 - a tool that fails on one cubin fails that row only
        row["error"] = f"compiled, but reading the result failed: {type(e).__name__}: {str(e)[:500]}"
    row["ok"] = row.get("error") is None
    return row


def measure(compiled, ptxas_log: str, num_warps: int) -> dict:
    asm, meta = compiled.asm, compiled.metadata
    out: dict = {"smem": int(getattr(meta, "shared", 0) or 0), "error": None}
    ptxas = parse_ptxas_log(ptxas_log)
    out["ptxas_log_source"] = "compile"
    with tempfile.TemporaryDirectory() as tmp:
        ptx_path, cubin = Path(tmp, "k.ptx"), Path(tmp, "k.cubin")
        cubin.write_bytes(asm["cubin"])
        if ptxas is None:  # the compile's log was not captured (a cache hit): run ptxas -v again
            ptx_path.write_text(asm["ptx"])
            tool = triton_ptxas()
            if tool:
                arch = "sm_90a"
                r = subprocess.run([tool, "-lineinfo", "-v", f"--gpu-name={arch}", str(ptx_path), "-o",
                                    str(Path(tmp, "again.cubin"))], capture_output=True, text=True)
                ptxas = parse_ptxas_log(r.stdout + r.stderr)
                out["ptxas_log_source"] = "rerun"
        cuobjdump = nvidia_tool("cuobjdump")
        usage = counts = None
        if cuobjdump:
            usage = parse_resource_usage(_run([cuobjdump, "--dump-resource-usage", str(cubin)]))
            sass = _run([cuobjdump, "-sass", str(cubin)])
            counts = sass_opcodes(sass)
            out["loop_sass"] = main_loop_instructions(sass)
    if ptxas:
        out.update(ptxas)
    if usage:
        out["regs"] = usage["regs"]  # the cubin's own count is authoritative
        out["local"] = usage["local"]
        out["smem_static"] = usage["shared_static"]
        out.setdefault("stack", usage["stack"])
    missing = [k for k in ("regs", "spill_stores", "spill_loads") if out.get(k) is None]
    if counts is None:
        missing.append("SASS (no cuobjdump)")
    if missing:
        out["error"] = "could not read " + ", ".join(missing)
    out["sass_counts"] = {op: counts[op] for op in ("HGMMA", "HMMA", "DMMA", "FFMA", "DFMA", "LDL", "STL", "LDSM")
                          if counts and counts.get(op)}
    out["sass_mma"] = sass_mma(counts) if counts is not None else None
    ptx = asm["ptx"]
    out["ptx_wgmma"] = "wgmma.mma_async" in ptx
    out["ptx_mma_sync"] = re.search(r"\bmma\.sync\.", ptx) is not None
    out["cp_async"] = "cp.async" in ptx
    out["scalar_16bit"] = scalar_16bit_accesses(ptx)
    out["dots"] = ttgir_dots(asm["ttgir"])
    source = ttir_dots(asm["ttir"])
    out["source_dots"] = [dict(d, wgmma_blockers=wgmma_blockers(d, num_warps)) for d in source]
    if out.get("regs") is not None:
        out["occupancy_warps"] = occupancy_warps(out["regs"], num_warps, out["smem"])
    return out


# --- planning, running, printing -----------------------------------------------------------------

def plan(dtypes: list[str], filters: list[str], quick: bool) -> tuple[list[Job], list[dict]]:
    """The jobs to run, and rows for entries that could not be planned (stale references)."""
    jobs, broken = [], []
    for kernel in registry.KERNELS:
        for dname in dtypes:
            if kernel.dtypes is not None and dname not in kernel.dtypes:
                continue  # never launched in this dtype
            dtype = registry.DTYPES[dname]
            try:
                configs = registry.shipped_configs(kernel, dtype)
            except registry.RegistryError as e:
                broken.append({"kernel": kernel.name, "config": "-", "dtype": dname, "spec": "-", "ok": False,
                               "error": str(e)})
                continue
            for spec_label, spec in registry.specialisations(kernel):
                chosen = configs
                if quick:
                    # the heaviest config the autotuner would run for this case (a config it prunes
                    # there, e.g. a 256-column tile at N_in = 8, never runs, so says nothing)
                    kept = [c for c in configs if registry.autotuner_keeps(kernel, dtype, c, spec_label, spec) is not False]
                    chosen = [heaviest(kept or configs)]
                for config in chosen:
                    job = Job(kernel.name, dname, config.label, spec_label)
                    if not filters or any(f in job.label for f in filters):
                        jobs.append(job)
    return jobs, broken


def heaviest(configs: list) -> "registry.LaunchConfig":
    """The config with the largest tile per warp (product of its tile sizes / num_warps; the
    first of equals): the one most likely to run out of registers, so --quick checks it (per case,
    among the configs the autotuner keeps there)."""
    def load(c):
        size = 1
        for k, v in c.meta.items():
            if k != "POSITIONS":  # positions per program (u) are not a tile dimension
                size *= v
        return size / c.num_warps
    return max(configs, key=load)  # max keeps the first of equal keys


def run_jobs(jobs: list[Job], n_jobs: int) -> list[dict]:
    rows = []

    def progress(i, row):
        status = f"{row.get('compile_s', 0):.1f}s" if row["ok"] else "FAILED"
        print(f"[{i}/{len(jobs)}] {row['kernel']} {row['config']} {row['dtype']} {row['spec']}: {status}",
              file=sys.stderr, flush=True)

    if n_jobs <= 1:
        for i, job in enumerate(jobs, 1):
            rows.append(compile_job(job))
            progress(i, rows[-1])
        return rows
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(n_jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        for i, row in enumerate(pool.map(compile_job, jobs), 1):
            rows.append(row)
            progress(i, row)
    return rows


def _dots_summary(dots: list[dict]) -> str:
    if not dots:
        return "none"
    c = Counter(d["kind"] + ("(A regs)" if d.get("a_in") == "regs" else "") for d in dots)
    return " ".join(f"{n}x{kind}" for kind, n in sorted(c.items()))


def _cell(v, fmt="{}"):
    return "?" if v is None else fmt.format(v)


COLUMNS = ("kernel", "config", "dtype", "spec", "tuned", "regs", "spill st/ld B", "stack", "smem KB", "occ",
           "dots (GPU IR)", "SASS", "wgmma", "cp.async", "2B ld/st", "loop", "compile s")
# More scalar 2-byte global loads and stores than this per thread is a gather or a store that was
# not vectorised: the tail column's tiles (one hidden column per rotation) account for 8.
SCALAR_16BIT_LIMIT = 16
_SCALAR_16BIT = re.compile(r"\b(ld|st)\.global(?:\.[\w:]+)*?\.(?:b16|u16|s16|f16|bf16)\b")


def scalar_16bit_accesses(ptx: str) -> dict:
    """Scalar (not .v2/.v4) 2-byte global loads and stores in the PTX: each moves one bf16/fp16
    element per thread. A warp's 32 of them touch up to 32 sectors where one 16-byte vector
    instruction per thread would touch 4 (2026-11-27: the gathers of u and dz and the V store of v
    were all scalar for N_in > 1 until their masks became provably constant over runs of N_in)."""
    out = {"ld": 0, "st": 0}
    for line in ptx.splitlines():
        m = _SCALAR_16BIT.search(line)
        if m and ".v2" not in line and ".v4" not in line:
            out[m.group(1)] += 1
    return out
# "tuned": whether the autotuner considers the config for that dtype and case (no: pruned; -: the
# fixed launch of the interpreter, fp64 and RELAXEDCONV_AUTOTUNE=0).
_TUNED = {True: "yes", False: "no", None: "-"}


def table(rows: list[dict]) -> str:
    lines = []
    for r in rows:
        if not r["ok"] and r.get("regs") is None:
            lines.append((r["kernel"], r["config"], r["dtype"], r["spec"], "FAILED: " + (r.get("error") or "")[:150]))
            continue
        lines.append((
            r["kernel"], r["config"], r["dtype"], r["spec"], _TUNED[r.get("autotune_reachable")], _cell(r.get("regs")),
            f"{_cell(r.get('spill_stores'))}/{_cell(r.get('spill_loads'))}", _cell(r.get("stack")),
            _cell(r.get("smem") / 1024 if r.get("smem") is not None else None, "{:.1f}"),
            _cell(r.get("occupancy_warps")), _dots_summary(r.get("dots", [])), _cell(r.get("sass_mma")),
            "yes" if r.get("ptx_wgmma") else "no", "yes" if r.get("cp_async") else "no",
            "/".join(str(r.get("scalar_16bit", {}).get(k, "?")) for k in ("ld", "st")), _cell(r.get("loop_sass")),
            _cell(r.get("compile_s")),
        ))
    full = [ln for ln in lines if len(ln) == len(COLUMNS)]
    widths = [max(len(str(x)) for x in col) for col in zip(COLUMNS, *full)]
    out = ["  ".join(str(c).ljust(w) for c, w in zip(COLUMNS, widths)).rstrip()]
    for ln in lines:
        if len(ln) == len(COLUMNS):
            out.append("  ".join(str(c).ljust(w) for c, w in zip(ln, widths)).rstrip())
        else:
            out.append("  ".join(str(c).ljust(w) for c, w in zip(ln[:4], widths)) + "  " + ln[4])
    return "\n".join(out)


def findings(rows: list[dict], unregistered: list[str]) -> list[str]:
    """What to fix: failed compiles, unregistered kernels, half-precision spills, tensor-core
    dtypes off the tensor cores, shared memory over the per-block limit; then why dots are not
    wgmma (information for tiling choices rather than a defect)."""
    out = []
    # A config the autotuner drops for that dtype and case never runs there: not a finding.
    pruned = [r for r in rows if r["ok"] and r.get("autotune_reachable") is False]
    ok = [r for r in rows if r["ok"] and r.get("autotune_reachable") is not False]
    for r in rows:
        if not r["ok"]:
            out.append(f"COMPILE FAILED {r['kernel']} {r['config']} {r['dtype']} {r['spec']}: {r.get('error')}")
    for name in unregistered:
        out.append(f"UNREGISTERED kernel {name}: add it to kernels/registry.py")
    for r in ok:
        spill = (r.get("spill_stores") or 0) + (r.get("spill_loads") or 0)
        if registry.DTYPES[r["dtype"]].pointer in ("bf16", "fp16") and spill:
            out.append(f"SPILLS {r['kernel']} {r['config']} {r['dtype']} {r['spec']}: "
                       f"{r['spill_stores']} B stores / {r['spill_loads']} B loads at {r['regs']} registers")
    others: dict[str, list] = {}
    for r in ok:
        if registry.DTYPES[r["dtype"]].pointer not in ("bf16", "fp16") and (r.get("spill_stores") or 0):
            others.setdefault(r["dtype"], []).append(r)
    for dtype, spilled in others.items():
        worst = max(spilled, key=lambda r: r["spill_stores"])
        out.append(f"spills in {len(spilled)} {dtype} rows (worst {worst['kernel']} {worst['config']} {worst['spec']}: "
                   f"{worst['spill_stores']} B stores)")
    for r in ok:
        # Kernels without a tl.dot (the col2im fold) are memory gathers, not matrix products.
        if registry.DTYPES[r["dtype"]].tensor_cores and r.get("source_dots"):
            off = [d for d in r.get("dots", []) if d["kind"] == "fma"]
            if off or r.get("sass_mma") not in ("HGMMA", "HMMA", "HGMMA+HMMA"):
                out.append(f"NO TENSOR CORES {r['kernel']} {r['config']} {r['dtype']} {r['spec']}: "
                           f"dots {_dots_summary(r.get('dots', []))}, SASS {r.get('sass_mma')}")
    for r in ok:
        scalar = r.get("scalar_16bit") or {}
        if r.get("source_dots") and sum(scalar.values()) > SCALAR_16BIT_LIMIT:
            out.append(f"SCALAR 2-BYTE ACCESSES {r['kernel']} {r['config']} {r['dtype']} {r['spec']}: "
                       f"{scalar.get('ld', 0)} loads / {scalar.get('st', 0)} stores per thread not vectorised")
    for r in ok:
        if r.get("smem", 0) > SM90_SMEM_PER_BLOCK:
            out.append(f"SHARED MEMORY {r['kernel']} {r['config']} {r['dtype']} {r['spec']}: "
                       f"{r['smem'] / 1024:.1f} KB > 227 KB per block (the launch would fail)")
    # Dots left on mma.sync although the dtype could use wgmma, per kernel and config.
    why: dict[tuple, dict] = {}
    for r in ok:
        if not registry.DTYPES[r["dtype"]].tensor_cores:
            continue
        for d in r.get("source_dots", []):
            if d["wgmma_blockers"]:
                entry = why.setdefault((r["kernel"], r["config"]), {"shapes": set(), "reasons": set(), "dots": 0})
                entry["shapes"].add(f"{d['m']}x{d['n']}x{d['k']}")
                entry["reasons"].update(d["wgmma_blockers"])
        entry = why.get((r["kernel"], r["config"]))
        if entry:
            entry["dots"] = max(entry["dots"], len(r["source_dots"]))
    for (kernel, config), e in sorted(why.items()):
        out.append(f"no wgmma: {kernel} {config}: dots MxNxK {', '.join(sorted(e['shapes']))} "
                   f"(of {e['dots']} per row) fail Triton's MMAv3 rule: {', '.join(sorted(e['reasons']))}")
    if pruned:
        out.append(f"({len(pruned)} rows are shipped configs the autotuner prunes for that dtype and case "
                   f"(kernels/common.prune_by_size); they never run there and are left out of these findings)")
    return out


def environment() -> dict:
    import triton

    ptxas = triton_ptxas()
    version = None
    if ptxas:
        with contextlib.suppress(Exception):
            text = _run([ptxas, "--version"])
            m = re.search(r"release ([\d.]+)", text)
            version = f"ptxas {m.group(1)}" if m else text.strip().splitlines()[-1]
    return {"triton": triton.__version__, "ptxas": ptxas, "ptxas_version": version,
            "cuobjdump": nvidia_tool("cuobjdump"), "target": "cuda sm_90a (GPUTarget('cuda', 90, 32))"}


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m relaxedconv.kernels.report", description=__doc__.split("\n\n")[0])
    p.add_argument("--dtypes", default=",".join(registry.DEFAULT_DTYPES),
                   help=f"comma-separated, of {', '.join(registry.DTYPES)} (default: %(default)s)")
    p.add_argument("--filter", action="append", default=[], metavar="TEXT",
                   help="keep rows whose 'kernel config dtype spec' contains TEXT (repeatable: any matches)")
    p.add_argument("--quick", action="store_true",
                   help="one config per kernel per dtype: the largest tile per warp (most likely to spill)")
    p.add_argument("--jobs", type=int, default=1, help="parallel compiles (default 1)")
    p.add_argument("--json", metavar="PATH", help="also write the rows and findings as JSON")
    args = p.parse_args(argv)
    args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    unknown = [d for d in args.dtypes if d not in registry.DTYPES]
    if unknown or not args.dtypes:
        p.error(f"unknown dtype(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(registry.DTYPES)}")
    if args.jobs < 1:
        p.error("--jobs must be at least 1")
    return args


def _reexec_without_interpreter(argv) -> None:
    """The interpreter replaces @triton.jit functions when the kernels are imported, which may
    have happened already (relaxedconv's own imports): start again without it."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    os.execve(sys.executable, [sys.executable, "-m", "relaxedconv.kernels.report", *argv], env)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        _reexec_without_interpreter(argv)
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as e:
        print(f"SKIP: this Triton cannot compile ahead of time ({e})")
        return SKIP
    jobs, broken = plan(args.dtypes, args.filter, args.quick)
    if not jobs and not broken:
        print("no (kernel, config, dtype) matches the filters", file=sys.stderr)
        return 2
    # A private cache: every row is really compiled (so ptxas's log and the compile time are its
    # own), and nothing stale is read. Fusion stays as Triton's default (on) without its warning.
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    with tempfile.TemporaryDirectory(prefix="kernel-report-cache-") as cache:
        os.environ["TRITON_CACHE_DIR"] = cache
        t0 = time.perf_counter()
        rows = broken + run_jobs(jobs, args.jobs)
        wall = time.perf_counter() - t0
    unregistered = sorted(set(registry.jit_kernels_in_package()) - {k.fn for k in registry.KERNELS})
    found = findings(rows, unregistered)
    env = environment()
    command = "python -m relaxedconv.kernels.report " + " ".join(shlex.quote(a) for a in argv)
    header = (f"# {command}\n# {datetime.date.today().isoformat()}, triton {env['triton']}, "
              f"{env['ptxas_version'] or 'ptxas ?'}, target {env['target']}; {len(rows)} rows in {wall:.0f} s\n"
              "# regs/spills: ptxas -v and the cubin; smem: Triton's shared-memory allocation per block; "
              "occ: theoretical resident warps per SM (of 64); loop: SASS instructions in the widest loop")
    print(header)
    print(table(rows))
    print("\nFindings:" if found else "\nFindings: none")
    for f in found:
        print("- " + f)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"command": command, "date": datetime.date.today().isoformat(),
                                               "environment": env, "wall_s": round(wall, 1), "rows": rows,
                                               "unregistered": unregistered, "findings": found}, indent=1))
    return 1 if any(not r["ok"] for r in rows) or unregistered else 0


if __name__ == "__main__":
    sys.exit(main())
