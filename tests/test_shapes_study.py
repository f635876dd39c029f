"""recipes/shapes_study.py's pure parts: the run plan, the time estimate and the verdict logic."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "shapes_study", Path(__file__).parents[1] / "recipes" / "shapes_study.py"
)
study = importlib.util.module_from_spec(_spec)
sys.modules["shapes_study"] = study  # dataclasses look their module up
_spec.loader.exec_module(study)


def _row(variant, size, seed, geneval, val_loss=1.0, fidelity=0.5, **tags):
    return {"variant": variant, "size": size, "seed": seed, "geneval": geneval, "val_loss": val_loss,
            "fidelity": fidelity, "tags": tags}  # fmt: skip


def test_plan_adds_seeds_for_the_smallest_size_and_puts_the_longest_first():
    jobs = study.plan(list(study.VARIANTS), list(study.SIZES), seeds=2, images=20000)
    assert len(jobs) == 16
    extra = [j for j in jobs if j.seed]
    assert {j.size for j in extra} == {"tiny"} and len(extra) == 4
    costs = [study.job_seconds(j, 20000) for j in jobs]
    assert costs == sorted(costs, reverse=True) and jobs[0].size == "small"
    assert {j.name for j in extra} == {f"{v}-tiny-s1" for v in study.VARIANTS}
    only = study.plan(["rand-cont", "rast-disc"], ["tiny", "mini", "small"], 2, seeded=["rand-cont"])
    assert [j.name for j in only if j.seed] == ["rand-cont-tiny-s1"]


def test_makespan_and_estimate():
    assert study.makespan([3, 2, 2, 1], 2) == 4  # 3+1 | 2+2
    assert study.makespan([3, 2, 2, 1], 1) == 8
    jobs = study.plan(["rand-cont"], ["tiny"], 1, images=1000)
    expect = study.FIXED_S + 1000 / study.RATE[("cont", "tiny")] + study.EVAL_S[("cont", "tiny")]
    assert study.estimate(jobs, 1000, 2) == pytest.approx(expect)


def test_seed_spread_and_compare():
    rows = [_row("rand-cont", "tiny", 0, 0.30), _row("rand-cont", "tiny", 1, 0.26),
            _row("rast-cont", "tiny", 0, 0.10), _row("rast-cont", "tiny", 1, 0.12),
            _row("rand-cont", "mini", 0, 0.35), _row("rast-cont", "mini", 0, 0.34)]  # fmt: skip
    assert study.seed_spread(rows) == pytest.approx(0.04)
    assert study.seed_spread(rows[4:]) is None
    c = study.compare(rows, [("rand-cont", "rast-cont")], lambda r: r["geneval"], 0.04)
    assert [d["size"] for d in c["diffs"]] == ["tiny", "mini"]
    assert c["diffs"][0]["diff"] == pytest.approx(0.28 - 0.11)  # seed means
    assert (c["for_a"], c["for_b"], c["within"]) == (1, 0, 1)
    assert study.verdict_from(c) == "not measurable"  # half within the noise
    c2 = study.compare(rows[:4], [("rand-cont", "rast-cont")], lambda r: r["geneval"], 0.04)
    assert study.verdict_from(c2) == "held"
    c3 = study.compare(rows[:4], [("rast-cont", "rand-cont")], lambda r: r["geneval"], 0.04)
    assert study.verdict_from(c3) == "did not hold"
    assert study.verdict_from(dict(c2, noise=None)) == "not measurable"


def test_power_law_and_correlation_verdicts():
    good = {
        "a": {"b": -0.1, "ci": (-0.2, -0.05), "r2": 0.99},
        "b": {"b": -0.05, "ci": (-0.08, -0.01), "r2": 0.97},
    }
    assert study.power_law_verdict(good) == "held"
    wide = dict(good, c={"b": -0.02, "ci": (-0.3, 0.2), "r2": 0.96})
    assert study.power_law_verdict(wide) == "held, intervals wide"
    poor = dict(good, c={"b": -0.02, "ci": (-0.3, 0.2), "r2": 0.5})
    assert study.power_law_verdict(poor) == "held in direction, not in fit quality"
    rises = dict(good, c={"b": 0.05, "ci": (0.01, 0.09), "r2": 0.99})
    assert study.power_law_verdict(rises) == "did not hold"
    assert study.power_law_verdict({}) == "not measurable"
    assert study.correlation_verdict(-0.95, 0.2, 0.05) == "held"
    assert study.correlation_verdict(0.3, 0.2, 0.05) == "did not hold"
    assert study.correlation_verdict(-0.95, 0.03, 0.05) == "not measurable"
    assert study.correlation_verdict(None, 0.2, 0.05) == "not measurable"
    assert study.correlation_verdict(-0.81, 0.2, 0.05, n=4) == "paper's sign, interval includes 0"
    assert study.correlation_verdict(-0.99, 0.2, 0.05, n=6) == "held"


def test_findings_on_a_made_up_study():
    rows = []
    for size, bonus in (("tiny", 0.0), ("mini", 0.1), ("small", 0.2)):
        for v, base in (("rand-cont", 0.3), ("rast-cont", 0.1), ("rand-disc", 0.2), ("rast-disc", 0.05)):
            loss = 1.0 - bonus
            rows.append(_row(v, size, 0, base + bonus, loss, position=base, counting=base))
            if size == "tiny":
                rows.append(_row(v, size, 1, base + 0.01, loss, position=base, counting=base))
    fits = {"fits": [{"what": "val_loss vs params", "variant": v, "b": -0.1, "b_ci": [-0.2, -0.01],
                      "r2_log": 0.99, "n": 4} for v in study.VARIANTS]}  # fmt: skip
    f = study.findings(rows, fits)
    assert f["noise"] == pytest.approx(study.OVERALL_FLOOR)  # the spread (0.01) is below the floor
    assert f["1_random_vs_raster"]["verdict"] == "held"
    assert f["2_continuous_vs_discrete"]["verdict_geneval"] == "held"
    assert f["3_power_law"]["verdict"] == "held"
    assert f["4_loss_predicts_geneval"]["rand-cont"]["verdict"] == "held"
    assert f["5_larger_scores_higher"]["verdict"] == "held"
    assert "1. random vs raster: **held**" in study.findings_md(f)


def test_markdown_table_rows_have_the_header_s_columns():
    """A delimiter row with a cell too many keeps GitHub from rendering the table at all."""
    row = {"variant": "rand-cont", "size": "tiny", "seed": 0, "params": 451728, "images_seen": 64,
           "val_loss": 0.1, "geneval": 0.5, "tags": dict.fromkeys(study.TAGS, 0.5), "fidelity": 0.7,
           "train_s": 1.0, "eval_s": 1.0}  # fmt: skip
    ceilings = {"vae": {"overall": 1.0, "tags": dict.fromkeys(study.TAGS, 1.0)}}
    lines = study.markdown([row], ceilings).strip().splitlines()
    widths = {line.count("|") for line in lines}
    assert widths == {lines[0].count("|")}, lines
