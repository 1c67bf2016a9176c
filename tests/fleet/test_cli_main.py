"""The CLI's last guard: an unexpected exception (a bug) becomes one line with the code
console.internal and exit 2, never a traceback."""

from __future__ import annotations

import json

import pytest

from fleet.cli import main, records


def _broken(args: object, ctx: object) -> int:
    raise KeyError("no such column")


def test_a_bug_in_a_command_is_one_line_not_a_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: object
) -> None:
    real = records.register

    def register(sub: object) -> None:
        real(sub)  # type: ignore[arg-type]
        # `history` now runs the broken function instead of its own.
        sub.choices["history"].set_defaults(run=_broken)  # type: ignore[attr-defined]

    monkeypatch.setattr(records, "register", register)
    monkeypatch.delenv("EDGE_FLEET_DEBUG", raising=False)
    assert main(["--json", "history"]) == 2
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    assert err.strip().splitlines() == [err.strip()]  # one line
    assert "[console.internal] history failed unexpectedly (KeyError" in err
    assert json.loads(out)["error"]["code"] == "console.internal"
