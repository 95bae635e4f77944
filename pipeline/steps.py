"""The DVC steps of one retraining, written once for both drivers: the CLI's whole run
(pipeline.runner: every stage in one ``dvc repro``) and the Airflow tasks (pipeline.orchestrate:
one ``dvc repro --single-item`` per task). The MLflow run around them is pipeline.run_record;
register and promote are pipeline.stages.
"""
from __future__ import annotations

from pathlib import Path

from pipeline import dvc_cli, process
from pipeline.io import EXIT_DATA_ERROR, StageError


class ReproFailed(StageError):
    """``dvc repro`` exited non-zero: which stage failed, with which exit code, and its own error line."""

    def __init__(self, code: int, tail: str):
        self.code = code  # dvc's own exit code
        self.stage, self.stage_code, self.message = process.dvc_failure(tail)
        super().__init__(self.message)

    @property
    def refused_data(self) -> bool:
        """The stage exited with EXIT_DATA_ERROR: running it again would fail the same way."""
        return self.stage_code == EXIT_DATA_ERROR

    @property
    def exit_code(self) -> int:
        """What the CLI exits with: EXIT_DATA_ERROR when the data was refused, else 1."""
        return EXIT_DATA_ERROR if self.refused_data else 1


def repro(root: Path, env: dict[str, str], *args: str, merge: bool = True) -> None:
    """``dvc repro <args>`` in ``root``, its output streamed (pipeline.process.stream); ReproFailed if it fails."""
    code, tail = process.stream([*dvc_cli.COMMAND, "repro", *args], root, env, merge=merge)
    if code != 0:
        raise ReproFailed(code, tail)


def push_data(root: Path, env: dict[str, str], who: str, merge: bool = True) -> None:
    """``dvc push`` the run's data when a DVC remote is set. A failed push only warns: the
    data stays in the local DVC cache, and the model it made is no worse for it."""
    if has_remote(root) and process.stream([*dvc_cli.COMMAND, "push", "--quiet"], root, env, merge=merge)[0] != 0:
        print(f"{who}: WARNING dvc push to the remote failed; the data is still in the local DVC cache")


def has_remote(root: Path) -> bool:
    """A remote is set in the committed config or in the git-ignored local one."""
    return any(config.is_file() and "remote" in config.read_text()
               for config in (root / ".dvc" / "config", root / ".dvc" / "config.local"))
