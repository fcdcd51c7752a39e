"""The kernel report (``python -m relaxedconv.kernels.report``): every kernel compiles for an
H100/H200 (sm_90a) ahead of time, on the CPU, and what ptxas and the SASS say about it holds.

The interpreter tests check the kernels' arithmetic, but the interpreter accepts programs the GPU
compiler rejects (tl.dot shapes and dtypes, constexpr branches) and says nothing about registers,
spills or tensor cores. The report runs in a subprocess without TRITON_INTERPRET (which would turn
the kernels into interpreted functions) on a quick subset: one config per kernel, bf16 and tf32,
every specialisation. The parsing helpers are checked on fixed compiler output below.
"""
import json
import os
import re
import subprocess
import sys
from collections import Counter
from types import SimpleNamespace

import pytest
import triton

from relaxedconv.kernels import registry, report

QUICK_DTYPES = ("bf16", "fp32-tf32")
TRITON = tuple(int(x) for x in re.findall(r"\d+", triton.__version__)[:2])


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("kernel-report") / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "relaxedconv.kernels.report", "--quick", "--jobs", "2",
           "--dtypes", ",".join(QUICK_DTYPES), "--json", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    if r.returncode == report.SKIP:
        pytest.skip(r.stdout.strip())
    assert out.exists(), f"no JSON written (exit {r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    return r, json.loads(out.read_text())


def _rows(data, dtype=None):
    return [row for row in data["rows"] if dtype is None or row["dtype"] == dtype]


def _name(row):
    return f"{row['kernel']} {row['config']} {row['dtype']} {row['spec']}"


def test_every_registered_kernel_compiles_for_sm90(quick_report):
    r, data = quick_report
    failed = [f"{_name(row)}: {row.get('error')}" for row in data["rows"] if not row["ok"]]
    assert not failed, "\n".join(failed)
    assert not data["unregistered"], f"kernels missing from kernels/registry.py: {data['unregistered']}"
    assert r.returncode == 0, r.stderr[-3000:]
    seen = Counter((row["kernel"], row["dtype"]) for row in data["rows"])
    for kernel in registry.KERNELS:
        for dtype in QUICK_DTYPES:
            launched = kernel.dtypes is None or dtype in kernel.dtypes
            assert seen[(kernel.name, dtype)] == (len(registry.specialisations(kernel)) if launched else 0), (kernel.name, dtype)


def test_report_reads_registers_spills_and_shared_memory(quick_report):
    _, data = quick_report
    for row in data["rows"]:
        for key in ("regs", "spill_stores", "spill_loads", "stack", "smem", "occupancy_warps"):
            assert isinstance(row.get(key), int), f"{_name(row)}: {key} = {row.get(key)!r}"
        assert 0 < row["regs"] <= 255 and row["smem"] > 0, _name(row)
        assert row["sass_mma"] is not None, _name(row)
        assert bool(row["dots"]) == bool(row["source_dots"]), _name(row)


def test_bf16_and_tf32_dots_run_on_tensor_cores(quick_report):
    _, data = quick_report
    off = [f"{_name(row)}: SASS {row['sass_mma']}, dots {[d['kind'] for d in row['dots']]}"
           for row in data["rows"] if row["source_dots"]  # the fold has no dot: a memory gather
           if row["sass_mma"] not in ("HGMMA", "HMMA", "HGMMA+HMMA") or any(d["kind"] == "fma" for d in row["dots"])]
    assert not off, "\n".join(off)


def test_no_bf16_config_of_the_quick_subset_spills(quick_report):
    _, data = quick_report
    spills = [f"{_name(row)}: {row['spill_stores']} B stores / {row['spill_loads']} B loads"
              for row in _rows(data, "bf16") if row["spill_stores"] or row["spill_loads"]]
    assert not spills, "\n".join(spills)


def test_every_bf16_gemm_of_the_quick_subset_issues_wgmma(quick_report):
    """The gather-GEMMs stage aligned vectors in shared memory, so Triton lowers their dots to
    Hopper's wgmma (HGMMA) rather than mma.sync at the shipped 128-row tiles."""
    _, data = quick_report
    off = [f"{_name(row)}: SASS {row['sass_mma']}" for row in _rows(data, "bf16")
           if row["source_dots"] and row["sass_mma"] not in ("HGMMA", "HGMMA+HMMA")]
    assert not off, "\n".join(off)


def test_no_bf16_gemm_of_the_quick_subset_gathers_element_by_element(quick_report):
    """Every bf16 gather-GEMM moves its data as vectors: at most the tail column's 8 scalar 2-byte
    accesses per thread (with the window masks as jj < J, T2's u gathered 64 scalars per thread
    and v stored 64)."""
    _, data = quick_report
    scalar = [f"{_name(row)}: {row['scalar_16bit']}" for row in _rows(data, "bf16")
              if row["source_dots"] and sum(row["scalar_16bit"].values()) > report.SCALAR_16BIT_LIMIT]
    assert not scalar, "\n".join(scalar)


def test_scalar_16bit_accesses_are_counted_apart_from_vectors():
    ptx = """
    @%p1 ld.global.b16 { %rs1 }, [ %rd1 + 0 ];
    ld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd2 + 0 ];
    @%p2 st.global.b16 [ %rd3 + 0 ], { %rs2 };
    st.global.v4.b32 [ %rd4 + 0 ], { %r5, %r6, %r7, %r8 };
    ld.global.nc.L1::evict_last.b16 %rs3, [%rd5];
    cp.async.cg.shared.global [ %r9 + 0 ], [ %rd6 + 0 ], 0x10, %r10;
    ld.shared.b16 %rs4, [%r11];
    """
    assert report.scalar_16bit_accesses(ptx) == {"ld": 2, "st": 1}


# --- the parsers, on fixed compiler output -------------------------------------------------------

PTXAS_LOG = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_k' for 'sm_90a'
ptxas info    : Function properties for _k
    24 bytes stack frame, 28 bytes spill stores, 20 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers
"""


def test_parse_ptxas_log():
    assert report.parse_ptxas_log(PTXAS_LOG) == {"regs": 255, "stack": 24, "spill_stores": 28, "spill_loads": 20}
    assert report.parse_ptxas_log("ptxas info : 0 bytes gmem") is None


def test_parse_resource_usage():
    text = " Function _k:\n  REG:244 STACK:0 SHARED:1024 LOCAL:0 CONSTANT[0]:680 TEXTURE:0"
    assert report.parse_resource_usage(text) == {"regs": 244, "stack": 0, "shared_static": 1024, "local": 0}


def test_sass_opcodes_and_mma_kind():
    sass = """
        /*0a10*/                   HGMMA.64x32x16.F32.BF16 R24, gdesc[UR4], R24 ;
        /*0a20*/               @P0 HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
        /*0a30*/              @!P1 FFMA R1, R2, R3, R1 ;
        /*0a40*/                   STL.64 [R1+0x8], R2 ;
    """
    counts = report.sass_opcodes(sass)
    assert counts == Counter({"HGMMA": 1, "HMMA": 1, "FFMA": 1, "STL": 1})
    assert report.sass_mma(counts) == "HGMMA+HMMA"
    assert report.sass_mma(Counter({"FFMA": 3})) == "FMA"


def test_main_loop_instructions_counts_the_widest_loop_with_its_inner_loops():
    sass = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   LDG.E R2, desc[UR4][R4.64] ;
        /*0020*/                   FFMA R3, R2, R2, R3 ;
        /*0030*/                   MUFU.SIN R5, R3 ;
        /*0040*/              @!P0 BRA 0x20 ;
        /*0050*/                   FADD R3, R3, 1 ;
        /*0060*/               @P1 BRA `(.L_x_3) 0x10 ;
        /*0070*/                   STG.E desc[UR4][R6.64], R3 ;
        /*0080*/                   EXIT ;
        /*0090*/                   BRA 0x90;
    """
    # the loop 0x10..0x60 (6 instructions, the inner one 0x20..0x40 inside it); the BRA to itself
    # at 0x90 is the end-of-kernel trap, not a loop
    assert report.main_loop_instructions(sass) == 6
    assert report.main_loop_instructions(sass.replace("@P1 BRA `(.L_x_3) 0x10", "@P1 BRA 0x80")) == 3
    assert report.main_loop_instructions("        /*0000*/   EXIT ;") is None


TTGIR = """#mma = #ttg.nvidia_mma<{versionMajor = 3, versionMinor = 0, warpsPerCTA = [4, 1], instrShape = [16, 32, 16]}>
#mma1 = #ttg.nvidia_mma<{versionMajor = 2, versionMinor = 0, warpsPerCTA = [4, 1], instrShape = [16, 8]}>
    %u = ttng.warp_group_dot %a, %b, %c {inputPrecision = 0 : i32, isAsync = true} : !ttg.memdesc<64x32xbf16, #shared, #smem> * !ttg.memdesc<32x16xbf16, #shared, #smem> -> tensor<64x16xf32, #mma> loc(#loc1)
    %w = ttng.warp_group_dot_wait %u, %a {pendings = 0 : i32} : tensor<64x16xf32, #mma>, !ttg.memdesc<64x32xbf16, #shared, #smem> loc(#loc1)
    %v = ttng.warp_group_dot %x, %y, %z {inputPrecision = 0 : i32} : tensor<64x16xbf16, #ttg.dot_op<{opIdx = 0, parent = #mma, kWidth = 2}>> * !ttg.memdesc<16x32xbf16, #shared, #smem> -> tensor<64x32xf32, #mma> loc(#loc2)
    %d = tt.dot %p, %q, %r, inputPrecision = tf32 : tensor<32x64xbf16, #ttg.dot_op<{opIdx = 0, parent = #mma1, kWidth = 8}>> * tensor<64x32xbf16, #ttg.dot_op<{opIdx = 1, parent = #mma1, kWidth = 8}>> -> tensor<32x32xf32, #mma1> loc(#loc3)
    %f = tt.dot %p, %q, %r, inputPrecision = ieee : tensor<16x16xf32, #ttg.dot_op<{opIdx = 0, parent = #blocked}>> * tensor<16x16xf32, #ttg.dot_op<{opIdx = 1, parent = #blocked}>> -> tensor<16x16xf32, #blocked> loc(#loc4)
"""


def test_ttgir_dots_tell_wgmma_mma_sync_and_fma_apart():
    dots = report.ttgir_dots(TTGIR)
    assert [(d["kind"], d["m"], d["n"], d["k"], d["a_in"]) for d in dots] == [
        ("wgmma", 64, 16, 32, "smem"), ("wgmma", 64, 32, 16, "regs"), ("mma.sync", 32, 32, 64, None),
        ("fma", 16, 16, 16, None)]


def test_wgmma_blockers_follow_tritons_mmav3_rule():
    dot = {"m": 64, "n": 32, "k": 32, "elem": "bf16", "precision": None}
    assert report.wgmma_blockers(dot, 4) == []
    assert report.wgmma_blockers(dot, 2) == ["num_warps=2 not a multiple of 4"]
    assert report.wgmma_blockers(dict(dot, m=32), 4) == ["M=32 not a multiple of 64"]
    assert report.wgmma_blockers(dict(dot, k=8), 8) == ["K=8 < 16"]
    assert report.wgmma_blockers(dict(dot, elem="f32", k=8, precision="tf32"), 4) == []
    assert report.wgmma_blockers(dict(dot, elem="f32", k=8, precision="tf32x3"), 4) == []  # three tf32 dots
    assert report.wgmma_blockers(dict(dot, elem="f32", precision="ieee"), 4) == ["f32 ieee has no tensor-core form"]


def test_occupancy_is_limited_by_registers_and_shared_memory():
    assert report.occupancy_warps(32, 4, 0) == 64  # nothing limits: the 64-warp ceiling
    assert report.occupancy_warps(255, 4, 0) == 8  # 255 -> 256 registers: 8 warps of 8192
    assert report.occupancy_warps(64, 4, 100 * 1024) == 8  # two 101 KB blocks fit in 228 KB


# --- the registry: signatures derived from the jit function --------------------------------------

def _fake_fn(*args):
    """A stand-in for a @triton.jit function: (name, is_constexpr) pairs."""
    params = [SimpleNamespace(name=n, is_constexpr=c, has_default=False, do_not_specialize=False,
                              do_not_specialize_on_alignment=False) for n, c in args]
    return SimpleNamespace(arg_names=[n for n, _ in args], params=params, __name__="_fake_kernel")


FAKE = _fake_fn(("x_ptr", False), ("out_ptr", False), ("n", False), ("sx", False), ("sy", False),
                ("ACC", True), ("PRECISION", True), ("PER_POSITION", True), ("BLOCK_M", True))


def test_compile_signature_follows_the_jit_signature_and_launch_rules():
    entry = registry.Kernel("fake", "m:f", fixed={"BLOCK_M": 16}, axes=(registry.LAYOUT,),
                            pointers={"out_ptr": registry.ACC},
                            ints={"*": {"sx": 1, "n": 64}, "per-position": {"sy": 48}})
    config = registry.LaunchConfig("M64", {"BLOCK_M": 64}, 4, 2)
    sig, consts, attrs = registry.compile_signature(
        FAKE, entry, registry.DTYPES["bf16"], config, "per-position", {"PER_POSITION": True})
    assert sig["x_ptr"] == "*bf16" and sig["out_ptr"] == "*fp32"  # partial sums in the accumulator dtype
    assert sig["n"] == "i32" and attrs[(2,)] == [["tt.divisibility", 16]]  # 64: a multiple of 16
    assert sig["sx"] == "constexpr" and consts["sx"] == 1  # Triton makes an argument equal to 1 a constant
    assert sig["sy"] == "i32" and attrs[(4,)] == [["tt.divisibility", 16]]  # from the per-position variant
    assert consts["BLOCK_M"] == 64 and consts["PER_POSITION"] is True and consts["PRECISION"] is None
    sig, consts, attrs = registry.compile_signature(
        FAKE, entry, registry.DTYPES["fp64"], config, "stationary", {"PER_POSITION": False})
    assert sig["x_ptr"] == "*fp64" and sig["out_ptr"] == "*fp64" and sig["sy"] == "i32" and (4,) not in attrs


def test_compile_signature_names_stale_registry_entries():
    config = registry.LaunchConfig("M64", {"BLOCK_M": 64, "BLOCK_Q": 8}, 4, 2)
    entry = registry.Kernel("fake", "m:f", fixed={}, constexprs={"PER_POSITION": False})
    with pytest.raises(registry.RegistryError, match="no argument 'BLOCK_Q'"):
        registry.compile_signature(FAKE, entry, registry.DTYPES["bf16"], config, "-", {})
    with pytest.raises(registry.RegistryError, match="no value for constexpr 'PER_POSITION'"):
        registry.compile_signature(FAKE, registry.Kernel("fake", "m:f", fixed={}), registry.DTYPES["bf16"],
                                   registry.LaunchConfig("M64", {"BLOCK_M": 64}, 4, 2), "-", {})
    with pytest.raises(registry.RegistryError, match="has no 'gone_kernel'"):
        registry.resolve("relaxed_conv_fwd:gone_kernel")


def test_shipped_configs_are_the_autotune_configs_plus_the_fixed_launch():
    fwd = next(k for k in registry.KERNELS if k.name == "u")
    tuned = registry.resolve(fwd.autotuner).configs
    configs = registry.shipped_configs(fwd, registry.DTYPES["bf16"])
    assert len(configs) == len(tuned) + 1 and configs[-1].fixed and configs[-1].num_warps == 4
    assert [c.meta for c in configs[:-1]] == [c.kwargs for c in tuned]
    assert [c.fixed for c in registry.shipped_configs(fwd, registry.DTYPES["fp64"])] == [True]  # fp64 never autotunes


def _row(dtype, **kw):
    base = {"kernel": "fwd", "config": "M64", "dtype": dtype, "spec": "-", "ok": True, "regs": 128,
            "spill_stores": 0, "spill_loads": 0, "smem": 4096, "sass_mma": "HGMMA",
            "dots": [{"kind": "wgmma"}], "source_dots": []}
    return {**base, **kw}


def test_findings_name_what_to_fix_and_nothing_else():
    rows = [
        _row("bf16"),  # clean
        _row("bf16", spec="spilling", regs=255, spill_stores=64, spill_loads=32),
        _row("fp32-tf32", spec="on-fma", sass_mma="FMA", dots=[{"kind": "fma"}],
             source_dots=[{"m": 64, "n": 64, "k": 64, "wgmma_blockers": []}]),
        _row("bf16", spec="gather-only", sass_mma="FMA", dots=[]),  # no tl.dot (the fold): not a finding
        _row("fp32-ieee", sass_mma="FMA", dots=[{"kind": "fma"}]),  # exact fp32 has no tensor-core form
        _row("bf16", spec="big", smem=300 * 1024),
        {"kernel": "bwd-dz", "config": "M64", "dtype": "bf16", "spec": "-", "ok": False, "error": "boom"},
        _row("bf16", spec="narrow",
             source_dots=[{"m": 32, "n": 32, "k": 64, "wgmma_blockers": ["M=32 not a multiple of 64"]}]),
    ]
    found = report.findings(rows, ["relaxed_conv_new:_new_kernel"])
    assert len(found) == 6, found
    assert any(f.startswith("SPILLS fwd M64 bf16 spilling: 64 B stores / 32 B loads") for f in found)
    assert any(f.startswith("NO TENSOR CORES fwd M64 fp32-tf32 on-fma") for f in found)
    assert any(f.startswith("SHARED MEMORY fwd M64 bf16 big: 300.0 KB") for f in found)
    assert any(f.startswith("COMPILE FAILED bwd-dz") for f in found)
    assert any("UNREGISTERED kernel relaxed_conv_new:_new_kernel" in f for f in found)
    assert any(f.startswith("no wgmma: fwd M64: dots MxNxK 32x32x64") for f in found)


def test_findings_leave_out_configs_the_autotuner_prunes():
    rows = [_row("fp32-ieee", spec="pruned", regs=255, spill_stores=9000, autotune_reachable=False),
            _row("fp32-tf32", spec="pruned", smem=300 * 1024, autotune_reachable=False)]
    found = report.findings(rows, [])
    assert found == [found[-1]] and "2 rows are shipped configs the autotuner prunes" in found[-1]


def test_the_registry_knows_which_shipped_configs_the_autotuner_keeps():
    u = next(k for k in registry.KERNELS if k.name == "u")
    spec = dict(registry.specialisations(u))["T1"]
    configs = {c.label: c for c in registry.shipped_configs(u, registry.DTYPES["fp32-ieee"])}
    big, small = configs["M128-N64-K64-POSITIONS1-w4-s3"], configs["M64-N32-K64-POSITIONS1-w4-s4"]
    assert registry.autotuner_keeps(u, registry.DTYPES["fp32-ieee"], big, "T1", spec) is False
    assert registry.autotuner_keeps(u, registry.DTYPES["fp32-ieee"], small, "T1", spec) is True
    assert registry.autotuner_keeps(u, registry.DTYPES["bf16"], big, "T1", spec) is True
    fixed = next(c for c in configs.values() if c.fixed)
    assert registry.autotuner_keeps(u, registry.DTYPES["fp32-ieee"], fixed, "T1", spec) is None
