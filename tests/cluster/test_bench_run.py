"""`sms bench run` end to end against a running 3-node cluster: the generator's WebSocket clients
(plain sockets on one selectors loop, benchmarks/wsloop.py), the recorder and the result file, at
a rate any machine carries (no timing is asserted: that is what the benchmark itself reports)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import trio

from .harness import ClusterProcess

pytestmark = pytest.mark.slow


async def test_a_bench_point_against_a_running_cluster_delivers_every_message_once(cluster: ClusterProcess, tmp_path) -> None:
    cmd = [sys.executable, "-m", "sms.cli.main", "bench", "run", "--cluster", str(cluster.data_dir / "cluster.json"),
           "--rate", "30", "--duration", "2", "--warmup", "0.5", "--drain", "5", "--retries", "0",
           "--quiet-wait", "0", "--out", str(tmp_path), "--baselines", "sms-commit-first", "--repeat", "2"]
    with trio.fail_after(240):
        done = await trio.run_process(cmd, capture_stdout=True, stderr=subprocess.STDOUT, check=False)
    output = done.stdout.decode(errors="replace")
    assert done.returncode == 0, output
    # --repeat 2: the whole run twice, a result file each, then the p99 ratios over both runs
    [first, result] = sorted(tmp_path.glob("point-*.json"))
    assert first.name.endswith("-1of2.json") and result.name.endswith("-2of2.json")
    assert json.loads(first.read_text())["systems"]["sms"]["points"][0]["lost"] == 0
    assert "sms p99 / sms-commit-first p99 over 2 runs:" in output
    assert "| 30 | 2 |" in output  # the rate, measured in both runs
    doc = json.loads(result.read_text())
    [point] = doc["systems"]["sms"]["points"]
    assert point["offered_rate"] == 30
    assert point["sent"] == point["scheduled"] == point["acked"] == 60 and point["send_errors"] == 0
    # 30 clients in 3 rooms: each message is owed to the 9 other members of its room
    assert point["expected_deliveries"] == point["delivered"] == 9 * 60
    assert point["lost"] == 0 and point["duplicates"] == 0
    assert doc["config"]["sms_client"]["send_via"] == "ws"
    assert doc["systems"]["sms"]["layout"]["generator_io"] == "selectors"
    # acks and deliveries came in frames the loop read and counted (batch=1: at most one frame
    # per event, with room for other events such as presence)
    assert 0 < point["ws_frames_read"] <= 2 * (60 + 9 * 60)
    assert point["ws_closed"] == {}
    assert doc["systems"]["sms"]["layout"]["fanout"] == "early fan-out"  # the nodes' default
    # The same point on a fresh cluster of its own whose nodes send messages out after their commits.
    strict = doc["systems"]["sms-commit-first"]
    assert strict["layout"]["fanout"] == "commit first"
    [point] = strict["points"]
    assert point["acked"] == 60 and point["expected_deliveries"] == point["delivered"] == 9 * 60
    assert point["lost"] == 0 and point["duplicates"] == 0 and point["send_errors"] == 0
    assert "highest rate that held" in output
