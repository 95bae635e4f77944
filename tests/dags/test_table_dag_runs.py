"""data.kind: table through the same DAGs (``airflow dags test``) in a scratch project of
generated card transactions: the retraining registers and promotes an MLP whose pyfunc
takes the feature columns; the scoring DAG scores the records of incoming CSV/Parquet files;
a drifted nightly batch is refused by validation, registers nothing and leaves the champion.
"""
from __future__ import annotations

import pandas as pd
import pytest

from conftest import make_workspace, run_cli
from test_retrain_dag_runs import LOW_GATES, champion, client, dags_test, task_states, versions

pytestmark = [pytest.mark.slow, pytest.mark.e2e]
TABLE = {"data": {"kind": "table"}, "model": {"type": "deep_sad"}, "train": {"batch_size": 128}}


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = make_workspace(tmp_path_factory.mktemp("table") / "project", {**LOW_GATES, **TABLE}, with_data=False)
    run_cli(root, "generate-data", "--rows", "3000")
    return root


def test_a_table_run_trains_registers_and_promotes_a_champion_of_the_feature_columns(ws):
    result = dags_test(ws)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert set(task_states(ws).values()) == {"success"}
    assert champion(ws) == "1"
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{ws / 'mlflow.db'}")
    model = mlflow.pyfunc.load_model("models:/anomaly-detector@champion")
    assert model.metadata.get_input_schema().input_names() == [
        "amount", "hour", "merchant_category", "distance_from_home_km", "device_changed", "card_present",
        "transactions_last_24h", "channel"]
    run = client(ws).get_run(client(ws).get_model_version("anomaly-detector", "1").tags["run_id"])
    assert run.data.params["data.kind"] == "table"
    assert run.data.metrics["test_auroc"] > 0.8  # the generated fraud is learnable
    assert run.data.metrics["serving_parity_max_abs_diff"] < 1e-4  # the pyfunc encodes rows as training did
    encoding = (ws / "runs" / "latest" / "data" / "processed" / "transform.json").read_text()
    assert "merchant_category" in encoding


def test_the_scoring_dag_scores_the_records_of_incoming_files(ws):
    from components.tables import generate_transactions

    incoming = ws / "data" / "incoming"
    incoming.mkdir(parents=True)
    fresh = generate_transactions(40, 99, "stream-1")
    fresh.drop(columns=["is_fraud"]).to_csv(incoming / "terminal-7.csv", index=False)
    fresh.head(10).to_parquet(incoming / "terminal-8.parquet", index=False)
    fresh.drop(columns=["channel"]).to_csv(incoming / "old-export.csv", index=False)
    result = run_cli(ws, "airflow", "dags", "test", "score_with_champion", check=False, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    [csv] = list((ws / "scores").glob("*.csv"))
    table = pd.read_csv(csv, keep_default_na=False)
    scored = table[table["error"] == ""]
    assert len(scored) == 50 and set(scored["file"]) == {"terminal-7.csv", "terminal-8.parquet"}
    assert set(scored["row"]) == set(fresh["transaction_id"])
    [refused] = table[table["error"] != ""].itertuples()
    assert refused.file == "old-export.csv" and "channel" in refused.error
    assert set(table["model_version"].astype(str)) == {"1"}
    assert not [p for p in incoming.rglob("*") if p.is_file()]  # every file archived, the refused one too


def test_a_drifted_batch_is_refused_and_the_champion_stays(ws):
    from components.tables import generate_transactions

    drifted = generate_transactions(1500, 5, "batch-0002")
    drifted["amount"] = drifted["amount"] * 100  # cents exported as the currency unit
    drifted.to_csv(ws / "data" / "landing" / "batch-0002.csv", index=False)
    before = versions(ws)
    result = dags_test(ws)
    assert result.returncode != 0
    states = task_states(ws)
    assert states["validate"] == "failed" and states["register"] != "success"
    report = (ws / "runs" / "latest" / "reports" / "validation" / "summary.json").read_text()
    assert "'amount' has not drifted" in report
    assert versions(ws) == before and champion(ws) == "1"
