"""Pick the torch device from the config's `device` setting."""

from __future__ import annotations

import torch

from neurohybrid.errors import InputError


def resolve_device(setting: str = "auto") -> torch.device:
    """'cpu', 'cuda' or 'auto' (CUDA when available). Asking for CUDA without one is an error."""
    setting = (setting or "auto").lower()
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if setting == "cuda":
        if not torch.cuda.is_available():
            raise InputError("device 'cuda' requested but torch sees no CUDA device (use 'auto' or 'cpu')")
        return torch.device("cuda")
    if setting == "cpu":
        return torch.device("cpu")
    raise InputError(f"unknown device {setting!r}: use cpu, cuda or auto")


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA) and numpy so training is repeatable."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
