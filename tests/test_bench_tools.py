"""The pieces of `make bench` that turn measurements into the README's figures (the runs
themselves are not unit-tested: they take minutes and need the machine to themselves)."""

from __future__ import annotations

import math
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import bench_relay  # noqa: E402
from _bench_peers import Delays  # noqa: E402
from bench_svg import cpu_chart  # noqa: E402


def test_chart_is_svg_with_a_point_per_measurement_and_a_legend_per_stack():
    svg = cpu_chart({"bare relay": [(50, 0.12), (100, 0.10)], "shim": [(50, 0.18), (100, 0.16), (150, 0.13)]},
                    subtitle="2 cores <shared>")
    root = ET.fromstring(svg)
    ns = "{http://www.w3.org/2000/svg}"
    assert len(root.findall(f"{ns}circle")) == 5
    texts = [t.text for t in root.iter(f"{ns}text")]
    assert "bare relay" in texts and "shim" in texts and "2 cores <shared>" in texts
    # lower CPU is drawn lower: y grows downwards in SVG
    ys = {c.find(f"{ns}title").text: float(c.get("cy")) for c in root.findall(f"{ns}circle")}
    assert ys["shim, N=50: 0.180"] < ys["bare relay, N=50: 0.120"]


def test_frames_a_bridge_may_drop_after_a_barge_in_are_not_lost():
    d = Delays()
    d.window(0.0, 10.0)
    d.on_send(1, 1.0, 0.0)
    d.on_send(2, 1.1, 0.0, optional=True)  # sent after the caller started talking over the answer
    d.on_send(3, 1.2, 0.0, optional=True)
    d.on_recv(1, 1.001)
    d.on_recv(3, 1.202)  # one optional frame got through before the bridge cut the answer off
    assert d.lost() == 0
    assert len(d.samples) == 2
    d.on_send(4, 2.0, 0.0)  # an ordinary frame that never arrives is lost
    assert d.lost() == 1


def _result(stack: str, n: int, cpu: float, **extra) -> bench_relay.Result:
    nan3 = [math.nan] * 3
    fields = dict(stack=stack, calls=n, window_s=15.0, cpu_per_call_min=cpu, pg_cpu_per_call_min=None,
                  mib_per_call=0.05, rss_idle_mib=40.0, rss_live_mib=42.0, c2m_ms=[0.3, 1.0, 2.0],
                  m2c_ms=[0.3, 1.0, 2.0], c2m_frames=1, m2c_frames=1, c2m_lost=0, m2c_lost=0, late_frames=0,
                  max_late_ms=1.0, server_cpu_pct=10.0, pg_cpu_pct=0.0, gen_cpu_pct=20.0, other_cpu_pct=0.0,
                  dropped_calls=0, untagged_media=0, late_ms=[0.1, 1.0, 2.0], setup_ms=nan3, start_update_ms=nan3,
                  start_connect_ms=nan3, created_update_ms=nan3, clear_ms=nan3, connect_ms=nan3)
    fields.update(extra)
    return bench_relay.Result(**fields)


def test_report_takes_each_ratio_against_the_bare_relay_of_the_same_size(tmp_path):
    results = [_result("bare", 50, 0.10), _result("shim", 50, 0.15), _result("bare", 100, 0.08),
               _result("shim", 100, 0.16, clear_trigger="caller frame", clears=3, clear_ms=[0.9, 1.5, 1.6])]
    meta = {"media": "one-port", "cpus": 2, "cpu": "test", "python": "3.11", "when": "now", "talk": 3.0,
            "cycle": 6.0, "ramp": 3.0, "seconds": 15.0, "source_version": "abc"}
    rows = [line for line in bench_relay.report(results, meta).splitlines() if line.startswith("| shim |")]
    assert "| 1.50 |" in rows[0] and "| 2.00 |" in rows[1]
    assert "0.90 / 1.50 / 1.60 (from caller frame)" in "\n".join(rows)
    # --from-json gives back the same table (NaN survives the JSON round trip as null)
    bench_relay.save(results, meta, tmp_path / "b.json", tmp_path / "b.svg")
    again, meta2 = bench_relay.load(tmp_path / "b.json")
    assert bench_relay.report(again, meta2) == bench_relay.report(results, meta)
    ET.fromstring((tmp_path / "b.svg").read_text())


def test_with_several_rounds_each_ratio_is_taken_within_its_round():
    results = [_result("bare", 50, 0.10, round=0, other_cpu_pct=90.0), _result("shim", 50, 0.15, round=0),
               _result("bare", 50, 0.20, round=1), _result("shim", 50, 0.24, round=1, other_cpu_pct=50.0),
               _result("bare", 50, 0.10, round=2, other_cpu_pct=40.0), _result("shim", 50, 0.17, round=2)]
    rows, ratios = bench_relay.shown(results)
    assert ratios[("shim", 50)] == "1.50 (1.20–1.70, 3 rounds)"
    # each stack's row is its quietest round
    assert [(r.stack, r.round) for r in rows] == [("bare", 1), ("shim", 0)]
