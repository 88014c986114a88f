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
    if device.type == "cpu":
        return device
    if device.type == "meta":
        raise DepthlabError(f"{what}=meta holds no data: use auto, cpu, cuda or cuda:N")
    if not _available(device.type):
        shown = "CUDA" if device.type == "cuda" else device.type
        raise DepthlabError(f"{what}={name} but {shown} is not available on this machine")
    if device.type == "cuda" and device.index is not None \
            and device.index >= torch.cuda.device_count():
        raise DepthlabError(f"{what}={name} but this machine has "
                            f"{torch.cuda.device_count()} CUDA device(s)")
    return device


def _available(kind: str) -> bool:
    """Whether torch can use devices of this type here: torch.backends.<type> answers where
    it has is_available() (mps on every torch version), else torch.<type> (cuda, xpu, and
    the modules accelerator plug-ins add); a type with neither is not available."""
    for module in (getattr(torch.backends, kind, None), getattr(torch, kind, None)):
        probe = getattr(module, "is_available", None)
        if callable(probe):
            try:
                return bool(probe())
            except (RuntimeError, AssertionError):  # a build without that backend
                return False
    return False
