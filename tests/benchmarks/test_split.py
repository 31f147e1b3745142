"""benchmarks.split's pure parts: a cell's oracle, regret and speedups come from the measured
records (auto is never its own oracle, failed requests are counted, not timed), the targets are
computed over the cells, rounds put every plan in every position with varying predecessors, the
pictures are written, and a missing zoo model is skipped with a message that says how to get
it. (The measuring itself is the benchmark's run: ``python -m benchmarks.split --quick``.)"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from benchmarks import split

ROOT = Path(__file__).resolve().parents[2]


def _records(ms: list[float], plan: str, ran: str = "cloud", expected: float = 1.0) -> list:
    return [{"ms": m, "plan": plan, "ran": ran, "expected_ms": expected, "encoding": "raw"}
            for m in ms]


def _cell(model="m", link="lte", local=100.0, cloud=80.0, split15=50.0, auto=None,
          auto_plan="split:15"):
    auto = split15 if auto is None else auto
    return split.cell_report(model, link, {
        "local": _records([local - 1, local, local + 30], "local", "local"),
        "cloud": _records([cloud, cloud + 2, cloud - 2], "cloud"),
        "split:15": _records([split15, split15 + 1, split15 - 1], "split:15"),
        "auto": _records([auto, auto + 1, auto - 1], auto_plan),
    })


def test_the_oracle_is_the_fastest_forced_plan_and_auto_is_judged_against_it():
    c = _cell(local=100, cloud=80, split15=50, auto=55)
    assert c.oracle == "split:15" and c.oracle_p50_ms == 50
    assert c.regret == pytest.approx(0.10)
    assert c.best_baseline == "cloud"
    assert c.speedup_vs_local == pytest.approx(100 / 55)
    assert c.speedup_vs_cloud == pytest.approx(80 / 55)
    assert c.vs_best_baseline == pytest.approx(55 / 80 - 1)
    assert c.within_oracle and c.within_baseline
    assert c.auto_choice == "split:15"
    assert c.plans["local"].p99_ms == 130  # the p99 is the slow tail, not the median


def test_auto_faster_than_every_forced_plan_is_not_its_own_oracle():
    c = _cell(local=100, cloud=80, split15=50, auto=40)
    assert c.oracle == "split:15"
    assert c.regret == pytest.approx(40 / 50 - 1)


def test_a_wrong_choice_misses_both_targets():
    c = _cell(local=60, cloud=200, split15=30, auto=66, auto_plan="local")
    assert c.best_baseline == "local"
    assert c.regret == pytest.approx(1.2) and not c.within_oracle
    assert c.vs_best_baseline == pytest.approx(0.10) and not c.within_baseline
    assert c.auto_choice == "local"


def test_the_control_is_never_the_oracle_and_measures_the_noise_floor():
    c = split.cell_report("m", "3g", {
        "local": _records([80, 82, 84], "local", "local"),
        "cloud": _records([900, 910, 920], "cloud"),
        "auto": _records([88, 89, 90], "local", "local"),
        split.CONTROL: _records([70, 72, 74], "local", "local"),  # faster than local itself
    })
    assert c.oracle == "local" and c.best_baseline == "local"
    assert c.control == pytest.approx(72 / 82 - 1)
    assert c.auto_vs_choice == pytest.approx(89 / 82 - 1)  # auto ran local: the same work
    assert not c.within_baseline and c.within_oracle  # +8.5 %: a miss the control explains


def test_failed_requests_are_counted_not_timed_and_a_plan_with_none_ok_is_an_error():
    recs = [*_records([10, 11, 12], "cloud"), {"ms": 30000.0, "error": "DeadlineExceeded"}]
    s = split.plan_stats("cloud", recs)
    assert (s.n, s.errors, s.max_ms) == (3, 1, 12)
    fell = _records([50], "split:3", ran="fallback")
    assert split.plan_stats("split:3", fell).ran == {"fallback": 1}
    with pytest.raises(ValueError, match="no request succeeded"):
        split.plan_stats("cloud", [{"ms": 1.0, "error": "Unavailable"}])
    with pytest.raises(ValueError, match="no local"):
        split.cell_report("m", "3g", {"cloud": recs, "auto": recs})


def test_targets_are_computed_over_the_cells():
    good = [_cell(link=f"l{i}", auto=52) for i in range(9)]  # regret 4 %
    bad = _cell(link="l9", local=60, cloud=200, split15=30, auto=40, auto_plan="local")
    s = split.summary([*good, bad])  # 9 of 10 within 10 %: met; bad is 33 % under local
    assert s["within_10pct_of_oracle"] == 9 and s["share_met"] and s["baseline_met"]
    worse = _cell(link="l8", auto=75)  # 50 % over the oracle, 6 % under cloud (80)
    s = split.summary([*good[:8], worse, bad])
    assert s["share_within_10pct_of_oracle"] == pytest.approx(0.8) and not s["share_met"]
    s = split.summary([*good, _cell(link="x", local=60, cloud=200, split15=30, auto=64)])
    assert not s["baseline_met"] and s["worst_vs_best_baseline_cell"] == "m/x"
    results = {r.metric: r for r in split.results_of(
        [*good, bad], {"m": {"edge_ms": 50.0, "cloud_ms": 10.0, "ratio": 5.0}})}
    assert results["cells_auto_within_10pct_of_oracle"].met is True
    assert results["m_l9_auto_p50"].met is False and results["m_l9_auto_p50"].ratio == \
        pytest.approx(40 / 30)
    assert results["m_l9_auto_vs_best_baseline"].baseline == "local-only"
    assert results["m_edge_over_cloud_compute"].value == 5.0
    assert split.summary([])["share_met"] is False


def test_rounds_put_every_plan_in_every_position_with_varying_predecessors():
    plans = ["local", "cloud", "split:3", "split:15", "auto"]
    n = len(plans)
    orders = [split.round_order(plans, r) for r in range(3 * n)]
    assert orders == [split.round_order(plans, r) for r in range(3 * n)]  # seeded
    for cycle in range(3):
        chunk = orders[cycle * n:(cycle + 1) * n]
        assert all(sorted(o) == sorted(plans) for o in chunk)
        for pos in range(n):  # each position holds each plan once per cycle
            assert Counter(o[pos] for o in chunk) == Counter(plans)
    before_auto = {o[o.index("auto") - 1] for o in orders if o.index("auto") > 0}
    assert len(before_auto) > 1  # a fixed rotation would always put the same plan first
    assert split.round_order([], 3) == []


def test_plan_order_puts_baselines_first_and_splits_by_cut():
    assert split.plan_order(["auto", "split:15", "cloud", "split:3", "local"]) == \
        ["local", "cloud", "split:3", "split:15", "auto"]


def test_the_pictures_are_written(tmp_path):
    pytest.importorskip("matplotlib", reason="the bench extra (matplotlib) is not installed")
    cells = [_cell(link=link, auto=a) for link, a in (("3g", 52), ("wired", 70))]
    cells.append(_cell(model="zoo", link="3g"))
    timeline = {"model": "m", "steps": [{"at_s": 0, "mbps": 20}, {"at_s": 2, "mbps": 1}],
                "requests": [{"t_s": 0.1, "ms": 40, "plan": "split:15"},
                             {"t_s": 2.2, "ms": 90, "plan": "local"}],
                "estimate": [{"t_s": 0.5, "mbps": 18.0}, {"t_s": 2.5, "mbps": 2.0}]}
    written = split.write_plots(tmp_path, cells, timeline, "a footnote")
    names = sorted(p.name for p in written)
    assert names == ["split_latency_m.png", "split_latency_zoo.png", "split_regret.png",
                     "split_timeline.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == names  # nothing else left behind
    for p in written:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_missing_zoo_model_is_skipped_with_the_way_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr(split, "ZOO_DIR", tmp_path)
    said: list[str] = []
    assert split.zoo_model_file(None, said.append) is None
    assert "skipping mobilenet_v3_small" in said[0] and "--torch-python" in said[0]
    said.clear()
    if importlib.util.find_spec("torch") is not None:
        pytest.skip("torch is installed here: the failing export cannot be shown")
    # an interpreter without torch: the export fails and the model is skipped, not the run
    assert split.zoo_model_file(sys.executable, said.append) is None
    assert any("export" in s and "failed" in s for s in said), said
    (tmp_path / "mobilenet_v3_small.onnx").write_bytes(b"x")
    assert split.zoo_model_file(None, said.append) == tmp_path / "mobilenet_v3_small.onnx"


def test_bad_arguments_are_one_line():
    proc = subprocess.run([sys.executable, "-m", "benchmarks.split", "--models", "resnet"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--models: choose from" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_the_switch_is_where_auto_settled_not_a_single_exploring_request():
    reqs = [{"t_s": 0.1 * i, "plan": "split:15", "link": "wifi"} for i in range(10)]
    reqs += [{"t_s": 1.0 + 0.1 * i, "plan": "local", "link": "3g"} for i in range(10)]
    tail = ["local"] * 5 + ["split:15"] + ["local"] * 3 + ["split:15"] * 12  # explores once
    reqs += [{"t_s": 2.0 + 0.1 * i, "plan": p, "link": "wifi"} for i, p in enumerate(tail)]
    phases = [{"link": "wifi", "from_s": 0.0, "to_s": 1.0, "plans": {"split:15": 10}},
              {"link": "3g", "from_s": 1.0, "to_s": 2.0, "plans": {"local": 10}},
              {"link": "wifi", "from_s": 2.0, "to_s": None,
               "plans": dict(Counter(tail))}]
    out = split.switch_times({"requests": reqs, "phases": phases})
    assert [(o["link"], o["settled_plan"]) for o in out] == \
        [("wifi", "split:15"), ("3g", "local"), ("wifi", "split:15")]
    assert out[0]["after_s"] == 0 and out[1]["after_s"] == 0
    assert out[2]["after_s"] == pytest.approx(0.9)  # not 0.5, where it explored once


def test_a_saved_run_is_read_back_and_redrawn(tmp_path):
    pytest.importorskip("matplotlib", reason="the bench extra (matplotlib) is not installed")
    import json
    from dataclasses import asdict

    cells = [_cell(link="3g"), _cell(link="wired", auto=70)]
    doc = {"cells": [{**asdict(c), "within_oracle": c.within_oracle} for c in cells],
           "collapse": None, "machine": {"notes": "n"}}
    saved = tmp_path / "split.json"
    saved.write_text(json.dumps(doc))
    back = split.cells_from_json(json.loads(saved.read_text()))
    assert back == cells
    assert split.main(["--replot", str(saved)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "split.json", "split_latency_m.png", "split_regret.png"]
