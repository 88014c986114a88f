"""Device names from configs and command lines: one resolver, one-line errors."""

from __future__ import annotations

import pytest
import torch

from depthlab.devices import resolve_device
from depthlab.errors import DepthlabError


def test_auto_and_valid_names():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device(None) == resolve_device("auto")
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("name", ["foo", "cuda:abc", "gpu0"])
def test_bad_names_name_the_setting(name):
    with pytest.raises(DepthlabError, match=rf"train.device='{name}' is not a device"):
        resolve_device(name, what="train.device")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_one_line_in_every_command(tmp_path, capsys):
    from depthlab.cli import main

    with pytest.raises(DepthlabError, match="--device=cuda but CUDA is not available"):
        resolve_device("cuda")
    with pytest.raises(SystemExit) as exit_:  # eval used to end in an AssertionError
        main(["eval", "configs/cpu/tiny.yaml", "--ppl", "--device", "cuda"])
    assert exit_.value.code == 2
    assert "CUDA is not available" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["mps", "xpu", "hpu", "ipu"])
def test_device_types_this_machine_lacks_are_one_line(name):
    """Types torch parses but cannot use here used to reach model.to() and a traceback."""
    backend = getattr(torch, name, None)
    if backend is not None and getattr(backend, "is_available", lambda: False)():
        pytest.skip(f"{name} is available here")
    with pytest.raises(DepthlabError, match=rf"train.device={name} but {name} is not available"):
        resolve_device(name, what="train.device")


def test_meta_and_a_missing_cuda_index_are_refused():
    with pytest.raises(DepthlabError, match="train.device=meta holds no data"):
        resolve_device("meta", what="train.device")
    with pytest.raises(DepthlabError, match="cuda:99 but"):
        resolve_device("cuda:99", what="train.device")
