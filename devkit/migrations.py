"""The one way the tools and tests apply migrations: alembic with the checkout's alembic.ini."""

from __future__ import annotations

import contextlib
import warnings

from alembic import command
from alembic.config import Config

from devkit.paths import find_repo_root
from shared.config import Environment, Settings


def alembic_config(database_url: str | None, verbose: bool = False) -> Config:
    """The checkout's alembic.ini aimed at `database_url` (any SQLAlchemy spelling; None: DATABASE_URL)."""
    config = Config(str(find_repo_root() / "alembic.ini"))
    if database_url is not None:
        # Only the URL's SQLAlchemy spelling is wanted: not the checks, nor the warning about a weak
        # JWT secret, that are meant for processes that sign tokens.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            settings = Settings(database_url=database_url, environment=Environment.DEVELOPMENT)
        config.attributes["database_url"] = settings.sync_database_url
    # alembic.ini's logging setup replaces the calling process's handlers: only for `aiq migrate`-like use.
    config.attributes["configure_logger"] = verbose
    return config


def migrate(database_url: str | None, revision: str = "head", verbose: bool = False) -> None:
    """`alembic upgrade <revision>` on `database_url`; `verbose` prints alembic's progress lines."""
    config = alembic_config(database_url, verbose)
    # alembic.ini's prepend_sys_path is relative to the working directory.
    with contextlib.chdir(find_repo_root()):
        command.upgrade(config, revision)
