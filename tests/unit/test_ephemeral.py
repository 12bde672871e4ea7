from sms.crdt.hlc import pack
from sms.node.core.ephemeral import Presence, Typing


def test_presence_is_last_writer_wins_and_expires() -> None:
    p = Presence(ttl_ms=30_000)
    assert p.status("u", 0) == ("offline", 0)
    assert p.update("u", "online", pack(1_000, 0), "n1")
    assert not p.update("u", "away", pack(900, 0), "n2")  # older: loses
    assert p.status("u", 2_000) == ("online", pack(1_000, 0))
    assert p.status("u", 31_001)[0] == "offline"
    assert p.expired(31_001, set()) == ["u"]
    assert p.expired(31_001, {"u"}) == []


def test_typing_clears_by_itself() -> None:
    t = Typing(timeout_ms=5_000)
    assert t.set("r", "u", True, 0)
    assert not t.set("r", "u", True, 4_000)  # a refresh is not news
    assert t.expire(8_999) == []
    assert t.expire(9_000) == [("r", "u")]
    assert t.typing_in("r") == []
    assert not t.set("r", "u", False, 9_001)
