"""A throwaway PostgreSQL server for tests: a fresh cluster in a temporary folder, on 127.0.0.1 with trust
authentication.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shlex
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

SERVER_PROGRAMS = ("initdb", "pg_ctl", "postgres")
SERVER_USER = "postgres"  # initdb and postgres refuse to run as root; Debian's package makes this user
DATABASE = "optuna"


class ServerUnavailable(Exception):
    """No PostgreSQL server can run here; the message says why."""


def server_bin_dir() -> Path:
    """The folder with the server's programs: the one initdb on PATH is in, else Debian's
    /usr/lib/postgresql/<version>/bin.
    """
    on_path = shutil.which("initdb")
    debian = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda folder: int(folder.parent.name) if folder.parent.name.isdigit() else 0,
    )
    for folder in ([Path(on_path).resolve().parent] if on_path else []) + debian[::-1]:  # the newest version first
        if all((folder / name).is_file() for name in SERVER_PROGRAMS):
            return folder
    raise ServerUnavailable(
        "PostgreSQL's server programs (initdb, pg_ctl, postgres) are not installed: "
        "apt-get install postgresql (.ci/run does it where it can)"
    )


def server_user() -> dict[str, Any]:
    """subprocess arguments that run the server's programs as an unprivileged user: the postgres user when
    we are root."""
    if os.geteuid() != 0:
        return {}
    try:
        user = pwd.getpwnam(SERVER_USER)
    except KeyError:
        raise ServerUnavailable(
            f"running as root and there is no {SERVER_USER!r} user to run the server as "
            "(initdb refuses root; apt-get install postgresql makes the user)"
        ) from None
    return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": [], "env": dict(os.environ, HOME=user.pw_dir)}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def failure(program: str, result: subprocess.CompletedProcess, log: Path) -> str:
    """One line: what the program said first, and the server log's fatal errors (a port taken, a folder it may not
    write).
    """
    said = (result.stderr or result.stdout).strip().splitlines()
    fatal = [
        line.split("FATAL:", 1)[1].strip()
        for line in (log.read_text().splitlines() if log.is_file() else [])
        if "FATAL:" in line
    ]
    return "; ".join([f"{program} failed: {said[0] if said else f'exit status {result.returncode}'}", *fatal])


class Server:
    """A running throwaway server: its database's URL, and stop/start to restart it as a failover would."""

    def __init__(self, root: Path, bin_dir: Path, as_server_user: dict[str, Any]):
        self.root, self.bin_dir, self.as_server_user = root, bin_dir, as_server_user
        self.data_dir, self.log, self.port = root / "data", root / "server.log", free_port()
        # as hyperparameter_tune.py's docstring names the driver
        self.url = f"postgresql+psycopg2://{SERVER_USER}@127.0.0.1:{self.port}/{DATABASE}"

    def run(self, *command: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(self.bin_dir / command[0]), *command[1:]],
            cwd=self.root,
            capture_output=True,
            text=True,
            **self.as_server_user,
        )

    def checked(self, *command: str) -> None:
        result = self.run(*command)
        if result.returncode != 0:
            raise ServerUnavailable(failure(command[0], result, self.log))

    def start(self) -> None:
        # -F: no fsync, the data is thrown away
        self.checked(
            "pg_ctl",
            "start",
            "-D",
            str(self.data_dir),
            "-l",
            str(self.log),
            "-w",
            "-t",
            "60",
            "-o",
            f"-h 127.0.0.1 -p {self.port} -k {shlex.quote(str(self.root))} -F",
        )

    def stop(self, mode: str = "fast") -> None:
        if (self.data_dir / "postmaster.pid").exists():
            self.run("pg_ctl", "stop", "-D", str(self.data_dir), "-m", mode, "-w")


@contextlib.contextmanager
def running_server() -> Iterator[Server]:
    """Start a server with an empty database; stop it and delete its files on exit."""
    bin_dir, as_server_user = server_bin_dir(), server_user()
    # in /tmp, not under pytest's root-only folders: the server user reaches it
    root = Path(tempfile.mkdtemp(prefix="test-postgres-"))
    server = Server(root, bin_dir, as_server_user)
    try:
        if "user" in server.as_server_user:
            os.chown(root, server.as_server_user["user"], server.as_server_user["group"])
        server.checked(
            "initdb",
            "-D",
            str(server.data_dir),
            "--auth=trust",
            f"--username={SERVER_USER}",
            "--no-locale",
            "--encoding=UTF8",
            "--no-sync",
        )
        server.start()
        import psycopg2  # here, not at the top: without the driver only the tests that use a server fail

        connection = psycopg2.connect(host="127.0.0.1", port=server.port, user=SERVER_USER, dbname="postgres")
        connection.autocommit = True  # CREATE DATABASE cannot run in a transaction
        with connection.cursor() as cursor:
            cursor.execute(f"CREATE DATABASE {DATABASE}")
        connection.close()
        yield server
    finally:
        server.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)
