"""The NATS baselines' pure parts (benchmarks/nats_client.py): a JetStream cluster's configuration,
and the resource groups a run watches. The servers themselves need the bench extra and are run
by `sms bench run --baselines nats,nats-cluster` (docs/benchmarks.md)."""

from pathlib import Path

from sms.benchmarks.nats_client import cluster_config, server_pid_groups


def test_a_cluster_servers_configuration_names_it_and_routes_to_every_server_on_loopback():
    text = cluster_config("n1", 4223, 6223, [6222, 6223, 6224], Path("/tmp/x y/js"))
    assert "server_name: n1\n" in text
    assert "listen: 127.0.0.1:4223\n" in text  # clients
    assert "  listen: 127.0.0.1:6223\n" in text  # routes
    assert ("routes: [nats-route://127.0.0.1:6222, nats-route://127.0.0.1:6223, "
            "nats-route://127.0.0.1:6224]") in text
    assert 'store_dir: "/tmp/x y/js"' in text  # quoted: a path with a space stays one value
    assert "sync_interval" not in text
    assert "sync_interval: always" in cluster_config("n0", 1, 2, [2], Path("/s"), fsync=True)
    assert text.count("{") == text.count("}") == 2


def test_one_server_is_watched_as_nats_server_and_a_cluster_server_by_server():
    one = server_pid_groups([11])
    assert [(g.name, g.role, g.pids) for g in one[:-1]] == [("nats-server", "nats-server", [11])]
    three = server_pid_groups([11, 12, 13])
    assert [(g.name, g.role) for g in three[:-1]] == [("nats-server-0", "nats-server"), ("nats-server-1", "nats-server"),
                                                     ("nats-server-2", "nats-server")]
    assert one[-1].role == three[-1].role == "generator"
