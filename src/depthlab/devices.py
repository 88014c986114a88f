"""One place that turns a device name from a config or a command line into a torch.device."""

from __future__ import annotations

import torch

from depthlab.errors import DepthlabError


def resolve_device(name: str | torch.device | None, what: str = "--device") -> torch.device:
    """auto/None -> cuda when available, else cpu; anything else must parse and exist here.
    `what` names the setting in the one-line error (e.g. `train.device`)."""
    if name is None or str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DepthlabError(
            f"{what}={str(name)!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DepthlabError(f"{what}={name} but CUDA is not available on this machine")
    return device
