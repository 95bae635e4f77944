"""Which uncommitted files count as the code a run ran, and which never leave the project.

A run records its code as a commit plus the difference from it (``uncommitted.patch``,
pipeline/tracking.py), and a scheduled run works in a worktree with the same difference
laid over it (pipeline/workspace.py). Both take the difference from here:

- every change to a tracked (or staged) file, anywhere in the project;
- untracked files git does not ignore, but only under the folders the pipeline runs
  (``CODE_FOLDERS``): a stray ``notes.txt``, a download or a local script at the root is
  not the run's code, and a patch is uploaded to the tracking server;
- never a file whose name, or a folder in its path, looks like a secret (``SECRET_NAMES``),
  tracked or not, whatever .gitignore says: a ``.env`` forgotten at the root would
  otherwise go to MLflow with every run and into every run's workspace.

The names left out are returned so that callers can say so: a tracked file left out means
the run's copy of that file is its committed version.
"""
from __future__ import annotations

import fnmatch
import subprocess
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

# the folders whose files the stages, the DAGs and the served model import (dvc.yaml's
# commands are `python -m pipeline ...`; the served model packs detector/)
CODE_FOLDERS = ("detector", "components", "pipeline", "dags")

# file or folder names that hold secrets; matched case-insensitively against every part of the path
SECRET_NAMES = (
    ".env", ".env.*", "*.env", ".envrc", ".netrc", "_netrc", ".pgpass", ".git-credentials", ".pypirc", ".npmrc",
    ".htpasswd", ".ssh", ".aws", ".gnupg", ".docker", "id_rsa*", "id_dsa*", "id_ecdsa*", "id_ed25519*",
    "*.pem", "*.key", "*.p12", "*.pfx", "*.jks", "*.keystore", "*.kdbx", "*.gpg", "*.asc",
)
# broader names, for data files only: a module such as ``pipeline/secrets.py`` is code, and
# leaving it out would run the pipeline without it
SECRET_WORDS = ("*secret*", "*credential*", "*password*", "*passwd*", "*token*.json", "*apikey*", "*api_key*")
SOURCE_SUFFIXES = (".py",)
# templates that document a secret file's keys hold no secret (docker/.env.example)
TEMPLATE_SUFFIXES = (".example", ".sample", ".template", ".dist")


def is_secret(path: str) -> bool:
    """Whether ``path`` (relative, with /) names a file that may hold a secret."""
    parts = [part.lower() for part in PurePosixPath(path).parts]
    if not parts or parts[-1].endswith(TEMPLATE_SUFFIXES):
        return False
    if any(fnmatch.fnmatchcase(part, pattern) for part in parts for pattern in SECRET_NAMES):
        return True
    if parts[-1].endswith(SOURCE_SUFFIXES):
        return any(fnmatch.fnmatchcase(part, pattern) for part in parts[:-1] for pattern in SECRET_WORDS)
    return any(fnmatch.fnmatchcase(part, pattern) for part in parts for pattern in SECRET_WORDS)


@dataclass(frozen=True)
class Changes:
    changed: list[str] = field(default_factory=list)    # tracked or staged, changed or added: copy them
    deleted: list[str] = field(default_factory=list)    # tracked, gone from the working tree
    untracked: list[str] = field(default_factory=list)  # new files under CODE_FOLDERS
    left_out: list[str] = field(default_factory=list)   # secret-looking names, never recorded or copied

    @property
    def recorded(self) -> list[str]:
        return self.changed + self.deleted + self.untracked


def _names(project: Path, *args: str) -> list[str]:
    out = subprocess.run(["git", *args], cwd=project, capture_output=True, check=True, timeout=120).stdout
    return [name for name in out.decode("utf-8", "surrogateescape").split("\0") if name]


def code_changes(project: Path) -> Changes:
    """The project's uncommitted code against HEAD, secrets left out (see the module's doc)."""
    changed = _names(project, "diff", "--name-only", "--relative", "-z", "--no-renames", "--diff-filter=d",
                     "HEAD")
    deleted = _names(project, "diff", "--name-only", "--relative", "-z", "--no-renames", "--diff-filter=D",
                     "HEAD")
    untracked = _names(project, "ls-files", "-z", "--others", "--exclude-standard", "--", *CODE_FOLDERS)
    left_out = sorted(name for name in changed + deleted + untracked if is_secret(name))

    def kept(names: list[str]) -> list[str]:
        return [name for name in names if not is_secret(name)]

    return Changes(changed=kept(changed), deleted=kept(deleted), untracked=kept(untracked), left_out=left_out)
