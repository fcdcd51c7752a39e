"""Tiny layer configurations for the kernel tests (the interpreter is slow: keep them tiny).

Together they cover C in {1, 3, 5}, N in {1, 3, 4}, K in {1, 3, 5}, H != W, batch 1 and 3,
lifting / group / pointwise layers, every non-stationarity setting, 'same' and 'valid',
more than one output-channel tile (C_out = 20 > 16), more than one J tile (J = 27, 75 > 16),
hidden widths with and without the separate b_L "tail" column (hidden 16 and 32: H+1 = 17, 33
-> dots over 16/32 columns plus a tail; hidden 8: H+1 = 9 padded to one 16-wide tile).
"""
import copy

import torch

import relaxedconv as rc

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (layer, C_in, C_out, N, K, rotation_nonstat, translation_nonstat, batch, (H, W), padding, hidden)
CASES = [
    ("lift", 3, 5, 4, 3, False, False, 3, (5, 7), "same", 16),
    ("lift", 1, 3, 1, 5, False, False, 1, (6, 5), "same", 8),
    ("lift", 5, 1, 3, 1, True, False, 3, (4, 5), "same", 8),
    ("lift", 3, 4, 3, 3, False, True, 3, (3, 4), "same", 8),
    ("group", 3, 5, 4, 3, True, False, 1, (5, 6), "same", 8),
    ("group", 5, 3, 3, 3, False, False, 3, (4, 6), "valid", 8),
    ("group", 1, 1, 1, 3, False, True, 3, (4, 5), "same", 8),
    ("group", 3, 2, 4, 3, True, True, 1, (2, 3), "same", 16),
    ("group", 1, 3, 1, 5, False, True, 1, (6, 5), "valid", 8),
    ("group", 2, 3, 3, 5, False, False, 1, (3, 2), "same", 8),
    ("group", 2, 20, 1, 3, False, False, 3, (4, 5), "same", 32),
    ("point", 5, 3, 4, 1, False, False, 3, (3, 5), None, 8),
    ("point", 3, 5, 3, 1, True, True, 1, (4, 3), None, 8),
]


def case_id(c):
    layer, cin, cout, n, k, rot, trans, b, hw, pad, hid = c
    ns = ("rot" if rot else "") + ("trans" if trans else "") or "stat"
    return f"{layer}-C{cin}to{cout}-N{n}-K{k}-{ns}-B{b}-{hw[0]}x{hw[1]}-{pad}-H{hid}"


def make_layer(case, dtype=torch.float64, device=DEVICE):
    layer, cin, cout, n, k, rot, trans, b, hw, pad, hid = case
    kw = dict(
        rotation_nonstationary=rot, omega_rot=1.5 if rot else 0.0, translation_nonstationary=trans,
        omega_pos=1.5 if trans else 0.0,
        hidden_channels=hid, learn_omega_rel=True, omega_rel=3.0,
    )
    if layer == "lift":
        m = rc.LiftingConv(cin, cout, k, n, padding=pad, **kw)
    elif layer == "group":
        m = rc.GroupConv(cin, cout, k, n, padding=pad, **kw)
    else:
        m = rc.PointwiseGroupConv(cin, cout, n, **kw)
    m = m.to(device=device, dtype=dtype)
    x = torch.randn(b, cin * m.in_rotations, *hw, device=device, dtype=dtype)
    return m, x


def run_with_grads(layer, x, backend, grad_out=None):
    """Output and the gradients of x and every parameter for <y, grad_out>."""
    layer = copy.deepcopy(layer)
    x = x.detach().clone().requires_grad_(True)
    y = layer(x, backend=backend)
    if grad_out is None:
        grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    (y * grad_out.to(y.device, y.dtype)).sum().backward()
    grads = {"x": x.grad}
    grads.update({n: p.grad for n, p in layer.named_parameters() if p.requires_grad})
    return y.detach(), grads, grad_out


def rel_err(a, b):
    """Largest absolute difference relative to the largest reference value."""
    return float((a.double() - b.double()).abs().max() / (b.double().abs().max() + 1e-30))
