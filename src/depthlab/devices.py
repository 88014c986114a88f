"""One place that turns a device name from a config or a command line into a torch.device."""

from __future__ import annotations

import torch

from depthlab.errors import DepthlabError


def _auto() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_type(name: str) -> str:
    """'cuda', 'cpu', ... for a device name, without requiring it on this machine (auto:
    this machine's choice); an unparsable name is returned as it is."""
    if name == "auto":
        return _auto().type
    try:
        return torch.device(name).type
    except RuntimeError:
        return name


def resolve_device(name: str | torch.device | None, what: str = "--device") -> torch.device:
    """auto/None -> cuda when available, else cpu; anything else must parse and exist here.
    `what` names the setting in the one-line error (e.g. `train.device`)."""
    if name is None or str(name) == "auto":
        return _auto()
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DepthlabError(
            f"{what}={str(name)!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DepthlabError(f"{what}={name} but CUDA is not available on this machine")
    return device
