"""The report of `csrv2 reproduce`: averages, the table, the targets and the plots, from hand-made rows."""

from __future__ import annotations

import pytest

from csrv2.eval.report import markdown_table, plot_results, summarise, target_lines


def _row(task, method, size, score, dead=None, nbytes=12.0):
    return {"task": task, "metric": "accuracy", "method": method, "size": size, "score": score,
            "active_dims": float(size), "dead_latents_pct": dead, "bytes_per_vector": nbytes}


ROWS = [
    _row("a", "dense", 384, 0.90, nbytes=1536.0), _row("b", "dense", 384, 0.70, nbytes=1536.0),
    _row("a", "csrv2-linear", 2, 0.80, dead=50.0), _row("b", "csrv2-linear", 2, 0.60, dead=70.0),
    _row("a", "csr", 8, 0.50, dead=10.0), _row("b", "csr", 8, 0.72, dead=30.0),
    _row("a", "mrl-linear", 32, 0.85),  # task b missing: no average
    _row("a", "csrv2-full", 2, 0.88, dead=5.0), _row("b", "csrv2-full", 2, 0.70, dead=5.0),
]


def test_summary_averages_over_tasks():
    summary = {(s["method"], s["size"]): s for s in summarise(ROWS)}
    assert summary[("dense", None)]["average"] == pytest.approx(0.80)
    assert summary[("csrv2-linear", 2)]["average"] == pytest.approx(0.70)
    assert summary[("csrv2-linear", 2)]["dead_latents_pct"] == pytest.approx(60.0)
    assert summary[("mrl-linear", 32)]["average"] is None


def test_table_and_targets():
    results = {"rows": ROWS, "summary": summarise(ROWS)}
    table = markdown_table(results).splitlines()
    assert table[0].startswith("| method | k / dims | a (accuracy) | b (accuracy) | average | % of dense")
    assert "| CSRv2-linear | 2 | 0.800 | 0.600 | 0.700 | 87.5 | 60.0 | 12.0 |" in table
    assert "| dense | 384 | 0.900 | 0.700 | 0.800 | 100.0 |  | 1536.0 |" in table
    lines = target_lines(results)
    # 0.700 >= CSR k=8 at 0.610 (met); 0.700 >= 0.85 * 0.800 = 0.680 (met); MRL has no average;
    # full 0.790 >= linear 0.700 (met); 0.790 < 0.9 * 0.800 = 0.720? no, 0.790 >= 0.720 (met)
    assert lines == [
        "- CSRv2-linear k = 2 average 0.700 >= CSR at k = 8 (0.610): met",
        "- CSRv2-linear k = 2 average 0.700 >= 85% of dense (0.680): met",
        "- CSRv2 (full) k = 2 average 0.790 >= CSRv2-linear at k = 2 (0.700): met",
        "- CSRv2 (full) k = 2 average 0.790 >= 90% of dense (0.720): met",
    ]
    assert "| CSRv2 (full) | 2 | 0.880 | 0.700 | 0.790 | 98.8 | 5.0 | 12.0 |" in table


def test_the_table_ends_with_what_each_method_trains_on():
    table = markdown_table({"rows": ROWS, "summary": summarise(ROWS)}).splitlines()
    assert table[-2:] == ["", "Trained on: dense: nothing; "
                              "CSRv2-linear, MRL linear: the train split's labels, or its (query, document) pairs; "
                              "CSR: the train split without labels, or its (query, document) pairs; "
                              "CSRv2 (full): the train split's labels, or its (query, document) pairs, backbone included."]


def test_plots_are_written(tmp_path):
    paths = plot_results({"rows": ROWS, "summary": summarise(ROWS)}, tmp_path)
    assert [p.name for p in paths] == ["score_vs_k.png", "dead_latents_vs_k.png"]
    assert all(p.stat().st_size > 1000 and p.read_bytes()[:4] == b"\x89PNG" for p in paths)
    assert not list(tmp_path.glob(".*"))
