"""`aiq admin create EMAIL`: the first admin (or a promotion), straight in PostgreSQL (DATABASE_URL)."""

from __future__ import annotations

import argparse
import getpass
import sys
import uuid

from sqlalchemy import create_engine, insert, select, update

from shared.config import Settings
from shared.errors import InvalidInput
from shared.models import Role, User
from shared.password_policy import check_password
from shared.security import hash_password
from shared.services.auth import normalize_email


def _read_password(from_stdin: bool) -> str:
    if from_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    first = getpass.getpass("Password: ")
    if getpass.getpass("Password (again): ") != first:
        raise SystemExit("aiq admin: the passwords differ")
    return first


def create_admin(settings: Settings, email: str, password: str | None) -> str:
    """Create an admin, or promote an existing user (and set their password when one is given)."""
    email = normalize_email(email)
    if password is not None:
        check_password(password, email, settings.password_min_length)
    engine = create_engine(settings.sync_database_url)
    try:
        with engine.begin() as conn:
            existing = conn.execute(select(User.id).where(User.email == email)).scalar_one_or_none()
            if existing is not None:
                values: dict[str, str] = {"role": Role.ADMIN.value}
                if password is not None:
                    values["password_hash"] = hash_password(password, settings.bcrypt_rounds)
                conn.execute(update(User).where(User.id == existing).values(**values))
                return f"promoted {email} to admin"
            if password is None:
                raise SystemExit("aiq admin: a new admin needs a password")
            conn.execute(
                insert(User).values(
                    id=uuid.uuid4(),
                    email=email,
                    password_hash=hash_password(password, settings.bcrypt_rounds),
                    role=Role.ADMIN.value,
                )
            )
            return f"created admin {email}"
    finally:
        engine.dispose()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="aiq admin", description="Manage admin accounts (uses DATABASE_URL).")
    sub = parser.add_subparsers(dest="action", required=True)
    create = sub.add_parser("create", help="create an admin, or promote an existing user to admin")
    create.add_argument("email")
    create.add_argument("--password-stdin", action="store_true", help="read the password from the first stdin line")
    create.add_argument(
        "--keep-password", action="store_true", help="promote an existing user without asking for a password"
    )
    args = parser.parse_args(argv)
    password = None if args.keep_password else _read_password(args.password_stdin)
    try:
        print(create_admin(Settings(), args.email, password))
    except InvalidInput as exc:
        print(f"aiq admin: {exc.message}", file=sys.stderr)
        return 2
    return 0
