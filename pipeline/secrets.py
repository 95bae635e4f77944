"""Keeping credentials out of what the pipeline writes and prints.

MLFLOW_TRACKING_URI may carry ``user:password@`` (the supported way to give the MLflow client
basic-auth credentials), and MLflow names that URL, password and all, in its exception texts;
a database or broker URL does the same. Every text that leaves the process (a report, a
summary, ``runs/failures.jsonl``, an MLflow tag, an error file, a log line) goes through
``scrub`` first:

- the userinfo of any URL (``scheme://user:password@host``, any scheme) becomes ``***``,
  so the URL still says which server it was;
- the values of this environment's secrets are masked wherever they appear as they are:
  the variables named in SECRET_ENV or whose names say they hold one (``*_PASSWORD``,
  ``*_SECRET*``, ``*_TOKEN``...), and the password of every URL in the environment, plain
  and percent-encoded (a password that breaks the URL's shape is still caught this way).

A value shorter than MIN_LITERAL characters, or a word like ``true``, is not masked as text:
it would blank ordinary words. It is still masked inside a URL.
"""
from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote, quote_plus, unquote

MASK = "***"
MIN_LITERAL = 4

# scheme://userinfo@ up to the last @ before the authority ends (as urlsplit reads it); a blank,
# a quote, a bracket or a backslash (a JSON or repr escape) ends it too. Bounded scheme: linear time
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]{0,31}://)(?P<userinfo>[^\s/?#'\"<>\\]*)@")

SECRET_ENV = (
    "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "MLFLOW_FLASK_SERVER_SECRET_KEY", "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN", "AZURE_STORAGE_ACCESS_KEY", "AZURE_STORAGE_CONNECTION_STRING", "AZURE_CLIENT_SECRET",
    "DATABRICKS_TOKEN", "DATABRICKS_CLIENT_SECRET", "AIRFLOW__CORE__FERNET_KEY", "AIRFLOW__API_AUTH__JWT_SECRET",
    "AIRFLOW__API__SECRET_KEY", "AIRFLOW__WEBSERVER__SECRET_KEY", "PGPASSWORD", "POSTGRES_PASSWORD",
    "MINIO_ROOT_PASSWORD",
)
# a name that says it holds a secret; not one that names a file, a folder or an id
_SECRET_NAME = re.compile(r"(?:^|_)(?:PASSWORD|PASSWD|SECRET|TOKEN|FERNET|PRIVATE_KEY|CREDENTIALS?|"
                          r"API_?KEY|ACCESS_KEY|CONNECTION_STRING)(?:_|$)", re.IGNORECASE)
_NOT_A_VALUE = re.compile(r"_(?:FILE|PATH|DIR|ID|ENABLED|BACKEND|TYPE|MANAGER)$", re.IGNORECASE)
_PLAIN_WORDS = {"true", "false", "none", "null", "yes", "no", "on", "off"}


def _url_passwords(text: str) -> set[str]:
    found = set()
    for match in _USERINFO.finditer(text):
        userinfo = match["userinfo"]
        for part in (userinfo.split(":", 1)[1] if ":" in userinfo else "", userinfo):
            if part:
                found |= {part, unquote(part)}
    return found


def literals(environ: Mapping[str, str] | None = None) -> frozenset[str]:
    """The secret values of ``environ`` (this process's environment by default), in every
    form they may appear in: as set, percent-encoded, and decoded when set encoded."""
    environ = os.environ if environ is None else environ
    found: set[str] = set()
    for name, value in environ.items():
        if not value:
            continue
        if "://" in value:  # a URL's password, not the whole URL: it still says which server
            found |= _url_passwords(value)
        if name.upper() in SECRET_ENV or \
                ("://" not in value and _SECRET_NAME.search(name) and not _NOT_A_VALUE.search(name)):
            found.add(value)
    forms = set()
    for value in found:
        forms |= {value, value.strip(), unquote(value), quote(value, safe=""), quote_plus(value)}
    return frozenset(form for form in forms if len(form) >= MIN_LITERAL and form.lower() not in _PLAIN_WORDS)


def scrub(text: Any, known: frozenset[str] | None = None) -> str:
    """``text`` (anything; made a string) with every URL's userinfo and every secret value of
    the environment (or of ``known``, from ``literals``) replaced by ***."""
    text = "" if text is None else str(text)
    if not text:
        return text
    text = _USERINFO.sub(lambda match: f"{match['scheme']}{MASK}@", text)
    for value in sorted(literals() if known is None else known, key=len, reverse=True):
        if value in text:
            text = text.replace(value, MASK)
    return text


def scrub_data(data: Any, known: frozenset[str] | None = None) -> Any:
    """A JSON-like structure (dicts, lists, tuples) with every string in it scrubbed, keys too."""
    known = literals() if known is None else known
    if isinstance(data, str):
        return scrub(data, known)
    if isinstance(data, Mapping):
        return {scrub(key, known) if isinstance(key, str) else key: scrub_data(value, known)
                for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return type(data)(scrub_data(item, known) for item in data)
    return data


def scrubbed_error(error: BaseException) -> BaseException | None:
    """A StageError-like stand-in for ``error`` when its text holds a secret, else None.

    The same exception with its arguments scrubbed where that is safe (a StageError: its text
    is its first argument), else a StageError that names the original type."""
    from pipeline.io import StageError

    text = str(error)
    clean = scrub(text)
    if clean == text:
        return None
    if isinstance(error, StageError) and len(error.args) <= 1:
        error.args = (clean,)
        return error
    return StageError(f"{type(error).__name__}: {clean}")


class ScrubbingFormatter(logging.Formatter):
    """Formats a log record as ``inner`` does, then scrubs the line (its traceback too)."""

    def __init__(self, inner: logging.Formatter | None = None):
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        return scrub(self.inner.format(record))
