"""The anomaly-detection library: pure functions and classes, no params.yaml, no DVC, no Airflow."""
