"""A node alone paces its commits as with commit first: with early fan-out its own clients still
wait for each commit when no peer gets its frames (OwnDeliveries), so a long gap would be in every
delivery (node/core/pacing.py). Real `sms up --nodes 1`."""

from __future__ import annotations

import uuid

import httpx
import pytest
import trio

from sms.node.core.pacing import COMMIT_FIRST_PACING, EARLY_FANOUT_PACING

from .harness import ClusterProcess, account, auth, running_cluster

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def alone(tmp_path_factory: pytest.TempPathFactory):
    with running_cluster(tmp_path_factory.mktemp("alone"), nodes=1) as c:
        yield c


async def test_a_node_alone_keeps_the_short_commit_gap_once_it_sends(alone: ClusterProcess) -> None:
    base = alone.http(0)
    async with httpx.AsyncClient(timeout=30) as http:
        pacing = (await http.get(base + "/v1/status")).json()["pacing"]
        assert pacing["early_fanout"] is True
        assert pacing["commit_gap_ms"] == EARLY_FANOUT_PACING.max_gap_s * 1000  # nothing sent yet
        _, token = await account(http, base, f"alone-{uuid.uuid4().hex[:8]}")
        r = await http.post(base + "/v1/rooms", json={"name": f"alone-{uuid.uuid4().hex[:8]}"}, headers=auth(token))
        assert r.status_code == 201, r.text
        room_id = r.json()["room_id"]
        with trio.fail_after(15):  # the room reaches the node's registry cache
            while (r := await http.put(base + f"/v1/rooms/{room_id}/messages/t1", json={"body": "hi"},
                                       headers=auth(token))).status_code == 404:
                await trio.sleep(0.05)
        assert r.status_code in (200, 201), r.text
        with trio.fail_after(10):
            while (pacing := (await http.get(base + "/v1/status")).json()["pacing"])["commit_gap_ms"] \
                    != COMMIT_FIRST_PACING.max_gap_s * 1000:
                await trio.sleep(0.05)
        assert pacing["commit_gap_from_messages_per_s"] == COMMIT_FIRST_PACING.quiet_messages_per_s
