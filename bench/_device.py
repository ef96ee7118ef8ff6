"""The ``--device`` option of every benchmark: validation and a device-aware clock."""
from __future__ import annotations

import sys
import time

import torch

__all__ = ["check_device", "clock"]


def check_device(value: str, prog: str) -> torch.device | None:
    """``--device`` validated by :func:`linop.validate.device`; ``None`` after printing one line
    ``prog: error: ...`` on stderr (the caller exits 2)."""
    from linop import validate

    try:
        return validate.device(value, "--device")
    except ValueError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return None


def clock(device: torch.device) -> float:
    """``time.perf_counter()`` once the device's queued work is done (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
