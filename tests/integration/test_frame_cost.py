"""The direct-frame CPU benchmark (benchmarks/frame_cost.py) on real py-libp2p hosts: every frame
arrives, in order, on the fast lane or the direct stream, in each of its modes, and the old mode
leaves the adapter as it found it."""

from __future__ import annotations

import pytest

from sms.benchmarks import frame_cost
from sms.node.adapters import p2p


@pytest.mark.parametrize("lanes, per_read_credit", [(True, False), (False, False), (False, True)])
async def test_frames_are_measured_on_the_lane_or_the_direct_stream(lanes, per_read_credit):
    credit, reader = p2p._credit_in_batches, p2p._RecordReader
    result = await frame_cost.measure(200, 2000.0, 300, per_read_credit, lanes)
    assert result["direct_frames"] == 200 and result["per_read_credit"] is per_read_credit
    assert result["lane_frames"] == (200 if lanes else 0)
    assert result["cpu_ms_per_frame"] > 0 and result["loop_cpu_ms_per_iteration"] >= 0
    assert (p2p._credit_in_batches, p2p._RecordReader) == (credit, reader)
