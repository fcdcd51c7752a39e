"""Operation counts of design.md §2, in multiply-adds (MACs); FLOPs are twice that.

For a layer with batch B, P output positions, N output rotations, N_in input rotations, C_in/C_out
channels per rotation, kernel K x K and hidden width H (H' = H + 1 with the bias column):

- direct (the convolution with the expanded filter bank): ``B*P*N*C_out*C_in*N_in*K^2``
- factored: ``B*P*N*C_in*N_in*K^2*H' + B*P*N*C_in*H'*C_out`` (U = X Z, then W_L U)

Dense counts: the disk mask's zeros are counted, as a dense kernel computes them. The backward pass
is counted as twice the forward (the gradients with respect to the input and to the weights/Z), so
forward + backward = 3x forward.
"""
from __future__ import annotations

BACKWARD_FACTOR = 2
FWD_BWD_FACTOR = 1 + BACKWARD_FACTOR


def direct_macs(*, batch, positions, out_rotations, in_rotations, in_channels, out_channels, kernel_size) -> int:
    return batch * positions * out_rotations * out_channels * in_channels * in_rotations * kernel_size**2


def factored_macs(*, batch, positions, out_rotations, in_rotations, in_channels, out_channels, kernel_size, hidden) -> int:
    hp = hidden + 1
    rows = batch * positions * out_rotations * in_channels
    return rows * in_rotations * kernel_size**2 * hp + rows * hp * out_channels


def case_macs(case) -> dict[str, int]:
    """Forward MACs of a :class:`~relaxedconv.benchmark.cases.Case`: {'direct': .., 'factored': ..}."""
    common = dict(
        batch=case.batch,
        positions=case.positions,
        out_rotations=case.group_order,
        in_rotations=case.in_rotations,
        in_channels=case.in_channels,
        out_channels=case.out_channels,
        kernel_size=case.kernel_size,
    )
    return {"direct": direct_macs(**common), "factored": factored_macs(**common, hidden=case.hidden)}


def pass_flops(macs_fwd: int, which: str) -> int:
    """FLOPs of one pass: which in {'fwd', 'bwd', 'fwdbwd'}."""
    factor = {"fwd": 1, "bwd": BACKWARD_FACTOR, "fwdbwd": FWD_BWD_FACTOR}[which]
    return 2 * macs_fwd * factor


def tflops(macs_fwd: int, which: str, ms) -> float | None:
    """Achieved TFLOP/s of a pass that took ``ms`` milliseconds (None when not measured)."""
    if ms is None or ms <= 0:
        return None
    return pass_flops(macs_fwd, which) / (ms * 1e-3) / 1e12
