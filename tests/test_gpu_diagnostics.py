"""The two GPU diagnosis tools run end to end on the CPU (so they work when a GPU session has
minutes to spend): the layer time split and the synchronised launch trace."""
import dataclasses
import json

import torch

from relaxedconv.benchmark import cases as cases_mod
from relaxedconv.benchmark import time_split
from relaxedconv.kernels import launch_trace

TINY = dataclasses.replace(cases_mod.CASES["T2"], batch=1, size=4, in_channels=2, out_channels=2, kernel_size=3, hidden=4)


def test_time_split_reports_each_part(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(cases_mod.CASES, "TINY", TINY)
    monkeypatch.setattr(cases_mod, "cpu_scaled", lambda case: case)
    out = tmp_path / "split.json"
    assert time_split.main(["--cases", "TINY", "--backends", "factored_torch,materialize", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["backend"] for r in rows] == ["factored_torch", "materialize"]
    for r in rows:
        for part in ("whole", "kernel_net", "conv"):
            assert r[part]["wall_ms"] > 0 and r[part]["aten_ops"] > 0
        # the whole layer runs the kernel net and the convolution: at least the larger part's operators
        assert r["whole"]["aten_ops"] >= max(r["kernel_net"]["aten_ops"], r["conv"]["aten_ops"])
    assert "kernel_net" in capsys.readouterr().out


def test_device_time_counts_each_kernel_once():
    # Kineto's averaged events as a CUDA profile lists them: the launching operator carries its
    # kernel's time as self device time, and the kernel is an event of its own.
    from types import SimpleNamespace as E

    from torch.autograd import DeviceType

    events = [E(key="aten::mm", device_type=DeviceType.CPU, self_device_time_total=40.0, is_user_annotation=False),
              E(key="nvjet_gemm", device_type=DeviceType.CUDA, self_device_time_total=40.0, is_user_annotation=False),
              E(key="MyFunction", device_type=DeviceType.CPU, self_device_time_total=7.0, is_user_annotation=False),
              E(key="_triton_kernel", device_type=DeviceType.CUDA, self_device_time_total=7.0, is_user_annotation=False),
              E(key="## step ##", device_type=DeviceType.CUDA, self_device_time_total=47.0, is_user_annotation=True)]
    assert time_split.device_time_us(events) == 47.0


# Compiled kernels on a GPU (fp32: Triton's fp64 dots run only in the interpreter), else the interpreter.
DEVICE, DTYPE = (torch.device("cuda"), "fp32") if torch.cuda.is_available() else (torch.device("cpu"), "fp64")


def test_launch_trace_names_each_kernel_and_reports_a_fault(monkeypatch):
    lines = []
    assert launch_trace.trace(TINY, DTYPE, DEVICE, log=lines.append), lines
    launched = [s.split()[1] for s in lines if s.startswith("launch ")]
    assert {"u", "dz", "v", "fold"} <= set(launched) and lines[-1] == f"PASS T2 {DTYPE}"

    class Faulting:  # a kernel whose launch raises, as a faulting one does at its synchronisation
        def __getitem__(self, grid):
            def run(*args, **kwargs):
                raise RuntimeError("an illegal memory access was encountered")

            return run

    fault = Faulting()

    from relaxedconv.kernels import relaxed_conv_bwd

    monkeypatch.setattr(relaxed_conv_bwd, "_window_columns_kernel", fault)
    lines.clear()
    assert not launch_trace.trace(TINY, DTYPE, DEVICE, log=lines.append)
    assert lines[-1] == f"FAIL T2 {DTYPE}"
    assert [s for s in lines if s.startswith("launch ")][-1] == "launch v"  # the faulting kernel is the last launched
    assert "illegal memory access" in lines[-2]
