"""NodeConfig.validate: a bad setting is named in one clear error, and the defaults pass."""

from __future__ import annotations

from pathlib import Path

import pytest

from sms.node.config import NodeConfig
from sms.node.errors import BadRequest


def config(**changes) -> NodeConfig:
    base = dict(name="node-0", data_dir=Path("/tmp/sms-test"), etcd_url="http://127.0.0.1:2379",
                db_dsn="postgresql://postgres@127.0.0.1:5432/sms")
    return NodeConfig(**{**base, **changes})


def test_the_defaults_are_valid():
    c = config().validate()
    assert c.publish_window_ms == 0.0 and c.busy_messages_per_s == 600.0 and c.db_wire is True
    assert c.lanes is True and c.lane_port == 0  # fast lanes on, on any free port


@pytest.mark.parametrize("changes, named", [
    (dict(publish_window_ms=-1.0), "--publish-window-ms"),
    (dict(publish_window_ms=5000.0), "--publish-window-ms"),
    (dict(busy_messages_per_s=0.0), "--busy-messages-per-s"),
    (dict(min_frames_per_s=0.0), "--min-frames-per-s"),
    (dict(max_frames_per_s=-1.0), "--max-frames-per-s"),
    (dict(commit_gap_ms=-1.0), "--commit-gap-ms"),
    (dict(commit_gap_ms=5000.0), "--commit-gap-ms"),
    (dict(direct_max_peers=-1), "--direct-max-peers"),
    (dict(lane_port=70000), "--lane-port"),
    (dict(lane_port=4101, p2p_port=4101), "--lane-port"),
    (dict(http_port=70000), "--http-port"),
    (dict(db_dsn="mysql://x"), "--db"),
])
def test_a_bad_setting_is_named(changes, named):
    with pytest.raises(BadRequest, match="invalid node configuration") as err:
        config(**changes).validate()
    assert named in err.value.message


def test_every_bad_setting_is_named_at_once():
    with pytest.raises(BadRequest) as err:
        config(publish_window_ms=-1.0, busy_messages_per_s=-2.0).validate()
    assert "--publish-window-ms" in err.value.message and "--busy-messages-per-s" in err.value.message


def test_the_frame_caps_follow_the_carrier_unless_given():
    from sms.node.core.pacing import FRAME_CAPS_LANES, FRAME_CAPS_STREAMS

    assert config().frame_caps() == FRAME_CAPS_LANES  # cheap frames on fast lanes
    assert config(lanes=False).frame_caps() == FRAME_CAPS_STREAMS  # ~6x the CPU per frame on libp2p
    assert FRAME_CAPS_STREAMS < FRAME_CAPS_LANES
    assert config(lanes=False, max_frames_per_s=300.0).frame_caps() == (300.0, FRAME_CAPS_STREAMS[1])
    assert config(min_frames_per_s=50.0).frame_caps() == (FRAME_CAPS_LANES[0], 50.0)
    assert config(max_frames_per_s=0.0).validate().frame_caps()[0] == 0.0  # 0: no cap, kept as given


def test_direct_push_is_on_by_default_for_clusters_up_to_the_adapters_limit():
    from sms.node.adapters.p2p import DIRECT_MAX_PEERS

    assert config().validate().direct_max_peers == DIRECT_MAX_PEERS
    assert config(direct_max_peers=0).validate().direct_max_peers == 0  # off: GossipSub only
