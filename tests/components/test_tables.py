"""data.kind table: the generated transactions, the fitted encoding, the Great Expectations
suite over a snapshot of batches (one test per way a batch is refused), and the served
model's refusal of a bad frame (a real MLflow model, logged to a SQLite store)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from components.tables import generate_transactions, read_batches
from detector.transform import OTHER, Transform, check_frame
from components.table_validation import TableRules, validate_table

PROJECT = Path(__file__).resolve().parents[2]


def declared_columns() -> dict:
    """params.yaml's table.columns: the schema of the generated transactions."""
    return yaml.safe_load((PROJECT / "params.yaml").read_text())["table"]["columns"]


def rules(**changes) -> TableRules:
    columns = {name: {"type": "numeric", "min": None, "max": None, "allowed": None, "max_null_fraction": 0.0,
                      **rule} for name, rule in declared_columns().items()}
    return TableRules(**{"columns": columns, "min_rows": 100, "min_good": 10, "min_anomalies": 5,
                         "anomaly_ratio": (0.01, 0.2), **changes})


def snapshot(*batches: pd.DataFrame) -> pd.DataFrame:
    return pd.concat([b.assign(batch=f"batch-{i + 1:04d}") for i, b in enumerate(batches)], ignore_index=True)


def failed(report) -> list[str]:
    return [f["description"] for f in report.failures]


def test_the_generated_transactions_are_a_pure_function_of_seed_and_batch():
    a, b = generate_transactions(2000, 3, "batch-0001"), generate_transactions(2000, 3, "batch-0001")
    pd.testing.assert_frame_equal(a, b)
    other = generate_transactions(2000, 3, "batch-0002")
    assert not a["amount"].equals(other["amount"])
    assert a["is_fraud"].sum() == 80 and a["transaction_id"].is_unique
    assert set(a.columns) == {"transaction_id", "is_fraud", *declared_columns()}
    # fraud is rare and different, but no single column separates it
    fraud, normal = a[a["is_fraud"] == 1], a[a["is_fraud"] == 0]
    assert fraud["transactions_last_24h"].median() > normal["transactions_last_24h"].median() or \
        fraud["distance_from_home_km"].median() > normal["distance_from_home_km"].median()


def test_the_encoding_is_fitted_on_the_rows_it_is_given_and_maps_the_unknown_to_other(caplog):
    train = pd.DataFrame({"x": [1.0, 2.0, 3.0, np.nan], "c": ["a", "b", "a", None]})
    transform = Transform.fit(train, {"x": {"type": "numeric"}, "c": {"type": "categorical"}})
    assert transform.numeric["x"]["median"] == 2.0 and transform.categorical["c"] == ["a", "b"]
    assert transform.feature_names() == ["x", "c=a", "c=b", f"c={OTHER}"]
    transform.apply(pd.DataFrame({"x": [1.0, 2.0], "c": ["a", None]}))
    assert not caplog.records  # a missing category is not news
    rows = transform.apply(pd.DataFrame({"x": [2.0, np.nan], "c": ["zzz", "b"]}))
    assert [r.getMessage() for r in caplog.records] == [
        "1 of 2 rows hold a 'c' category the training rows never had ('zzz'): encoded as the column's 'other' slot"]
    assert rows.dtype == np.float32 and rows.shape == (2, 4)
    assert rows[0, 1:].tolist() == [0, 0, 1] and rows[1, 1:].tolist() == [0, 1, 0]  # unseen -> other
    assert rows[0, 0] == rows[1, 0]  # the missing value is the training median
    assert Transform.from_dict(transform.as_dict()) == transform


def test_a_good_snapshot_passes(tmp_path):
    first, second = generate_transactions(1500, 1, "batch-0001"), generate_transactions(800, 1, "batch-0002")
    first.to_csv(tmp_path / "batch-0001.csv", index=False)
    second.to_parquet(tmp_path / "batch-0002.parquet", index=False)
    frame, unreadable = read_batches(tmp_path)
    assert unreadable == [] and sorted(frame["batch"].unique()) == ["batch-0001", "batch-0002"]
    report = validate_table(frame, rules())
    assert report.success, failed(report)
    assert report.label_counts == {"normal": 2208, "anomaly": 92, "unlabelled": 0}


def test_a_missing_column_is_refused():
    batch = generate_transactions(1000, 2).drop(columns=["hour"])
    report = validate_table(snapshot(batch), rules())
    assert not report.success and "the column 'hour' exists" in failed(report)


def test_a_column_of_the_wrong_type_is_refused_and_its_rows_named():
    batch = generate_transactions(1000, 2)
    batch["amount"] = batch["amount"].astype(object)
    batch.loc[[5, 7], "amount"] = "n/a"
    report = validate_table(snapshot(batch), rules())
    [failure] = [f for f in report.failures if f["column"] == "amount"]
    assert "'amount' holds finite numbers (2 rows do not)" in failure["description"]
    assert set(failure["offending_files"]) == {batch.loc[5, "transaction_id"], batch.loc[7, "transaction_id"]}


def test_numbers_categories_and_labels_are_read_alike_from_csv_and_parquet(tmp_path):
    """A store id is a category however a file stores it; a count can be an int column;
    text labels count; an empty export and Spark's _SUCCESS marker add nothing."""
    first, second = generate_transactions(800, 9, "batch-0001"), generate_transactions(800, 9, "batch-0002")
    for batch in (first, second):
        batch["store"] = (batch.index % 5).astype("int64")
        batch["transactions_last_24h"] = batch["transactions_last_24h"].astype("int64")
    second["is_fraud"] = second["is_fraud"].astype(str)
    first.to_csv(tmp_path / "batch-0001.csv", index=False)
    (tmp_path / "batch-0002").mkdir()
    second.to_parquet(tmp_path / "batch-0002" / "part-0.parquet", index=False)
    (tmp_path / "batch-0002" / "_SUCCESS").write_text("")
    first.head(0).to_csv(tmp_path / "batch-0003.csv", index=False)  # header only
    schema = rules()
    schema.columns["store"] = {"type": "categorical", "allowed": None, "max_null_fraction": 0.0}
    frame, unreadable = read_batches(tmp_path, ("transaction_id", "merchant_category", "channel", "store"))
    assert unreadable == [] and set(frame["store"]) == {"0", "1", "2", "3", "4"}
    report = validate_table(frame, schema)
    assert report.success, failed(report)
    assert report.label_counts["anomaly"] == 64
    # the empty file did not turn the number columns into text: ranges and drift still apply
    second["amount"] = second["amount"] * 3
    second.to_parquet(tmp_path / "batch-0002" / "part-0.parquet", index=False)
    assert any("'amount' has not drifted" in d for d in failed(validate_table(read_batches(tmp_path)[0], schema)))


def test_infinite_values_and_bad_labels_are_refused_by_row():
    batch = generate_transactions(1000, 10)
    batch.loc[4, "amount"] = float("inf")
    batch["is_fraud"] = batch["is_fraud"].astype(object)
    batch.loc[6, "is_fraud"] = "yes"
    report = validate_table(snapshot(batch), rules())
    named = {f["description"].rsplit(" (", 1)[0]: f["offending_files"] for f in report.failures}
    assert named["'amount' holds finite numbers"] == [batch.loc[4, "transaction_id"]]
    assert named["every label ('is_fraud') is 0 (normal), 1 (anomaly) or missing"] == [batch.loc[6, "transaction_id"]]


def test_a_recent_batch_with_too_many_nulls_is_refused_though_the_whole_history_is_within_bounds():
    history = [generate_transactions(1500, 11, f"batch-000{i}") for i in (1, 2, 3, 4)]
    history[-1].loc[:149, "distance_from_home_km"] = np.nan  # the geolocation feed went down for a while
    report = validate_table(snapshot(*history), rules())
    [failure] = failed(report)  # about 3 % of the history's distances are missing: within the 5 %
    assert failure.startswith("at most 5% of 'distance_from_home_km' is missing in batch batch-0004 (")


def test_a_category_never_seen_is_refused_declared_or_learnt_from_earlier_batches():
    first, second = generate_transactions(1000, 2, "batch-0001"), generate_transactions(600, 2, "batch-0002")
    second.loc[3, "merchant_category"] = "casino"
    declared = validate_table(snapshot(first, second), rules())
    assert any("'merchant_category' is one of the declared categories" in d for d in failed(declared))
    undeclared = rules()
    undeclared.columns["merchant_category"]["allowed"] = None
    learnt = validate_table(snapshot(first, second), undeclared)
    [failure] = learnt.failures
    assert "batch-0002 has no 'merchant_category' category the earlier batches never had" in failure["description"]
    assert failure["offending_files"] == [second.loc[3, "transaction_id"]]


def test_a_drifted_column_in_the_newest_batch_is_refused():
    first, second = generate_transactions(1500, 4, "batch-0001"), generate_transactions(800, 4, "batch-0002")
    second["transactions_last_24h"] = second["transactions_last_24h"] + 4  # a double-counting export bug
    report = validate_table(snapshot(first, second), rules())
    drifted = [f for f in report.failures if f["column"] == "transactions_last_24h"]
    assert not report.success and drifted and all("has not drifted" in f["description"] for f in drifted)
    assert {f["column"] for f in report.failures} == {"transactions_last_24h"}


def test_a_drifted_batch_keeps_failing_when_a_newer_batch_lands_behind_it():
    first, second, third = (generate_transactions(1000, 4, f"batch-000{i}") for i in (1, 2, 3))
    second["amount"] = second["amount"] * 3
    report = validate_table(snapshot(first, second, third), rules())
    drifted = {f["description"].split(":")[0] for f in report.failures}
    assert not report.success and drifted == {"'amount' has not drifted"}
    assert any("batch-0002" in f["description"] for f in report.failures)
    # only the window of newest batches is checked: an old accepted shift is history
    assert validate_table(snapshot(first, second, third, generate_transactions(1000, 4, "batch-0004")),
                          rules(drift_window=1)).success


def test_a_batch_whose_column_was_constant_is_no_zero_yardstick_for_the_next_one():
    """device_changed stayed 0 all of batch 2 (std 0). Batch 3 is an ordinary day: measured
    in batch 2's std of 0 any change was drift; in the earlier batches' std it is not."""
    first, second, third = (generate_transactions(1000, 4, f"batch-000{i}") for i in (1, 2, 3))
    second["device_changed"] = 0.0
    report = validate_table(snapshot(first, second, third), rules())
    assert report.success, failed(report)
    third["device_changed"] = 1.0  # every card on a new device: drift by any yardstick
    failures = failed(validate_table(snapshot(first, second, third), rules()))
    assert any(f.startswith("'device_changed' has not drifted") and "values were all equal" in f for f in failures)


def test_a_column_declared_without_drift_may_move_between_batches_but_keeps_its_range():
    first, second = generate_transactions(1500, 4, "batch-0001"), generate_transactions(800, 4, "batch-0002")
    second["transactions_last_24h"] = second["transactions_last_24h"] + 4
    columns = {name: {"type": "numeric", "min": None, "max": None, "allowed": None, "max_null_fraction": 0.0,
                      **rule} for name, rule in declared_columns().items()}
    columns["transactions_last_24h"]["drift"] = False
    assert validate_table(snapshot(first, second), rules(columns=columns)).success
    second.loc[0, "transactions_last_24h"] = 501.0  # over its declared max (500)
    assert any("'transactions_last_24h' is within" in f
               for f in failed(validate_table(snapshot(first, second), rules(columns=columns))))


def test_a_label_ratio_outside_its_bounds_is_refused():
    batch = generate_transactions(1000, 5, fraud_rate=0.3)
    report = validate_table(snapshot(batch), rules())
    assert failed(report) == ["the anomaly ratio of the labelled rows is within [0.01, 0.2] (observed 0.3)"]


def test_missing_labels_are_allowed_and_counted_and_an_unreadable_file_fails(tmp_path):
    batch = generate_transactions(1000, 6)
    batch["is_fraud"] = batch["is_fraud"].astype(float)
    batch.loc[:99, "is_fraud"] = np.nan
    batch.to_csv(tmp_path / "batch-0001.csv", index=False)
    (tmp_path / "batch-0002.parquet").write_bytes(b"cut short in the copy")
    frame, unreadable = read_batches(tmp_path)
    report = validate_table(frame, rules(), unreadable)
    assert report.label_counts["unlabelled"] == 100
    assert [f["expectation"] for f in report.failures] == ["readable_files"]
    assert "batch-0002.parquet: cannot be read as PARQUET" in report.failures[0]["description"]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A classifier trained on encoded transactions, logged and registered as the pipeline does."""
    import mlflow

    from pipeline.registry import Store, connect, ensure_experiment, log_detector
    from components.training import TrainSettings, train

    root = tmp_path_factory.mktemp("served")
    frame = generate_transactions(1500, 7)
    transform = Transform.fit(frame, declared_columns())
    spec = {"family": "classifier", "input": "table", "features": transform.width, "width": 8, "latent_dim": 8}
    result = train(spec, transform.apply(frame), frame["is_fraud"].to_numpy(np.float32),
                   TrainSettings(epochs=3, batch_size=128, learning_rate=0.003, weight_decay=0.0, seed=0,
                                 device="cpu", num_threads=1), progress=False)
    import torch

    torch.save(result.model.state_dict(), root / "model.pt")
    client = connect(Store(f"sqlite:///{root / 'mlflow.db'}"))
    experiment = ensure_experiment(client, "tables", (root / "artifacts").as_uri())  # not ./mlruns
    features = list(declared_columns())
    with mlflow.start_run(experiment_id=experiment):
        uri, version = log_detector(root / "model.pt", {"spec": result.spec, "kind": "table",
                                                        "transform": transform.as_dict()}, 0.0,
                                    frame[features].head(3), "tables", [], PROJECT / "detector")
    return mlflow.pyfunc.load_model(f"models:/tables/{version}"), frame


def test_the_served_model_scores_the_feature_columns_and_says_which_it_takes(served):
    model, frame = served
    inputs = model.metadata.get_input_schema().input_names()
    assert inputs == list(declared_columns())
    out = model.predict(frame.head(50))  # the key and label columns are ignored
    assert list(out.columns) == ["anomaly_score", "is_anomaly"] and len(out) == 50
    assert out["is_anomaly"].tolist() == (out["anomaly_score"] > 0.0).tolist()
    scores = model.predict(frame)["anomaly_score"]
    assert scores[frame["is_fraud"] == 1].mean() > scores[frame["is_fraud"] == 0].mean()


@pytest.mark.parametrize("change, words", [
    (lambda f: f.drop(columns=["amount"]), ["missing", "amount"]),
    (lambda f: f.assign(hour="noon"), ["hour"]),
])
def test_the_served_model_refuses_a_frame_with_a_missing_column_or_a_wrong_type(served, change, words):
    model, frame = served
    with pytest.raises(Exception) as refused:
        model.predict(change(frame.head(5)))
    assert all(word in str(refused.value) for word in words), str(refused.value)


def test_the_served_model_takes_int_and_bool_columns_for_numbers_and_any_type_of_category(served):
    model, frame = served
    sample = frame.head(20).copy()
    expected = model.predict(sample)["anomaly_score"]
    sample["transactions_last_24h"] = sample["transactions_last_24h"].astype("int64")
    sample["device_changed"] = sample["device_changed"].astype(bool)
    pd.testing.assert_series_equal(model.predict(sample)["anomaly_score"], expected)
    with pytest.raises(Exception, match="'amount' must be a finite number; row 1"):
        model.predict(sample.assign(amount=[1.0, float("inf")] + [2.0] * 18))


def test_the_pyfunc_checks_the_frame_itself_too():
    """MLflow's signature check can be bypassed (a model unwrapped, a signature dropped):
    the model's own check names the column as well."""
    transform = Transform.fit(generate_transactions(200, 8), declared_columns())
    with pytest.raises(ValueError, match="missing the feature column\\(s\\) channel"):
        check_frame(generate_transactions(10, 8).drop(columns=["channel"]), transform)
    with pytest.raises(ValueError, match="column 'amount' must be numeric; row 2 holds 'ten'"):
        check_frame(generate_transactions(10, 8).astype({"amount": object}).assign(
            amount=lambda f: f["amount"].where(f.index != 2, "ten")), transform)
    with pytest.raises(ValueError, match="input must be a DataFrame"):
        check_frame([1, 2, 3], transform)


# Records whose numbers overflow the encoding, and scores that are not numbers (issue 19,
# item 4). A finite amount of 1e300 standardises to ~1e298, which is inf as a float32: the
# networks then give NaN (or -inf) scores, read as "normal". Such a row is refused by
# column and row wherever rows are encoded (preprocess, the served model, pipeline score),
# and a score that is not a finite number is never normal (is_anomaly is True).

TABLE_FAMILIES = ("autoencoder", "deep_sad", "classifier")


def _table_layout(root: Path):
    from pipeline.config import parse
    from pipeline.layout import Layout

    raw = yaml.safe_load((PROJECT / "params.yaml").read_text())
    raw["data"]["kind"] = "table"
    raw["model"]["type"] = "deep_sad"
    return Layout(root, parse(raw))


@pytest.fixture(scope="module")
def served_families(tmp_path_factory):
    """One trained model of each table family, logged, registered and loaded as a pyfunc."""
    import mlflow
    import torch

    from pipeline.registry import Store, connect, ensure_experiment, log_detector
    from components.training import TrainSettings, train

    root = tmp_path_factory.mktemp("families")
    frame = generate_transactions(800, 12)
    transform = Transform.fit(frame, declared_columns())
    client = connect(Store(f"sqlite:///{root / 'mlflow.db'}"))
    experiment = ensure_experiment(client, "families", (root / "artifacts").as_uri())
    models = {}
    for family in TABLE_FAMILIES:
        spec = {"family": family, "input": "table", "features": transform.width, "width": 8, "latent_dim": 8}
        result = train(spec, transform.apply(frame), frame["is_fraud"].to_numpy(np.float32),
                       TrainSettings(epochs=1, batch_size=128, learning_rate=0.003, seed=0, device="cpu",
                                     num_threads=1), progress=False)
        weights = root / f"{family}.pt"
        torch.save(result.model.state_dict(), weights)
        with mlflow.start_run(experiment_id=experiment):
            _, version = log_detector(weights, {"spec": result.spec, "kind": "table",
                                                "transform": transform.as_dict()}, 0.5,
                                      frame[list(declared_columns())].head(3), family, [], PROJECT / "detector")
        models[family] = mlflow.pyfunc.load_model(f"models:/{family}/{version}")
    return models, frame


@pytest.mark.parametrize("family", TABLE_FAMILIES)
@pytest.mark.parametrize("value", [1e300, -1e300])
def test_a_number_too_large_to_encode_is_refused_by_column_and_row_by_every_family(served_families, family, value):
    models, frame = served_families
    sample = frame.head(6).copy()
    sample.loc[3, "amount"] = value
    with pytest.raises(Exception) as refused:
        out = models[family].predict(sample)
        pytest.fail(f"scored instead of refused: {out.to_dict('list')}")
    message = str(refused.value)
    assert "'amount'" in message and "row 3" in message, message
    # the other rows alone are scored, with finite scores
    assert np.isfinite(models[family].predict(sample.drop(index=3))["anomaly_score"]).all()


def test_the_encoding_refuses_an_overflowing_row_by_its_label_as_preprocess_encodes_a_split():
    transform = Transform.fit(generate_transactions(300, 13), declared_columns())
    rows = generate_transactions(20, 14).sort_values("transaction_id", ascending=False)  # preprocess's order
    rows.loc[7, "distance_from_home_km"] = -1e300
    with pytest.raises(ValueError, match=r"column 'distance_from_home_km'.*row 7"):
        transform.apply(rows)


@pytest.mark.parametrize("family", TABLE_FAMILIES)
def test_pipeline_score_names_the_column_and_the_record_of_an_overflowing_or_infinite_value(served_families, family,
                                                                                             tmp_path, monkeypatch):
    """``pipeline score <folder> --out`` (the registry look-up replaced by the family's model)
    on CSV text as a producer writes it: 1e300, -1e300 and inf are refused by column and by
    the record's key (a file of 600 rows, so the bad record is past the first chunk the model
    is given); NaN text is a missing value, imputed as in training, and scored."""
    from pipeline import score

    models, _ = served_families
    monkeypatch.setattr(score, "_load", lambda *args, **kwargs: (models[family], "models:/anomaly-detector/1", "1"))
    layout = _table_layout(tmp_path / "project")
    folder = tmp_path / "incoming"
    folder.mkdir()
    batch = generate_transactions(600, 15).drop(columns=["is_fraud"])
    bad_row = 421
    key = batch.loc[bad_row, "transaction_id"]
    for name, text in (("over", "1e300"), ("under", "-1e300"), ("infinite", "inf"), ("missing", "NaN")):
        rows = batch.astype({"amount": object})
        rows.loc[bad_row, "amount"] = text
        rows.to_csv(folder / f"{name}.csv", index=False)
    score.run(layout, folder, tmp_path / "scores.csv")
    table = pd.read_csv(tmp_path / "scores.csv", keep_default_na=False, na_values=[""])
    table["error"] = table["error"].fillna("")
    errors = dict(zip(table.loc[table["error"] != "", "file"], table.loc[table["error"] != "", "error"]))
    assert set(errors) == {"over.csv", "under.csv", "infinite.csv"}, table.groupby("file")["error"].first()
    for name, message in errors.items():
        assert "'amount'" in message and key in message, (name, message)
    assert table.loc[table["error"] != "", "is_anomaly"].all()  # not scored is never read as normal
    scored = table[table["file"] == "missing.csv"]
    assert len(scored) == 600 and np.isfinite(scored["anomaly_score"]).all()


class _FixedScores:
    """A stand-in network whose scores are given: what a model whose arithmetic overflowed returns."""

    def __init__(self, scores):
        import torch

        self.scores = torch.tensor(scores, dtype=torch.float32)
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def eval(self):
        return self

    def parameters(self):
        return iter([self.weight])

    def score(self, batch):
        return self.scores[: len(batch)]


def test_a_score_that_is_not_a_finite_number_is_never_normal_in_the_served_model():
    from detector.serving import AnomalyDetector

    frame = generate_transactions(5, 16)
    detector = AnomalyDetector()
    detector.transform = Transform.fit(generate_transactions(200, 16), declared_columns())
    detector.threshold = 1.0
    detector.model = _FixedScores([0.5, float("nan"), float("-inf"), float("inf"), 2.0])
    out = detector.predict(None, frame)
    assert out["is_anomaly"].tolist() == [False, True, True, True, True]
    assert out["anomaly_score"].isna().tolist() == [False, True, False, False, False]  # the score is shown as is


def test_pipeline_score_flags_a_non_finite_score_even_from_a_champion_that_did_not(tmp_path):
    """A champion registered before this rule (its code travels with it) read a -inf or NaN
    score as normal: pipeline score applies the rule to what any champion returns."""
    from pipeline.score import score_table_files

    class OldChampion:
        def predict(self, frame, params=None):
            scores = np.array([0.1, float("nan"), float("-inf"), 3.0][: len(frame)])
            return pd.DataFrame({"anomaly_score": scores, "is_anomaly": scores > 1.0})

    generate_transactions(4, 17).to_csv(tmp_path / "batch.csv", index=False)
    table = score_table_files(OldChampion(), [tmp_path / "batch.csv"], tmp_path, "transaction_id", ())
    assert table["is_anomaly"].tolist() == [False, True, True, True]


def test_gates_read_a_metric_that_is_not_a_number_as_missing_never_as_passed():
    from components.gates import absolute_gates, champion_gates

    nan = float("nan")
    candidate = {"auroc": nan, "average_precision": nan, "fpr": nan}
    for gate in absolute_gates(candidate, 0.5, 0.5, 0.5):
        assert not gate.passed and "not a finite number" in gate.reason, gate
    bounds = {"auroc": {"direction": "higher", "tolerance": 0.0}, "fpr": {"direction": "lower", "tolerance": 0.0}}
    for champion in ({"auroc": None, "fpr": None}, {"auroc": 0.9, "fpr": 0.1}):
        for gate in champion_gates(candidate, champion, bounds, "1"):
            assert not gate.passed, gate
    # a champion whose metric is not a number is no yardstick: as if it had none
    [auroc, fpr] = champion_gates({"auroc": 0.9, "fpr": 0.1}, {"auroc": nan, "fpr": nan}, bounds, "1")
    assert auroc.passed and fpr.passed


@pytest.mark.parametrize("stage", ["calibrate", "evaluate"])
def test_calibrate_and_evaluate_refuse_scores_that_are_not_numbers_and_name_the_records(tmp_path, stage):
    """train refuses non-finite scores before it writes them; a scores file that holds some
    anyway (written by hand, an older train) is refused, not read as normal nor dropped."""
    import importlib

    from pipeline.io import StageError, write_json

    layout = _table_layout(tmp_path)
    rng = np.random.default_rng(0)
    rows = []
    for split in ("calibration", "test"):
        for i in range(200):
            rows.append({"path": f"{split}-{i:04d}", "split": split, "row": i, "label": "1" if i % 10 == 0 else "0",
                         "is_anomaly": int(i % 10 == 0), "score": float(rng.random()), "batch": "b"})
    scores = pd.DataFrame(rows)
    split = "calibration" if stage == "calibrate" else "test"
    scores.loc[(scores["split"] == split) & (scores["row"] == 17), "score"] = float("nan")
    scores.loc[(scores["split"] == split) & (scores["row"] == 40), "score"] = float("-inf")
    layout.scores.parent.mkdir(parents=True, exist_ok=True)
    scores.to_parquet(layout.scores, index=False)
    layout.threshold.parent.mkdir(parents=True, exist_ok=True)
    write_json(layout.threshold, {"threshold": 0.5, "method": "fpr", "fpr_bound": 0.05})
    with pytest.raises(StageError) as refused:
        importlib.import_module(f"pipeline.stages.{stage}").run(layout)
    assert f"{split}-0017" in str(refused.value) and f"{split}-0040" in str(refused.value), str(refused.value)
