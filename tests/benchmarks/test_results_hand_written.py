"""RESULTS.md's hand-written part (figures measured outside the suite, earlier figures the docs
quote) survives a run of the suite, which rewrites the tables above it."""
from __future__ import annotations

from benchmarks.__main__ import HAND_WRITTEN, write_markdown


def test_a_run_rewrites_the_tables_and_keeps_the_hand_written_part(tmp_path):
    path = tmp_path / "RESULTS.md"
    write_markdown(path, "# tables, first run\n")
    assert path.read_text() == "# tables, first run\n"  # no hand-written part yet: none is made up

    path.write_text(path.read_text() + "\n" + HAND_WRITTEN + "\n## History\n0.246 on 2026-11-29\n")
    write_markdown(path, "# tables, second run\n")
    text = path.read_text()
    assert text.startswith("# tables, second run\n") and "first run" not in text
    assert text.endswith(HAND_WRITTEN + "\n## History\n0.246 on 2026-11-29\n")
    assert text.count(HAND_WRITTEN) == 1
