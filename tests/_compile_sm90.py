"""Compile every Triton kernel for an H100 (sm_90a) ahead of time, no GPU needed.

Run as a script (the test runs it in a subprocess without TRITON_INTERPRET, which would make the
kernels interpreted functions). Prints one line per compile and exits 1 if any failed.
"""
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError as e:  # another Triton layout: nothing to check with this script
    print(f"SKIP: this Triton has no ahead-of-time compile API ({e})")
    sys.exit(77)

import relaxedconv.kernels.relaxed_conv_bwd as B  # noqa: E402
import relaxedconv.kernels.relaxed_conv_fwd as F  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
# dtype name -> (pointer dtype, input_precision, accumulator, fp64 flag)
DTYPES = {
    "bf16": ("bf16", None, tl.float32, False),
    "fp32-tf32": ("fp32", "tf32", tl.float32, False),
    "fp32-ieee": ("fp32", "ieee", tl.float32, False),
    "fp64": ("fp64", "ieee", tl.float64, True),
}
FIXED = {"BLOCK_M": 16, "BLOCK_J": 16, "BLOCK_O": 16}  # the non-autotuned launch (fp64, tests)


def compile_one(fn, ptr_dtype, consts, num_warps=4, num_stages=2, out_dtype=None):
    sig, constexprs = {}, {}
    for idx, name in enumerate(fn.arg_names):
        if fn.params[idx].is_constexpr:
            sig[name] = "constexpr"
            constexprs[name] = consts[name]
        elif name.endswith("_ptr"):
            sig[name] = "*" + (out_dtype if name == "out_ptr" and out_dtype else ptr_dtype)
        else:
            sig[name] = "i32"
    triton.compile(ASTSource(fn, sig, constexprs), target=TARGET,
                   options=dict(num_warps=num_warps, num_stages=num_stages))


def jobs():
    first_fwd = F._configs()[0]
    first_bwd = B._configs(True)[0]
    first_bank = B._dx_bank_autotuned.configs[0]
    for dname, (ptr, prec, acc, fp64) in DTYPES.items():
        base = dict(KSIZE=3, PRECISION=prec, ACC=acc, FP64=fp64)
        fwd_meta = FIXED if fp64 else first_fwd.kwargs
        bwd_meta = FIXED if fp64 else first_bwd.kwargs
        part = "fp64" if fp64 else "fp32"
        for bh, tail in ((32, True), (16, False)):
            for pp in (False, True):
                c = dict(base, PER_POSITION=pp, TAIL=tail, BLOCK_H=bh)
                tag = f"{dname} H{bh}{'+tail' if tail else ''} {'per-position' if pp else 'stationary'}"
                yield f"fwd {tag}", F._relaxed_conv_fwd_kernel, ptr, dict(c, HAS_BIAS=True, **fwd_meta), None
                yield f"dz  {tag}", B._relaxed_conv_bwd_dz_kernel, ptr, dict(c, **bwd_meta), part
                yield f"dw  {tag}", B._relaxed_conv_bwd_dw_kernel, ptr, dict(c, **bwd_meta), part
                if pp:
                    meta = {k: bwd_meta[k] for k in ("BLOCK_M", "BLOCK_O")}
                    yield f"dx  {tag}", B._relaxed_conv_bwd_dx_kernel, ptr, dict(c, BLOCK_NI=16, **meta), None
        bank_meta = dict(FIXED, BLOCK_C=16) if fp64 else first_bank.kwargs
        bank_meta = {k: bank_meta[k] for k in ("BLOCK_M", "BLOCK_O", "BLOCK_C")}
        yield f"dx-bank {dname}", B._relaxed_conv_bwd_dx_bank_kernel, ptr, dict(base, **bank_meta), None


def main() -> int:
    failed = 0
    for name, fn, ptr, consts, out_dtype in jobs():
        try:
            compile_one(fn, ptr, consts, out_dtype=out_dtype)
            print(f"ok   {name}", flush=True)
        except Exception as e:  # noqa: BLE001 - report every failure, then fail
            failed += 1
            print(f"FAIL {name}: {type(e).__name__}: {str(e)[:800]}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
