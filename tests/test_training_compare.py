"""The compare table: latest run per (label, seed), skill first, mean ± sample std over seeds."""

from __future__ import annotations

import pandas as pd

from training.compare import table, to_markdown


def test_table_aggregates_seeds_and_keeps_label_order() -> None:
    runs = pd.DataFrame(
        {
            "label": ["gru", "gru", "cfc", "persistence"],
            "seed": ["0", "1", "0", "0"],
            "metrics.test/rmse_measured_k1": [0.10, 0.20, 0.30, 0.40],
            "metrics.test/rmse_measured_k5": [0.5, 0.7, 0.6, float("nan")],
            "metrics.test/skill_k5": [0.05, 0.07, 0.10, float("nan")],
            "metrics.test/skill_k5_lo": [0.01, 0.02, 0.02, float("nan")],
            "metrics.test/skill_k5_hi": [0.09, 0.12, 0.18, float("nan")],
            "metrics.n_params": [100.0, 100.0, 10.0, 0.0],
        }
    )
    frame = table(runs, ["cfc", "gru", "gru", "persistence"])
    assert frame["model"].tolist() == ["cfc", "gru", "persistence"]
    assert list(frame.columns[:3]) == ["model", "seeds", "skill K=1 (%)"]  # skill leads
    gru = frame.set_index("model").loc["gru"]
    assert gru["seeds"] == "2"
    assert gru["RMSE measured K=1"] == "0.1500 ± 0.0707"  # sample std of 0.1, 0.2
    assert gru["RMSE measured K=5"] == "0.6000 ± 0.1414"
    assert gru["skill K=5 (%)"] == "+6.0 ± 1.4"
    cfc = frame.set_index("model").loc["cfc"]
    assert cfc["skill K=5 (%)"] == "+10.0 [+2.0, +18.0]"  # one run: its bootstrap interval
    persistence = frame.set_index("model").loc["persistence"]
    assert persistence["RMSE measured K=5"] == "-"
    assert persistence["RMSE all K=1"] == "-"  # metric absent from the runs
    md = to_markdown(frame)
    assert md.splitlines()[0].startswith("| model | seeds | skill K=1 (%)")


def test_table_shows_interval_coverage_and_width_at_k5() -> None:
    runs = pd.DataFrame(
        {
            "label": ["cfc"],
            "seed": ["0"],
            "metrics.test/coverage_k5_l0.8": [0.791],
            "metrics.test/width_k5_l0.8": [0.3068],
            "metrics.test/coverage_k5_l0.95": [0.932],
        }
    )
    cfc = table(runs).set_index("model").loc["cfc"]
    assert cfc["coverage 0.8 K=5 (%)"] == "79.1"
    assert cfc["width 0.8 K=5"] == "0.307"
    assert cfc["coverage 0.95 K=5 (%)"] == "93.2"
    assert cfc["width 0.95 K=5"] == "-"
