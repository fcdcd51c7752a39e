"""The autocast state of a device, for every device a tensor can live on.

``torch.is_autocast_enabled(device_type)`` raises for device types autocast does not know (``meta``,
which shape inference and FLOP counting run on); those are never under autocast.
"""
from __future__ import annotations

import torch


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast casts to on ``device_type``, or None where autocast is off there."""
    # Asked several times per layer and step: the plain query, with the rare device autocast does
    # not know caught (half the cost of asking torch.amp.is_autocast_available first).
    try:
        return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    except RuntimeError:
        return None
