"""`sms node`'s pacing options reach the node's configuration (run_node replaced: nothing starts)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from sms.cli.main import app
from sms.node.config import NodeConfig
from sms.node.core.pacing import COMMIT_FIRST_PACING, EARLY_FANOUT_PACING, FRAME_CAPS_LANES, FRAME_CAPS_STREAMS

BASE = ["node", "--data-dir", "/tmp/sms-cli-test", "--etcd", "http://127.0.0.1:2379",
        "--db", "postgresql://postgres@127.0.0.1:5432/sms"]


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> list[NodeConfig]:
    configs: list[NodeConfig] = []
    monkeypatch.setattr("sms.node.main.run_node", configs.append)
    for name in ("SMS_LANES", "SMS_COMMIT_GAP_MS", "SMS_EARLY_FANOUT", "SMS_MAX_FRAMES_PER_S", "SMS_MIN_FRAMES_PER_S"):
        monkeypatch.delenv(name, raising=False)
    return configs


def run(*args: str, env: dict[str, str] | None = None):
    return CliRunner().invoke(app, [*BASE, *args], env=env)


def test_the_defaults(started: list[NodeConfig]) -> None:
    assert run().exit_code == 0
    (config,) = started
    assert config.lanes and config.frame_caps() == FRAME_CAPS_LANES
    assert config.early_fanout  # messages go out while their commit runs unless asked otherwise
    assert config.commit_pacing() == EARLY_FANOUT_PACING  # only acks wait for commits


def test_commit_first_keeps_the_short_commit_gap_unless_one_is_given(started: list[NodeConfig]) -> None:
    assert run("--commit-first").exit_code == 0
    assert run("--commit-first", "--commit-gap-ms", "16").exit_code == 0
    assert run(env={"SMS_EARLY_FANOUT": "0", "SMS_COMMIT_GAP_MS": "0"}).exit_code == 0
    assert [c.commit_pacing() for c in started] == [COMMIT_FIRST_PACING, COMMIT_FIRST_PACING.with_max_gap(0.016),
                                                    COMMIT_FIRST_PACING.with_max_gap(0.0)]


def test_commit_first_is_an_option_and_an_environment_variable(started: list[NodeConfig]) -> None:
    assert run("--commit-first").exit_code == 0
    assert run(env={"SMS_EARLY_FANOUT": "0"}).exit_code == 0
    assert run("--early-fanout", env={"SMS_EARLY_FANOUT": "0"}).exit_code == 0
    assert run(env={"SMS_EARLY_FANOUT": "1"}).exit_code == 0
    assert [c.early_fanout for c in started] == [False, False, True, True]


def test_a_bad_early_fanout_variable_is_refused_by_name(started: list[NodeConfig]) -> None:
    result = run(env={"SMS_EARLY_FANOUT": "sometimes"})
    assert result.exit_code == 2 and "early-fanout" in result.output and not started


def test_without_lanes_the_frame_caps_are_those_measured_for_libp2p_streams(started: list[NodeConfig]) -> None:
    assert run("--no-lanes").exit_code == 0
    assert started[0].frame_caps() == FRAME_CAPS_STREAMS


def test_options_and_environment_set_the_pacing(started: list[NodeConfig]) -> None:
    assert run("--no-lanes", "--max-frames-per-s", "300", "--commit-gap-ms", "2").exit_code == 0
    assert started[0].frame_caps() == (300.0, FRAME_CAPS_STREAMS[1]) and started[0].commit_pacing().max_gap_s == 0.002
    assert run(env={"SMS_COMMIT_GAP_MS": "0", "SMS_MIN_FRAMES_PER_S": "250"}).exit_code == 0
    assert started[1].commit_pacing().max_gap_s == 0.0 and started[1].frame_caps() == (FRAME_CAPS_LANES[0], 250.0)


@pytest.mark.parametrize("args", [("--commit-gap-ms", "-1"), ("--commit-gap-ms", "5000"), ("--max-frames-per-s", "-5")])
def test_a_bad_value_is_refused_before_the_node_starts(started: list[NodeConfig], args: tuple[str, str]) -> None:
    result = run(*args)
    assert result.exit_code != 0 and args[0] in result.output
    assert started == []
