"""The adapter's patches of py-libp2p (node/adapters/p2p.py), with real py-libp2p hosts and records:
a signed peer record is issued once per PEER_RECORD_REUSE_S, a receiver skips only a record it
already accepted from the same peer, byte for byte; yamux reads its settings once."""

import libp2p.pubsub.gossipsub as gossipsub_module
import libp2p.pubsub.pubsub as pubsub_module
from libp2p import new_host
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.pubsub.pb.rpc_pb2 import RPC

import sms.node.adapters.p2p as p2p


def rpc_with(record: bytes) -> RPC:
    rpc = RPC()
    rpc.senderRecord = record
    return rpc


def test_the_patch_is_what_pubsub_and_gossipsub_call():
    for module in (pubsub_module, gossipsub_module):
        assert module.env_to_send_in_RPC.__qualname__.startswith("_reuse_signed_peer_records")
        assert module.maybe_consume_signed_record.__qualname__.startswith("_reuse_signed_peer_records")


def test_a_sender_reuses_its_record_and_a_receiver_accepts_it():
    alice, bob = new_host(key_pair=create_new_key_pair()), new_host(key_pair=create_new_key_pair())
    record, _ = pubsub_module.env_to_send_in_RPC(alice)
    again, fresh = pubsub_module.env_to_send_in_RPC(alice)
    assert again == record and fresh is False
    assert pubsub_module.maybe_consume_signed_record(rpc_with(record), bob, alice.get_id())
    # accepted again from the cache, and an RPC without a record is fine as before
    assert pubsub_module.maybe_consume_signed_record(rpc_with(record), bob, alice.get_id())
    assert pubsub_module.maybe_consume_signed_record(RPC(), bob, alice.get_id())


def test_a_changed_or_misattributed_record_is_checked_in_full_and_refused():
    alice, bob, mallory = (new_host(key_pair=create_new_key_pair()) for _ in range(3))
    record, _ = pubsub_module.env_to_send_in_RPC(alice)
    assert pubsub_module.maybe_consume_signed_record(rpc_with(record), bob, alice.get_id())
    tampered = bytearray(record)
    tampered[-1] ^= 0x01  # inside the signature
    assert not pubsub_module.maybe_consume_signed_record(rpc_with(bytes(tampered)), bob, alice.get_id())
    # alice's valid record relayed as if it were mallory's: the peer id inside must match
    assert not pubsub_module.maybe_consume_signed_record(rpc_with(record), bob, mallory.get_id())
    assert not pubsub_module.maybe_consume_signed_record(rpc_with(b"not an envelope"), bob, alice.get_id())


def test_records_are_issued_again_after_the_reuse_window(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(pubsub_module, "_sms_reuses_peer_records", False)
    monkeypatch.setattr(pubsub_module, "env_to_send_in_RPC", pubsub_module.env_to_send_in_RPC)
    monkeypatch.setattr(gossipsub_module, "env_to_send_in_RPC", gossipsub_module.env_to_send_in_RPC)
    monkeypatch.setattr(pubsub_module, "maybe_consume_signed_record", pubsub_module.maybe_consume_signed_record)
    monkeypatch.setattr(gossipsub_module, "maybe_consume_signed_record", gossipsub_module.maybe_consume_signed_record)
    issued = []
    inner = pubsub_module.env_to_send_in_RPC
    monkeypatch.setattr(pubsub_module, "env_to_send_in_RPC", lambda host: issued.append(host) or inner(host))
    p2p._reuse_signed_peer_records(lambda: now[0])
    alice = new_host(key_pair=create_new_key_pair())
    pubsub_module.env_to_send_in_RPC(alice)
    now[0] += p2p.PEER_RECORD_REUSE_S / 2
    pubsub_module.env_to_send_in_RPC(alice)
    assert len(issued) == 1
    now[0] += p2p.PEER_RECORD_REUSE_S
    pubsub_module.env_to_send_in_RPC(alice)
    assert len(issued) == 2


def test_each_host_gets_its_own_record():
    alice, bob, carol = (new_host(key_pair=create_new_key_pair()) for _ in range(3))
    a, _ = pubsub_module.env_to_send_in_RPC(alice)
    b, _ = pubsub_module.env_to_send_in_RPC(bob)
    assert a != b
    assert pubsub_module.maybe_consume_signed_record(rpc_with(b), carol, bob.get_id())
    assert not pubsub_module.maybe_consume_signed_record(rpc_with(b), carol, alice.get_id())


def test_yamux_reads_its_environment_settings_once():
    import libp2p.stream_muxer.yamux.yamux as yamux_module

    before = yamux_module._py_yamux_env.cache_info()
    # The node turns release-on-read off (node/adapters/p2p.py) before any connection exists.
    assert yamux_module._yamux_release_on_read() is False
    assert yamux_module._yamux_release_on_read() is False
    after = yamux_module._py_yamux_env.cache_info()
    assert after.hits >= before.hits + 1  # the second read came from the cache, not os.environ
