"""The result document schema (benchmarks/results.py) and the profile summary (benchmarks/profile.py)."""

import copy

import pytest

from sms.benchmarks.profile import component, summarize_collapsed
from sms.benchmarks.results import SchemaError, result_doc, validate_result

ENV = {"machine": {"logical_cpus": 2}, "versions": {"sms": "0.1.0"}, "git": {"commit": "abc", "dirty": False}}
LAT = {"count": 1, "p50": 1.0, "p95": 1.0, "p99": 1.0, "max": 1.0, "mean": 1.0}


def pt(rate, held):
    return {
        "offered_rate": rate, "duration_s": 10.0, "scheduled": 10, "sent": 10, "acked": 10, "send_errors": 0,
        "not_sent": 0, "expected_deliveries": 20, "delivered": 20, "lost": 0, "loss_ratio": 0.0,
        "duplicates": 0, "delivery_ms": dict(LAT), "ack_ms": dict(LAT), "lag_ms": dict(LAT),
        "throughput": {"sends_per_s": 1.0, "deliveries_per_s": 2.0}, "held": held, "reasons": [],
        "resources": {"node-0": {"cpu_s": 1.0, "cpu_percent": 10.0, "rss_mb": 100.0, "peak_rss_mb": 100.0, "role": "node"}},
    }


def sweep_doc():
    systems = {"sms": {"points": [pt(50, True), pt(100, True), pt(200, False)], "max_sustained_rate": 100}}
    return result_doc("sweep", {"workload": {}}, systems, env=ENV)


def test_a_well_formed_sweep_validates():
    doc = sweep_doc()
    assert doc["schema"] == "sms-bench/1" and doc["git"]["commit"] == "abc"
    assert validate_result(doc) is doc


@pytest.mark.parametrize("breakage", [
    lambda d: d.pop("git"),
    lambda d: d.update(kind="soak"),
    lambda d: d["systems"]["sms"].update(max_sustained_rate=200),
    lambda d: d["systems"]["sms"]["points"][0].pop("delivery_ms"),
    lambda d: d["systems"]["sms"]["points"][0].update(lost=3),
    lambda d: d["systems"]["sms"]["points"][0].update(held="yes"),
    lambda d: d["systems"]["sms"]["points"][0]["ack_ms"].pop("p99"),
    lambda d: d["systems"]["sms"]["points"][0]["resources"]["node-0"].pop("rss_mb"),
    lambda d: d.update(systems={}),
])
def test_broken_documents_are_refused(breakage):
    doc = copy.deepcopy(sweep_doc())
    breakage(doc)
    with pytest.raises(SchemaError):
        validate_result(doc)


def test_profile_summary_attributes_self_and_inclusive_time():
    text = "\n".join([
        "<module> (cli/main.py:1);run (trio/_core/_run.py:1);publish (node/adapters/p2p.py:5);"
        "write (libp2p/stream.py:9) 30",
        "<module> (cli/main.py:1);run (/x/lib/python3.11/site-packages/trio/_core/_run.py:1);"
        "append (/work/main/node/adapters/sql.py:7) 10",
        "<module> (cli/main.py:1);run (trio/_core/_run.py:1) 60",
        "garbage line",
    ])
    s = summarize_collapsed(text)
    assert s["samples"] == 100
    assert dict(s["self_by_component_pct"]) == {"trio": 60.0, "libp2p": 30.0, "sms.node.adapters": 10.0}
    assert dict(s["inclusive_by_component_pct"])["trio"] == 100.0
    assert dict(s["inclusive_by_component_pct"])["sms.node.adapters"] == 40.0
    assert dict(s["by_entry_component_pct"]) == {"trio/stdlib only": 60.0, "sms.node.adapters:publish": 30.0,
                                                    "sms.node.adapters:append": 10.0}
    assert component("/usr/lib/python3.11/json/decoder.py") == "stdlib"
    assert component("threading.py") == "stdlib" and component("<frozen runpy>") == "stdlib"
    assert component("hypercorn/trio/task_group.py") == "hypercorn"
    assert component("/work/main/crdt/hlc.py") == "sms.crdt"


def test_report_tables_and_the_nats_comparison():
    from sms.benchmarks.report import render, versus_nats

    doc = sweep_doc()
    doc["systems"]["nats"] = {"points": [pt(50, True), pt(100, True)], "max_sustained_rate": 100}
    doc["systems"]["nats"]["points"][1]["delivery_ms"]["p99"] = 0.5
    assert versus_nats(doc) == [(50, 1.0, 1.0, 1.0), (100, 1.0, 0.5, 2.0)]
    text = render(doc)
    assert "| sms | 100 |" in text and "| nats | 100 |" in text
    assert text.count("\n| sms | ") == 4  # the summary row and three points
    assert "NATS, fsync per write" not in text
    doc["systems"]["nats-fsync"] = {"points": [pt(100, True)], "max_sustained_rate": 100}
    doc["systems"]["nats-fsync"]["points"][0]["delivery_ms"]["p99"] = 4.0
    assert versus_nats(doc, "nats-fsync") == [(100, 1.0, 4.0, 0.25)]
    assert "| sms / NATS, fsync per write |" in render(doc)
    assert "NATS cluster" not in render(doc)
    doc["systems"]["nats-cluster"] = {"points": [pt(50, True)], "max_sustained_rate": 50}
    doc["systems"]["nats-cluster"]["points"][0]["delivery_ms"]["p99"] = 2.0
    assert versus_nats(doc, "nats-cluster") == [(50, 1.0, 2.0, 0.5)]
    assert "| sms / NATS cluster |" in render(doc)


@pytest.mark.parametrize("other", ["sms-commit-first", "sms-early"])  # sms-early: results from before the switch
def test_report_compares_the_other_sms_mode_with_nats_too(other):
    from sms.benchmarks.report import render, versus_nats

    doc = sweep_doc()
    doc["systems"][other] = {"points": [pt(100, True)], "max_sustained_rate": 100}
    doc["systems"][other]["points"][0]["delivery_ms"]["p99"] = 0.75
    assert f"{other} / NATS" not in render(doc)  # nothing to compare with yet
    doc["systems"]["nats"] = {"points": [pt(100, True)], "max_sustained_rate": 100}
    doc["systems"]["nats"]["points"][0]["delivery_ms"]["p99"] = 0.5
    assert versus_nats(doc, "nats", other) == [(100, 0.75, 0.5, 1.5)]
    text = render(doc)
    assert "| sms / NATS |" in text and f"| {other} / NATS |" in text and f"| {other} | 100 |" in text


def test_the_summary_says_which_sms_a_result_measured():
    from sms.benchmarks.report import summary_table

    doc = sweep_doc()
    doc["systems"]["sms"]["layout"] = {"nodes": 3, "fanout": "early fan-out"}
    doc["systems"]["sms-commit-first"] = {"points": [pt(100, True)], "max_sustained_rate": 100,
                                          "layout": {"nodes": 3, "fanout": "commit first"}}
    text = summary_table(doc)
    assert "| sms (early fan-out) | 100 |" in text and "| sms-commit-first (commit first) | 100 |" in text


def run_doc(rates_p99s: dict[float, tuple[float, float]], baseline: str = "nats") -> dict:
    """One repeated run: {rate: (sms p99, baseline p99)}."""
    doc = result_doc("point", {"workload": {}}, {
        "sms": {"points": [pt(r, True) for r in rates_p99s], "max_sustained_rate": max(rates_p99s)},
        baseline: {"points": [pt(r, True) for r in rates_p99s], "max_sustained_rate": max(rates_p99s)},
    }, env=ENV)
    for i, (mine, theirs) in enumerate(rates_p99s.values()):
        doc["systems"]["sms"]["points"][i]["delivery_ms"]["p99"] = mine
        doc["systems"][baseline]["points"][i]["delivery_ms"]["p99"] = theirs
    return doc


def test_ratios_over_repeated_runs_give_the_median_the_spread_and_the_runs_within_target():
    from sms.benchmarks.report import ratios_over_runs, ratios_table

    docs = [run_doc({800: (3.0, 2.0), 1600: (8.0, 4.0)}),
            run_doc({800: (2.0, 2.0), 1600: (9.0, 4.0)}),
            run_doc({800: (5.0, 2.0), 1600: (6.0, 4.0)}),
            run_doc({1600: (4.0, 4.0)}),
            sweep_doc()]  # no NATS in it: not a pair, left out
    rows = ratios_over_runs(docs)
    assert rows == [
        {"rate": 800, "runs": 3, "median": 1.5, "low": 1.0, "high": 2.5, "within": 2},
        {"rate": 1600, "runs": 4, "median": 1.75, "low": 1.0, "high": 2.25, "within": 3},
    ]
    assert ratios_over_runs(docs, target=1.2)[1]["within"] == 1
    table = ratios_table(docs)
    assert "| 800 | 3 | 1.50 | 1.00 | 2.50 | 2 of 3 |" in table
    assert "| 1600 | 4 | 1.75 | 1.00 | 2.25 | 3 of 4 |" in table
    assert ratios_table(docs, "nats-fsync") == ""
    other = [run_doc({800: (3.0, 6.0)}, baseline="sms-commit-first")]
    assert ratios_over_runs(other, "sms-commit-first")[0]["median"] == 0.5


def test_the_ratio_command_reads_result_files_and_refuses_files_without_the_pair(tmp_path):
    import json

    from typer.testing import CliRunner

    from sms.cli.main import app

    files = []
    for i, p99s in enumerate([(3.0, 2.0), (5.0, 2.0)]):
        files.append(tmp_path / f"point-{i}.json")
        files[-1].write_text(json.dumps(run_doc({1600: p99s})))
    done = CliRunner().invoke(app, ["bench", "ratio", *map(str, files)])
    assert done.exit_code == 0, done.output
    assert "| 1600 | 2 | 2.00 | 1.50 | 2.50 | 1 of 2 |" in done.output
    wide = {"COLUMNS": "1000"}  # typer's error box would wrap the long paths
    done = CliRunner().invoke(app, ["bench", "ratio", *map(str, files), "--baseline", "nats-fsync"], env=wide)
    assert done.exit_code != 0 and "no file measured both sms and nats-fsync" in done.output
    for text in ("{not json", "{}"):
        (tmp_path / "bad.json").write_text(text)
        done = CliRunner().invoke(app, ["bench", "ratio", str(tmp_path / "bad.json")], env=wide)
        assert done.exit_code != 0 and "bad.json is not a result file" in done.output
