"""Delivery latency of single messages from one node to another's WebSocket client.

    python -m sms.benchmarks.delivery --cluster DATA/cluster.json --count 100 --from-node 0 --to-node 2

Sends `count` messages one at a time (each after the previous one arrived), from a client on one
node, and times send -> arrival at a WebSocket client on another node, and send -> acknowledgement.
Bounded: `count` messages, each waited for at most `--timeout` seconds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import uuid
from pathlib import Path

import httpx
import trio
from trio_websocket import open_websocket_url

PASSWORD = "benchmark password"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


async def measure(cluster: dict, count: int, src: int, dst: int, timeout: float) -> dict:
    a, b = cluster["nodes"][src]["http"], cluster["nodes"][dst]["http"]
    tag = uuid.uuid4().hex[:8]
    async with httpx.AsyncClient(timeout=30) as http:
        tokens = {}
        for who, base in (("sender", a), ("reader", b)):
            name = f"bench-{who}-{tag}"
            r = await http.post(base + "/v1/users", json={"name": name, "password": PASSWORD})
            r.raise_for_status()
            r = await http.post(base + "/v1/sessions", json={"name": name, "password": PASSWORD})
            tokens[who] = (r.json()["token"], r.json()["user_id"])
        hdr = {"Authorization": f"Bearer {tokens['sender'][0]}"}
        room = (await http.post(a + "/v1/rooms", json={"name": f"bench-{tag}"}, headers=hdr)).json()["room_id"]
        (await http.put(a + f"/v1/rooms/{room}/members/{tokens['reader'][1]}", json={"role": "member"}, headers=hdr)).raise_for_status()
        await trio.sleep(1.5)  # let the room's topic mesh form on every node
        deliveries, acks, lost = [], [], 0
        ws_url = b.replace("http://", "ws://") + f"/v1/events?token={tokens['reader'][0]}"
        async with open_websocket_url(ws_url) as ws:
            for i in range(count):
                t0 = time.perf_counter()
                r = await http.put(a + f"/v1/rooms/{room}/messages/m{i}", json={"body": f"ping {i}"}, headers=hdr)
                acks.append(time.perf_counter() - t0)
                want = r.json()["message_id"]
                with trio.move_on_after(timeout) as scope:
                    while json.loads(await ws.get_message()).get("message_id") != want:
                        pass
                if scope.cancelled_caught:
                    lost += 1
                else:
                    deliveries.append(time.perf_counter() - t0)
    ms = lambda xs, q: round(percentile(xs, q) * 1000, 2)  # noqa: E731
    return {
        "count": count,
        "from": cluster["nodes"][src]["name"],
        "to": cluster["nodes"][dst]["name"],
        "delivery_ms": {"p50": ms(deliveries, 50), "p90": ms(deliveries, 90), "p99": ms(deliveries, 99),
                        "max": ms(deliveries, 100), "mean": round(statistics.fmean(deliveries) * 1000, 2) if deliveries else None},
        "ack_ms": {"p50": ms(acks, 50), "p99": ms(acks, 99)},
        "lost": lost,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cluster", type=Path, required=True, help="DATA/cluster.json written by sms up")
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--from-node", type=int, default=0)
    parser.add_argument("--to-node", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=5.0)
    args = parser.parse_args()
    cluster = json.loads(args.cluster.read_text())
    result = trio.run(measure, cluster, min(args.count, 100_000), args.from_node, args.to_node, args.timeout)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
