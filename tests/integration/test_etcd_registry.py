import urllib.request


def test_embedded_etcd_is_healthy(etcd_url: str) -> None:
    with urllib.request.urlopen(etcd_url + "/health", timeout=5) as resp:
        assert b"true" in resp.read()
