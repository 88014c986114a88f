"""Command-line usage mistakes: click's usage message and exit code 2, never a traceback."""

from __future__ import annotations

import pytest

from depthlab.cli import main


@pytest.mark.parametrize("argv, needle", [
    (["diagnose", "runs/x", "--bogus"], "No such option: --bogus"),
    (["train"], "Missing argument"),
    (["trian"], "No such command 'trian'"),
    (["diagnose", "runs/x", "--samples", "abc"], "Invalid value for '--samples'"),
    (["train", "a.yaml", "extra"], "unexpected extra argument"),
    (["recipe", "--layers", "4"], "Missing option '--params'"),
])
def test_usage_errors_exit_2_with_click_message(argv, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = " ".join(capsys.readouterr().err.split())
    assert needle in err and "Traceback" not in err


def test_no_arguments_prints_help(capsys):
    with pytest.raises(SystemExit):
        main([])
    captured = capsys.readouterr()
    assert "diagnose" in captured.out + captured.err
