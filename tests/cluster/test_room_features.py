"""Issue 3 (edits, deletions, presence, typing, read markers) and issue 4 (room deletion, leaving,
room details), through the client contract on a real 3-node cluster."""

from __future__ import annotations

import json
import os
import signal
import time

import httpx
import pytest
import trio
from trio_websocket import open_websocket_url

from .harness import ClusterProcess
from .test_message_plane import setup_room

pytestmark = pytest.mark.slow



def auth(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


async def next_event(ws, kind: str, timeout_s: float = 10) -> dict:
    with trio.fail_after(timeout_s):
        while True:
            event = json.loads(await ws.get_message())
            if event["type"] == kind:
                return event


async def test_edits_deletions_typing_and_read_markers_reach_every_node(cluster: ClusterProcess) -> None:
    async with httpx.AsyncClient(timeout=30) as http:
        room, users = await setup_room(cluster, http)
        (alice_id, alice), (bob_id, bob), (carol_id, carol) = users
        async with open_websocket_url(cluster.ws(2) + f"/v1/events?token={carol}") as ws:
            r = await http.put(cluster.http(0) + f"/v1/rooms/{room}/messages/e1", json={"body": "first draft"}, headers=auth(alice))
            mid = r.json()["message_id"]
            assert (await next_event(ws, "message"))["message_id"] == mid

            # Only the sender edits; the edit reaches node 2's client and every node's history.
            r = await http.patch(cluster.http(1) + f"/v1/rooms/{room}/messages/{mid}", json={"body": "x"}, headers=auth(bob))
            assert r.status_code == 403
            r = await http.patch(cluster.http(1) + f"/v1/rooms/{room}/messages/{mid}", json={"body": "final"}, headers=auth(alice))
            assert r.status_code == 200, r.text
            edited = await next_event(ws, "message_edited")
            assert (edited["message_id"], edited["body"]) == (mid, "final")
            for node in range(3):
                page = (await http.get(cluster.http(node) + f"/v1/rooms/{room}/messages", headers=auth(bob))).json()
                assert [m["body"] for m in page["messages"]] == ["final"]

            # Typing shows, then clears by itself after 5 s without a refresh.
            r = await http.put(cluster.http(0) + f"/v1/rooms/{room}/typing", json={"typing": True}, headers=auth(alice))
            assert r.status_code == 204
            started = await next_event(ws, "typing")
            assert (started["user_id"], started["typing"]) == (alice_id, True)
            t0 = time.monotonic()
            cleared = await next_event(ws, "typing", timeout_s=15)
            assert (cleared["user_id"], cleared["typing"]) == (alice_id, False)
            assert time.monotonic() - t0 >= 3  # it cleared by timeout, not at once

            # Read markers only move forward and are kept in history.
            r2 = await http.put(cluster.http(0) + f"/v1/rooms/{room}/messages/e2", json={"body": "second"}, headers=auth(alice))
            mid2 = r2.json()["message_id"]
            assert (await http.put(cluster.http(1) + f"/v1/rooms/{room}/read", json={"message_id": mid2}, headers=auth(bob))).json()["moved"]
            read = await next_event(ws, "read")
            assert (read["user_id"], read["message_id"]) == (bob_id, mid2)
            back = await http.put(cluster.http(1) + f"/v1/rooms/{room}/read", json={"message_id": mid}, headers=auth(bob))
            assert back.json()["moved"] is False
            markers = (await http.get(cluster.http(2) + "/v1/read-markers", headers=auth(bob))).json()["markers"]
            assert markers[room]["message_id"] == mid2

            # A deletion by an admin: a tombstone everywhere, the event on node 2.
            r = await http.delete(cluster.http(2) + f"/v1/rooms/{room}/messages/{mid2}", headers=auth(carol))
            assert r.status_code == 403
            r = await http.delete(cluster.http(1) + f"/v1/rooms/{room}/messages/{mid2}", headers=auth(alice))
            assert r.status_code == 204
            assert (await next_event(ws, "message_deleted"))["message_id"] == mid2
            page = (await http.get(cluster.http(2) + f"/v1/rooms/{room}/messages", headers=auth(carol))).json()
            assert [m["message_id"] for m in page["messages"]] == [mid]


async def test_presence_and_a_dead_nodes_users_going_offline(cluster: ClusterProcess) -> None:
    async with httpx.AsyncClient(timeout=30) as http:
        room, users = await setup_room(cluster, http)
        (alice_id, alice), (bob_id, bob), (carol_id, carol) = users
        async with open_websocket_url(cluster.ws(0) + f"/v1/events?token={alice}") as ws:
            r = await http.put(cluster.http(1) + "/v1/presence", json={"status": "away"}, headers=auth(carol))
            assert r.status_code == 200 and r.json()["status"] == "away"
            event = await next_event(ws, "presence")
            while event["user_id"] != carol_id:
                event = await next_event(ws, "presence")
            assert event["status"] == "away"
            with trio.fail_after(10):  # presence is eventual: node 2 hears it over gossip
                while (await http.get(cluster.http(2) + f"/v1/users/{carol_id}/presence", headers=auth(alice))).json()["status"] != "away":
                    await trio.sleep(0.1)
            bad = await http.put(cluster.http(1) + "/v1/presence", json={"status": "asleep"}, headers=auth(carol))
            assert bad.status_code == 400

        # Bob comes online by opening a WebSocket on node 2; node 2 dies; within 30 s he is offline.
        async with open_websocket_url(cluster.ws(2) + f"/v1/events?token={bob}"):
            with trio.fail_after(10):
                while (await http.get(cluster.http(0) + f"/v1/users/{bob_id}/presence", headers=auth(alice))).json()["status"] != "online":
                    await trio.sleep(0.1)
            os.kill(cluster.info["nodes"][2]["pid"], signal.SIGKILL)
            killed = time.monotonic()
        with trio.fail_after(45):
            while (await http.get(cluster.http(0) + f"/v1/users/{bob_id}/presence", headers=auth(alice))).json()["status"] != "offline":
                await trio.sleep(0.5)
        print(f"\n[presence] offline {time.monotonic() - killed:.1f}s after his node was killed")


async def test_room_details_leaving_and_deleting(cluster: ClusterProcess) -> None:
    async with httpx.AsyncClient(timeout=30) as http:
        room, users = await setup_room(cluster, http)
        (alice_id, alice), (bob_id, bob), (carol_id, carol) = users
        details = (await http.get(cluster.http(1) + f"/v1/rooms/{room}", headers=auth(bob))).json()
        assert {m["user_id"]: m["role"] for m in details["members"]} == {alice_id: "admin", bob_id: "member", carol_id: "member"}
        # The last admin cannot leave.
        assert (await http.delete(cluster.http(0) + f"/v1/rooms/{room}/members/{alice_id}", headers=auth(alice))).status_code == 409
        async with open_websocket_url(cluster.ws(1) + f"/v1/events?token={bob}") as bob_ws:
            async with open_websocket_url(cluster.ws(2) + f"/v1/events?token={carol}") as carol_ws:
                # Bob leaves: he hears so, and stops receiving the room at once.
                assert (await http.delete(cluster.http(1) + f"/v1/rooms/{room}/members/{bob_id}", headers=auth(bob))).status_code == 204
                assert (await next_event(bob_ws, "room_left"))["room_id"] == room
                with trio.fail_after(10):
                    while (await http.get(cluster.http(0) + f"/v1/rooms/{room}/messages", headers=auth(bob))).status_code != 403:
                        await trio.sleep(0.05)
                r = await http.put(cluster.http(0) + f"/v1/rooms/{room}/messages/after-leave", json={"body": "bob is gone"}, headers=auth(alice))
                assert r.status_code == 200
                assert (await next_event(carol_ws, "message"))["body"] == "bob is gone"
                # Only an admin deletes a room; every member hears it and every node stops serving it.
                assert (await http.delete(cluster.http(2) + f"/v1/rooms/{room}", headers=auth(carol))).status_code == 403
                assert (await http.delete(cluster.http(0) + f"/v1/rooms/{room}", headers=auth(alice))).status_code == 204
                assert (await next_event(carol_ws, "room_deleted"))["room_id"] == room
                for node in range(3):
                    with trio.fail_after(10):
                        while (await http.get(cluster.http(node) + f"/v1/rooms/{room}/messages", headers=auth(alice))).status_code != 404:
                            await trio.sleep(0.05)
                    r = await http.put(cluster.http(node) + f"/v1/rooms/{room}/messages/late", json={"body": "x"}, headers=auth(alice))
                    assert r.status_code == 404


async def test_logout_ends_the_session_everywhere_and_closes_its_websocket(cluster: ClusterProcess) -> None:
    from trio_websocket import ConnectionClosed, ConnectionRejected

    async with httpx.AsyncClient(timeout=30) as http:
        room, users = await setup_room(cluster, http)
        _, token = users[1]
        async with open_websocket_url(cluster.ws(2) + f"/v1/events?token={token}") as ws:
            r = await http.delete(cluster.http(0) + "/v1/sessions/current", headers=auth(token))
            assert r.status_code == 204
            with trio.fail_after(10):
                with pytest.raises(ConnectionClosed) as closed:
                    while True:
                        await ws.get_message()
            assert closed.value.reason.code == 1008
        for node in range(3):
            assert (await http.get(cluster.http(node) + "/v1/rooms", headers=auth(token))).status_code == 401
        with pytest.raises(ConnectionRejected):
            async with open_websocket_url(cluster.ws(1) + f"/v1/events?token={token}"):
                pass


async def test_a_page_from_another_origin_cannot_open_the_event_stream(cluster: ClusterProcess) -> None:
    from trio_websocket import ConnectionRejected

    async with httpx.AsyncClient(timeout=30) as http:
        _, users = await setup_room(cluster, http)
        token = users[0][1]
        with pytest.raises(ConnectionRejected):
            async with open_websocket_url(cluster.ws(0) + f"/v1/events?token={token}",
                                          extra_headers=[("Origin", "http://evil.example")]):
                pass
        own = cluster.http(0)
        async with open_websocket_url(cluster.ws(0) + f"/v1/events?token={token}", extra_headers=[("Origin", own)]):
            pass


async def test_a_flood_from_one_user_is_answered_with_429_and_a_retry_hint(cluster: ClusterProcess) -> None:
    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=32)) as http:
        room, users = await setup_room(cluster, http)
        token = users[0][1]
        statuses: list[tuple[int, dict]] = []

        async def one(i: int) -> None:
            r = await http.put(cluster.http(0) + f"/v1/rooms/{room}/typing", json={"typing": True}, headers=auth(token))
            statuses.append((r.status_code, r.json() if r.status_code != 204 else {}))

        async with trio.open_nursery() as nursery:
            for i in range(800):  # bounded: 800 requests, well over one node's share of rate and burst
                nursery.start_soon(one, i)
        limited = [body for status, body in statuses if status == 429]
        assert limited and {s for s, _ in statuses} <= {204, 429}
        assert limited[0]["error"]["code"] == "rate_limited" and limited[0]["error"]["retry_after_ms"] > 0
