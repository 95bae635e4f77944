"""Models registered before the model package moved to ``detector/`` (2026-12-04) load through
this name: their packed entry file runs ``from components.serving import AnomalyDetector``,
and in a process that has imported this repository's ``components`` (register comparing
against the champion, ``pipeline score``, the scoring DAG) that name resolves here, not to
the copy packed in the model. Without it such a champion could not be re-scored or served
in-process after an upgrade. Nothing new imports it; delete it once no registry holds such a
version (``tests/pipeline/test_legacy_models.py`` keeps it working until then)."""
from detector.serving import AnomalyDetector  # noqa: F401
