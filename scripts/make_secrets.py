"""Write the secret files docker-compose.yml reads, with random values, into secrets/.

    python3 scripts/make_secrets.py            # or: make secrets
    python3 scripts/make_secrets.py --ui-user ada --dir /srv/carsearch/secrets

Every credential of the deployment comes from one of these files and none is committed
(secrets/ is git-ignored). Existing files are kept, so the command is safe to run again:
PostgreSQL and Milvus take their passwords only when their volumes are first created, so
a new value would lock the platform out of an existing deployment. ``--force`` rewrites
them all (for a fresh deployment, or after changing the passwords in the services).

The folder is made 0700 and each file 0600: the containers read them as root. Only the
standard library is used, so it runs before the project is installed.
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import string
import sys
from pathlib import Path

log = logging.getLogger("make_secrets")

_ALPHABET = string.ascii_letters + string.digits  # safe in URLs, YAML, env and shells


def random_password(n: int = 32) -> str:
    return "".join(secrets.choice(_ALPHABET) for _ in range(n))


def secret_values(ui_user: str) -> dict[str, str]:
    """The file name (= the Compose secret's name) and value of every secret."""
    milvus_root = random_password()
    return {
        "postgres_password": random_password(),
        "minio_root_user": "carsearch-" + secrets.token_hex(4),
        "minio_root_password": random_password(),
        "milvus_root_password": milvus_root,
        # What the platform sends Milvus: root's user:password.
        "milvus_token": f"root:{milvus_root}",
        # The search page's login, user:password.
        "ui_auth": f"{ui_user}:{random_password(20)}",
    }


def write_secrets(directory: Path, ui_user: str, *, force: bool = False) -> list[str]:
    """Write the missing (or, with force, all) secret files; returns the names written."""
    if ":" in ui_user or not ui_user.strip():
        raise ValueError("the page's user name must be non-empty and hold no ':'")
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    values = secret_values(ui_user)
    if not force and (directory / "milvus_root_password").exists():
        # The token must stay root's password: derive it from the kept file.
        kept = (directory / "milvus_root_password").read_text(encoding="utf-8").strip()
        values["milvus_token"] = f"root:{kept}"
    # A new root password needs a new token.
    renew = {"milvus_token"} if not (directory / "milvus_root_password").exists() else set()
    written = []
    for name, value in values.items():
        path = directory / name
        if path.exists() and not force and name not in renew:
            continue
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(value + "\n")
        os.chmod(path, 0o600)
        written.append(name)
    return written


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=Path(__file__).resolve().parents[1]
                        / "secrets", help="where to write them (default: secrets/)")
    parser.add_argument("--ui-user", default="carsearch", help="the search page's user name")
    parser.add_argument("--force", action="store_true", help="rewrite existing files")
    args = parser.parse_args(argv)
    try:
        written = write_secrets(args.dir, args.ui_user, force=args.force)
    except (OSError, ValueError) as exc:
        log.error("make_secrets: %s", exc)
        return 1
    kept = sorted(set(secret_values(args.ui_user)) - set(written))
    log.info("secrets in %s: wrote %s%s", args.dir, ", ".join(written) or "nothing",
             f"; kept {', '.join(kept)}" if kept else "")
    log.info("the page's login is in %s", args.dir / "ui_auth")
    return 0


if __name__ == "__main__":
    sys.exit(main())
