"""ATen operators of one layer's kernel net, forward + backward (``layer.factored_kernel`` then
backward), on the PyTorch path and with the fused kernel net (RELAXEDCONV_FUSED_KERNEL_NET=1).

    python bench/knet_opcount.py [T1 T2 G1 ...]      # benchmark cases (relaxedconv.benchmark.cases)

On CPU the fused path's Triton launches are stubbed out and counted instead of run: the
interpreter would add tensor copies of its own that a GPU launch does not make (the outputs are
then uninitialised; only the counts mean anything). On a GPU the kernels run.
"""
import dataclasses
import os
import sys

if __name__ == "__main__":
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from relaxedconv.benchmark import cases as C
    from relaxedconv.benchmark.opcount import OpCounter
    from relaxedconv.kernels import common

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    launches, real = [], common.launch

    def stub(name, *args, **kwargs):
        launches.append(name)

    names = sys.argv[1:] or ["T1", "T2", "G1"]
    unknown = [n for n in names if n not in C.CASES]
    if unknown:
        print(f"knet_opcount.py: unknown case(s) {', '.join(unknown)}; expected some of {', '.join(C.CASES)}",
              file=sys.stderr)
        sys.exit(2)
    for name in names:
        case = dataclasses.replace(C.CASES[name], batch=2)
        layer = C.build_layer(case, device)
        hw = (case.out_size,) * 2

        def knet():
            z, w = layer.factored_kernel(hw)
            (z.sum() + w.sum()).backward()

        for flag in ("0", "1"):
            os.environ["RELAXEDCONV_FUSED_KERNEL_NET"] = flag
            common.launch = stub if flag == "1" and device.type == "cpu" else real
            knet()  # builds the layer's caches (lattice, mask)
            launches.clear()
            with OpCounter() as c:
                knet()
            common.launch = real
            path = "fused " if flag == "1" else "PyTorch"
            print(f"{name} {path}: {c.total} ATen ops, Triton launches {launches or 'none'}; "
                  f"most frequent {c.counts.most_common(6)}")
