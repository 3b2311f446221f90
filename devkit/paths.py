"""Where the checkout is: the one source of the repository root for the tools, the tests and the bench."""

from __future__ import annotations

from pathlib import Path

# The checkout this package was loaded from (an editable install or a run from the source tree).
ROOT = Path(__file__).resolve().parent.parent


def find_repo_root() -> Path:
    """The checkout holding alembic.ini: searched upwards from cwd, then the one holding this package."""
    cwd = Path.cwd().resolve()
    for candidate in (cwd, *cwd.parents, ROOT):
        if (candidate / "alembic.ini").is_file() and (candidate / "shared").is_dir():
            return candidate
    raise FileNotFoundError(
        "cannot find the AIQ checkout (a directory with alembic.ini and shared/); run this from inside it"
    )
