from components.gates import absolute_gates, champion_gates, summarise

BOUNDS = {"auroc": {"direction": "higher", "tolerance": 0.01}, "fpr": {"direction": "lower", "tolerance": 0.02}}


def test_absolute_gates_say_which_failed_and_by_how_much():
    gates = absolute_gates({"auroc": 0.85, "average_precision": 0.9, "fpr": 0.2}, 0.9, 0.8, 0.1)
    report = summarise(gates)
    assert not report["passed"]
    assert report["failed"] == ["auroc_min", "fpr_max"]
    assert "below the minimum 0.9 by 0.0500" in report["reasons"][0]
    assert "above the maximum 0.1 by 0.1000" in report["reasons"][1]


def test_missing_metric_fails_its_gate():
    assert not summarise(absolute_gates({"auroc": None, "average_precision": None, "fpr": 0.0}, 0.5, 0.5, 1))["passed"]


def test_worse_than_champion_beyond_tolerance_fails_within_tolerance_passes():
    champion = {"auroc": 0.95, "fpr": 0.05}
    assert summarise(champion_gates({"auroc": 0.945, "fpr": 0.06}, champion, BOUNDS, "3"))["passed"]
    report = summarise(champion_gates({"auroc": 0.90, "fpr": 0.05}, champion, BOUNDS, "3"))
    assert report["failed"] == ["vs_champion_auroc"]
    assert "champion v3" in report["reasons"][0]


def test_no_champion_means_only_absolute_gates_count():
    assert summarise(champion_gates({"auroc": 0.1, "fpr": 0.9}, None, BOUNDS))["passed"]
