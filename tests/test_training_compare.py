"""The compare table: latest run per (label, seed), mean ± sample std over seeds."""

from __future__ import annotations

import pandas as pd

from training.compare import table, to_markdown


def test_table_aggregates_seeds_and_keeps_label_order() -> None:
    runs = pd.DataFrame(
        {
            "label": ["gru", "gru", "cfc", "persistence"],
            "seed": ["0", "1", "0", "0"],
            "metrics.test/rmse_k1": [0.10, 0.20, 0.30, 0.40],
            "metrics.test/rmse_k5": [0.5, 0.7, 0.6, float("nan")],
            "metrics.n_params": [100.0, 100.0, 10.0, 0.0],
        }
    )
    frame = table(runs, ["cfc", "gru", "gru", "persistence"])
    assert frame["model"].tolist() == ["cfc", "gru", "persistence"]
    gru = frame.set_index("model").loc["gru"]
    assert gru["seeds"] == "2"
    assert gru["RMSE K=1"] == "0.1500 ± 0.0707"  # sample std of 0.1, 0.2
    assert gru["RMSE K=5"] == "0.6000 ± 0.1414"
    persistence = frame.set_index("model").loc["persistence"]
    assert persistence["RMSE K=5"] == "-"
    assert persistence["MAE K=1"] == "-"  # metric absent from the runs
    md = to_markdown(frame)
    assert md.splitlines()[0].startswith("| model | seeds | RMSE K=1")
    assert "| cfc | 1 | 0.3000 |" in md
