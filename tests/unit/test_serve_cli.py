"""`marn serve promote --auto`: judges repeatedly and stops at done or rollback, or after --max-checks."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

import cli.main
import serve.cli
import serve.control
from serve.ab import CanaryDecision
from serve.control import ServeState

STATE = ServeState(
    pid=1, gcs_port=1, dashboard="http://127.0.0.1:1", url="http://127.0.0.1:2", config_path=None
)


def _script(monkeypatch, actions: list[str]) -> list[str]:
    """Make promote() return these actions in turn; returns the list of calls made."""
    calls: list[str] = []

    def promote(cfg, state):
        action = actions[len(calls)]
        calls.append(action)
        return CanaryDecision(action, {"marn": 0.25, "dupn": 0.75}, f"scripted {action}")

    monkeypatch.setattr(serve.control, "promote", promote)
    monkeypatch.setattr(serve.control, "read_state", lambda cfg: STATE)
    monkeypatch.setattr(serve.cli.time, "sleep", lambda s: None)
    return calls


@pytest.mark.parametrize(
    ("actions", "expected"),
    [
        (["hold", "advance", "advance", "done", "advance"], 4),  # stops once the ramp is done
        (["hold", "rollback", "advance"], 2),  # and at a rollback
        (["hold"] * 10, 3),  # at most --max-checks judgements
    ],
)
def test_auto_promote_stops_where_it_should(monkeypatch, actions, expected):
    calls = _script(monkeypatch, actions)
    result = CliRunner().invoke(
        cli.main.app,
        ["serve", "promote", "--auto", "--interval", "0", "--max-checks", "3" if expected == 3 else "10"],
    )
    assert result.exit_code == 0, result.output
    assert len(calls) == expected
    assert f"{actions[expected - 1]}: scripted" in result.output


def test_one_promote_without_auto_judges_once(monkeypatch):
    calls = _script(monkeypatch, ["advance", "advance"])
    result = CliRunner().invoke(cli.main.app, ["serve", "promote"])
    assert result.exit_code == 0 and calls == ["advance"]


def test_promote_needs_a_running_service(monkeypatch):
    monkeypatch.setattr(serve.control, "read_state", lambda cfg: None)
    result = CliRunner().invoke(cli.main.app, ["serve", "promote"])
    assert result.exit_code == 1 and "not running" in result.output
