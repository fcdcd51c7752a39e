"""pytest-benchmark entries for a few of the layer cases (relaxedconv.benchmark.cases).

Not collected by CI (which runs ``pytest tests``). Run from the repository root:

    python -m pytest bench/test_bench_layers.py --benchmark-only                     # CPU: scaled-down cases
    python -m pytest bench/test_bench_layers.py --benchmark-json bench/results/pb.json

Each round is one forward + backward, ended by ``torch.cuda.synchronize()`` on a GPU so the wall
time covers the kernels, not only their launch. One untimed warm-up call (Triton autotuning,
cuDNN algorithm search) precedes the rounds. bf16 on a GPU, fp32 on CPU; ``triton`` only on a GPU.
"""
import pytest
import torch

from relaxedconv.benchmark import cases as cases_mod
from relaxedconv.benchmark.flops import case_macs, pass_flops
from relaxedconv.benchmark.layer_bench import LAYER_BACKENDS, precision, table_refusal

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPE_NAME = "bf16" if CUDA else "fp32"
DTYPE = torch.bfloat16 if CUDA else torch.float32
CASES = ("G1", "G4", "T1", "T2")
BACKENDS = tuple(b for b in LAYER_BACKENDS if b != "factored_torch")  # the backend table's, and auto

if CUDA:
    torch.backends.cudnn.benchmark = True


def _case(name):
    case = cases_mod.CASES[name]
    return case if CUDA else cases_mod.cpu_scaled(case)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", CASES)
def test_layer_fwd_bwd(benchmark, name, backend):
    case = _case(name)
    refusal = table_refusal(case, DTYPE_NAME, backend, DEVICE)  # what the backend table says cannot run here
    if refusal is not None:
        pytest.skip(f"{backend}: {refusal[0]}: {refusal[1]}")
    torch.manual_seed(0)
    layer = cases_mod.build_layer(case, DEVICE)
    x = cases_mod.make_input(case, DEVICE, DTYPE)
    dy = torch.randn(case.batch, case.out_channels * case.group_order, case.out_size, case.out_size,
                     device=DEVICE, dtype=DTYPE)

    def step():
        x.grad = None
        for p in layer.parameters():
            p.grad = None
        layer(x, backend=backend).backward(dy)
        if CUDA:
            torch.cuda.synchronize()

    macs = case_macs(case)
    benchmark.group = f"{name} {DTYPE_NAME} fwd+bwd"
    benchmark.extra_info.update(
        case=case.to_dict(), dtype=DTYPE_NAME, device=str(DEVICE),
        card=torch.cuda.get_device_name() if CUDA else "cpu",
        fwdbwd_flops_direct=pass_flops(macs["direct"], "fwdbwd"),
        fwdbwd_flops_factored=pass_flops(macs["factored"], "fwdbwd"),
    )
    with precision(DTYPE_NAME):
        step()  # warm-up: compilation, autotuning, cuDNN algorithm search
        benchmark.pedantic(step, rounds=10 if CUDA else 3, iterations=1, warmup_rounds=2 if CUDA else 0)
