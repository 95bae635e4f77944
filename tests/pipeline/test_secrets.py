"""pipeline.secrets: what the scrubber takes out of a text, and what it leaves alone.
(tests/e2e/test_no_leaked_credentials.py checks that every sink goes through it.)"""
from __future__ import annotations

import json
import logging
from urllib.parse import quote

import pytest

from pipeline import tracking
from pipeline.io import StageError
from pipeline.secrets import ScrubbingFormatter, literals, scrub, scrub_data, scrubbed_error

NO_SECRETS: dict[str, str] = {}


@pytest.mark.parametrize("text, expected", [
    ("http://someuser:S3cretPassw0rd@127.0.0.1:5000", "http://***@127.0.0.1:5000"),
    ("https://u:p@mlflow.example.com/api/2.0/mlflow/runs/get?run_id=1",
     "https://***@mlflow.example.com/api/2.0/mlflow/runs/get?run_id=1"),
    ("postgresql+psycopg2://mlflow:pw@db:5432/mlflow", "postgresql+psycopg2://***@db:5432/mlflow"),
    ("s3://AKIAEXAMPLE:wJalrXUtnFEMI@bucket/key", "s3://***@bucket/key"),
    ("redis://:brokerpass@redis:6379/0", "redis://***@redis:6379/0"),
    ("https://ghp_token0123456789@github.com/org/repo.git", "https://***@github.com/org/repo.git"),
    ("http://u:p%40ss%2Fw0rd%3A@host:1/x", "http://***@host:1/x"),            # percent-encoded
    ("http://u:p@ss:w:rd!$&()*+,;=@host/x", "http://***@host/x"),             # raw specials, @ and : in it
    ("http://[::1]:5000/x", "http://[::1]:5000/x"),
    ("sqlite:////home/me/project/mlflow.db", "sqlite:////home/me/project/mlflow.db"),
    ("http://127.0.0.1:5000/path@not-userinfo", "http://127.0.0.1:5000/path@not-userinfo"),
    ("mail me at me@example.com", "mail me at me@example.com"),
])
def test_the_userinfo_of_any_url_is_masked_and_the_rest_is_kept(text, expected):
    assert scrub(text, NO_SECRETS) == expected


def test_urls_inside_error_texts_json_and_reprs_are_found():
    error = ("API request to http://someuser:S3cretPassw0rd@127.0.0.1:9/api/2.0/mlflow/registered-models/alias "
             "failed with exception HTTPConnectionPool(host='127.0.0.1', port=9): Max retries exceeded")
    assert "S3cretPassw0rd" not in scrub(error, NO_SECRETS)
    assert "http://***@127.0.0.1:9/api/2.0/mlflow" in scrub(error, NO_SECRETS)
    compact = json.dumps({"a": "http://u:pw1@h:1", "b": "x@y"}, separators=(",", ":"))
    assert json.loads(scrub(compact, NO_SECRETS)) == {"a": "http://***@h:1", "b": "x@y"}  # one string at a time
    shown = repr({"uri": "postgresql://u:pw2@db/x"})
    assert scrub(shown, NO_SECRETS) == repr({"uri": "postgresql://***@db/x"})
    two = "http://a:one@h1/x and https://b:two@h2/y"
    assert scrub(two, NO_SECRETS) == "http://***@h1/x and https://***@h2/y"


def test_the_environments_secret_values_are_masked_as_text_in_every_form():
    password = "p@ss/w:rd 9%"
    environ = {"MLFLOW_TRACKING_URI": f"http://someuser:{quote(password, safe='')}@127.0.0.1:5000",
               "MLFLOW_TRACKING_PASSWORD": "an0ther-Secret", "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENG",
               "MY_SERVICE_API_KEY": "sk-live-1234567", "AWS_ACCESS_KEY_ID": "AKIAIDNOTSECRET",
               "TOKENIZERS_PARALLELISM": "false", "GOOGLE_APPLICATION_CREDENTIALS_FILE": "/etc/creds.json",
               "HOME": "/root", "SOME_TOKEN": "off"}
    known = literals(environ)
    text = (f"decoded {password} | encoded {quote(password, safe='')} | an0ther-Secret | "
            f"{quote('wJalrXUtnFEMI/K7MDENG', safe='')} | sk-live-1234567 | AKIAIDNOTSECRET | /root | false")
    scrubbed = scrub(text, known)
    for secret in (password, quote(password, safe=""), "an0ther-Secret", "wJalrXUtnFEMI", "sk-live-1234567"):
        assert secret not in scrubbed, (secret, scrubbed)
    for kept in ("AKIAIDNOTSECRET", "/root", "false"):  # an id, a path, a word: not secrets
        assert kept in scrubbed, (kept, scrubbed)
    assert "/etc/creds.json" not in known


def test_a_short_or_plain_value_is_not_masked_as_text_but_still_in_a_url():
    known = literals({"MLFLOW_TRACKING_URI": "http://u:abc@host:1", "MLFLOW_TRACKING_PASSWORD": "xyz"})
    assert scrub("abc and xyz are words", known) == "abc and xyz are words"
    assert scrub("http://u:abc@host:1/api", known) == "http://***@host:1/api"


def test_by_default_it_reads_this_processes_environment(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://someuser:Env-Passw0rd@127.0.0.1:5000")
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "tok-0123456789")
    assert scrub("auth Env-Passw0rd; bearer tok-0123456789") == "auth ***; bearer ***"


def test_structures_exceptions_and_log_lines_are_scrubbed(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "Log-Passw0rd")
    data = {"tracking_uri": "http://u:p@h:1", "reasons": ["x Log-Passw0rd", 1.5, None], "n": 3,
            "nested": ({"http://u:p@h:1": True},)}
    assert scrub_data(data) == {"tracking_uri": "http://***@h:1", "reasons": ["x ***", 1.5, None], "n": 3,
                                "nested": ({"http://***@h:1": True},)}

    plain = ValueError("nothing secret")
    assert scrubbed_error(plain) is None
    stage = StageError("score: cannot load models:/m@champion: http://u:Log-Passw0rd@h:1")
    assert scrubbed_error(stage) is stage and str(stage) == "score: cannot load models:/m@champion: http://***@h:1"
    other = scrubbed_error(ConnectionError("API request to http://u:p@h:1/api failed"))
    assert isinstance(other, StageError) and str(other) == "ConnectionError: API request to http://***@h:1/api failed"

    formatter = ScrubbingFormatter(logging.Formatter("%(levelname)s %(message)s"))
    record = logging.LogRecord("mlflow", logging.WARNING, __file__, 1, "retrying %s", ("http://u:p@h:1/api",), None)
    assert formatter.format(record) == "WARNING retrying http://***@h:1/api"


def test_tracking_shown_is_the_same_scrubber():
    assert tracking.shown("http://someuser:S3cret@127.0.0.1:5000") == "http://***@127.0.0.1:5000"
    assert tracking.shown("sqlite:////tmp/mlflow.db") == "sqlite:////tmp/mlflow.db"
