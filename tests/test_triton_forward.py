"""The fused forward kernel against materialize (R1), under the interpreter on CPU or on CUDA."""
import copy

import pytest
import torch

import relaxedconv as rc
from _triton_cases import CASES, DEVICE, case_id, make_layer, rel_err


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_forward_matches_materialize_fp32(case, poisoned_outputs, exact_fp32):
    torch.manual_seed(0)
    layer, x = make_layer(case, dtype=torch.float32)
    with torch.no_grad():
        y = layer(x, backend="triton")
        ref = copy.deepcopy(layer).double()(x.double(), backend="materialize")
    assert y.dtype == torch.float32 and y.shape == ref.shape
    assert not torch.isnan(y).any(), "an output tile was never written"
    assert rel_err(y, ref) < 1e-5


@pytest.mark.parametrize("case", [c for c in CASES if c[6]] + [CASES[0]], ids=case_id)
def test_several_positions_per_program_fp64(case, poisoned_outputs, monkeypatch):
    """``u`` with 3 positions per program (the configs for short windows; here also where the
    positions do not divide evenly and where a window takes more than one K step)."""
    monkeypatch.setenv("RELAXEDCONV_KERNEL_CONFIG", "u:POSITIONS=3")
    torch.manual_seed(4)
    layer, x = make_layer(case, dtype=torch.float64)
    with torch.no_grad():
        y = layer(x, backend="triton")
        assert not torch.isnan(y).any(), "an output tile was never written"
        assert rel_err(y, layer(x, backend="materialize")) < 1e-12


@pytest.mark.parametrize("case", CASES[::3], ids=case_id)
def test_forward_matches_materialize_fp64(case, poisoned_outputs):
    torch.manual_seed(1)
    layer, x = make_layer(case, dtype=torch.float64)
    with torch.no_grad():
        assert rel_err(layer(x, backend="triton"), layer(x, backend="materialize")) < 1e-12


@pytest.mark.skipif(DEVICE != "cuda", reason="half precision is checked on CUDA (the interpreter has no bf16)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_forward_half_precision_cuda(case, dtype):
    torch.manual_seed(2)
    layer, x = make_layer(case, dtype=torch.float32)
    with torch.no_grad():
        y = layer(x.to(dtype), backend="triton")
        ref = layer(x, backend="materialize")
    assert y.dtype == dtype
    assert rel_err(y, ref) < 1e-2


@pytest.mark.skipif(DEVICE != "cuda", reason="tf32 exists on CUDA only")
def test_forward_tf32_cuda():
    torch.manual_seed(3)
    layer, x = make_layer(CASES[0], dtype=torch.float32)
    torch.backends.cuda.matmul.allow_tf32 = True  # conftest's _process_flags_restored puts it back
    with torch.no_grad():
        assert rel_err(layer(x, backend="triton"), layer(x.double(), backend="materialize")) < 3e-3


def test_triton_refuses_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    layer = rc.LiftingConv(1, 2, 3, 4)
    with pytest.raises(ValueError, match="CUDA"):
        layer(torch.randn(1, 1, 5, 5), backend="triton")


def test_auto_never_picks_a_path_that_refuses():
    """Every configuration, on CPU and on CUDA (the rule, evaluated for a CUDA device)."""
    from relaxedconv import dispatch

    torch.manual_seed(4)
    for case in CASES:
        layer, x = make_layer(case, dtype=torch.float64, device="cpu")
        choice = dispatch.choose_backend(layer, x)
        assert choice != "triton", "CPU must never pick triton"
        layer(x, backend=choice)  # must not raise
        for have_triton in (True, False):
            cuda_choice = dispatch.backend_rule(layer, "cuda", have_triton)
            if layer.translation_nonstationary:
                assert cuda_choice == ("triton" if have_triton else "factored_torch")
            else:
                assert cuda_choice in ("factored_torch", "expand_conv")
            if cuda_choice != "triton":
                layer(x, backend=cuda_choice)


def test_static_rule_prefers_the_factored_form_for_wide_stationary_layers():
    """design.md §2: factored/direct = H'/C_out + H'/(N_in K^2); wide layers take the factored form
    (cuDNN/oneDNN convolution for U, then cuBLAS), on every device and dtype."""
    from relaxedconv import dispatch

    wide = rc.GroupConv(128, 128, 7, 8)  # 33/128 + 33/392 = 0.34
    narrow = rc.GroupConv(32, 32, 7, 8)  # 33/32 + ... > 1
    for device_type in ("cuda", "cpu"):
        for dtype in (torch.bfloat16, torch.float32, torch.float64):
            assert dispatch.backend_rule(wide, device_type, True, dtype) == "factored_torch"
            assert dispatch.backend_rule(narrow, device_type, True, dtype) == "expand_conv"


def test_autocast_runs_the_kernel_in_the_autocast_dtype():
    device_type = "cuda" if DEVICE == "cuda" else "cpu"
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float16
    if DEVICE != "cuda":
        pytest.skip("CPU autocast to fp16 is not what users run; checked on CUDA with bf16")
    torch.manual_seed(5)
    layer, x = make_layer(CASES[0], dtype=torch.float32)
    with torch.autocast(device_type, dtype=dtype):
        y = layer(x, backend="triton")
    assert y.dtype == dtype
    y.float().sum().backward()
    assert layer.kernel_net.out.weight.grad is not None


def test_static_rule_sends_translation_relaxed_layers_to_triton_on_cuda_only():
    from relaxedconv import dispatch

    trans = rc.GroupConv(8, 8, 3, 4, translation_nonstationary=True)
    for dtype in (torch.bfloat16, torch.float32, torch.float64):
        assert dispatch.backend_rule(trans, "cuda", True, dtype) == "triton"
        assert dispatch.backend_rule(trans, "cuda", False, dtype) == "factored_torch"
        assert dispatch.backend_rule(trans, "cpu", True, dtype) == "factored_torch"


