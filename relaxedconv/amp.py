"""The autocast state of a device, for every device a tensor can live on.

``torch.is_autocast_enabled(device_type)`` raises for device types autocast does not know (``meta``,
which shape inference and FLOP counting run on); those are never under autocast.
"""
from __future__ import annotations

import torch


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast casts to on ``device_type``, or None where autocast is off there."""
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None
