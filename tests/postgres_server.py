"""A real PostgreSQL server for the persistence tests: Debian's `postgresql` binaries, a fresh
cluster (initdb) in a temporary directory, served on a free loopback port for the test session.

Postgres refuses to run as root, so under root (CI containers) the cluster belongs to the
`postgres` system user the Debian package creates and the server runs as that user. Every test
gets its own database (`PostgresServer.new_database`), so tests never see each other's rows.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

from tests.app_client import free_port

INSTALL_HINT = "PostgreSQL is not installed: `apt-get install postgresql` (.ci/run does it in CI)"


def postgres_bin_dir() -> Path | None:
    """Where initdb/pg_ctl live: Debian keeps them under /usr/lib/postgresql/<major>/bin."""
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=_major, reverse=True)
    return Path(candidates[0]).parent if candidates else None


def _major(path: str) -> int:
    part = Path(path).parent.parent.name
    return int(part) if part.isdigit() else 0


class PostgresServer:
    """One throw-away cluster, trust authentication, listening on 127.0.0.1 only."""

    user = "pagechat"

    def __init__(self, bin_dir: Path) -> None:
        self.bin_dir = bin_dir
        self.port = free_port()
        # Not under pytest's tmp_path: its parents are private to root, and the server may run
        # as another user.
        self.root = Path(tempfile.mkdtemp(prefix="pagechat-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.run_as: str | None = "postgres" if os.geteuid() == 0 else None
        if self.run_as:
            entry = pwd.getpwnam(self.run_as)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
        self._run(
            "initdb",
            "-D",
            str(self.data),
            "-U",
            self.user,
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C.UTF-8",
            "--no-sync",
        )
        self._run(
            "pg_ctl",
            "-D",
            str(self.data),
            "-l",
            str(self.log),
            "-w",
            "-t",
            "60",
            "start",
            "-o",
            f"-h 127.0.0.1 -p {self.port} -k {self.root} -c fsync=off",
        )

    def _run(self, tool: str, *args: str) -> str:
        done = subprocess.run(
            [str(self.bin_dir / tool), *args],
            capture_output=True,
            text=True,
            user=self.run_as,
            cwd=self.root,
            timeout=120,
        )
        if done.returncode != 0:
            log = self.log.read_text() if self.log.exists() else ""
            raise RuntimeError(
                f"{tool} failed ({done.returncode}): {done.stderr}{done.stdout}{log}"
            )
        return done.stdout

    def new_database(self) -> str:
        """A new empty database; its SQLAlchemy asyncpg URL."""
        name = "t_" + uuid.uuid4().hex[:12]
        self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", self.user, name)
        return self.url(name)

    def url(self, database: str) -> str:
        return f"postgresql+asyncpg://{self.user}@127.0.0.1:{self.port}/{database}"

    def psql(self, database: str, sql: str) -> str:
        """Run SQL with the psql client (an independent reader of what the app stored)."""
        return self._run(
            "psql",
            "-h",
            "127.0.0.1",
            "-p",
            str(self.port),
            "-U",
            self.user,
            "-d",
            database,
            "-At",
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            sql,
        )

    def stop(self) -> None:
        try:
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
