"""The command line's error contract: a user error (ValueError, FileNotFoundError, TimeoutError) is one line on
stderr and exit code 2; anything else is a bug and keeps its traceback (a KeyError is not swallowed)."""
from __future__ import annotations

import pytest

from foundation import cli


def fail_with(exc: BaseException):
    def run(args):
        raise exc
    return run


def patched(monkeypatch, exc: BaseException) -> None:
    """``foundation data list`` raises ``exc`` (the parser looks ``_run_list`` up when it is built)."""
    monkeypatch.setattr(cli, "_run_list", fail_with(exc))


@pytest.mark.parametrize("exc", [ValueError("bad value in x.yaml: fix it"), FileNotFoundError("no such file: y"),
                                 TimeoutError("waited 3 s for lock z")])
def test_user_errors_are_one_line(monkeypatch, capsys, exc):
    patched(monkeypatch, exc)
    assert cli.main(["data", "list"]) == 2
    err = capsys.readouterr().err
    assert err == f"foundation data: error: {exc}\n"


@pytest.mark.parametrize("exc", [KeyError("heads"), TypeError("unsupported operand"), AttributeError("x")])
def test_internal_errors_keep_their_traceback(monkeypatch, exc):
    patched(monkeypatch, exc)
    with pytest.raises(type(exc)):
        cli.main(["data", "list"])
