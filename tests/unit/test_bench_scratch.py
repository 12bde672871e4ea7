"""Where a benchmark run keeps its clusters' data (benchmarks/runner.py, scratch_dir): a temporary
directory is removed after a run that ends well and kept, with its path said, after one that
fails; a directory the user named is always kept."""

from __future__ import annotations

from pathlib import Path

import pytest

from sms.benchmarks.runner import scratch_dir


def test_a_temporary_directory_goes_when_the_run_ends_well():
    said: list[str] = []
    with scratch_dir(None, said.append) as wd:
        (wd / "pg").mkdir()
        (wd / "pg" / "wal").write_bytes(b"x" * 1000)
    assert not wd.exists() and said == []


def test_a_temporary_directory_stays_when_the_run_fails_and_its_path_is_said():
    said: list[str] = []
    with pytest.raises(RuntimeError):
        with scratch_dir(None, said.append) as wd:
            (wd / "up.log").write_text("what went wrong")
            raise RuntimeError("cluster did not start")
    assert (wd / "up.log").read_text() == "what went wrong"
    assert said and str(wd) in said[0]
    (wd / "up.log").unlink()
    wd.rmdir()


def test_a_named_directory_is_made_and_kept(tmp_path: Path):
    base = tmp_path / "runs" / "mine"
    with scratch_dir(base, print) as wd:
        (wd / "data").write_text("kept")
    assert wd == base and (base / "data").read_text() == "kept"
