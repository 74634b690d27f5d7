"""A throwaway PostgreSQL server for the test session.

When ``STATESTORE_PG_DSN`` is not set and the server's programs (``initdb``,
``pg_ctl``) are on this machine, the tests of the PostgreSQL backend run
against a server of their own: a new cluster in a temporary folder, listening
on a free port of 127.0.0.1 only, stopped and removed when the session ends.
So the README's one test command tests the backend too, with no set-up by hand.
CI names its own server through ``STATESTORE_PG_DSN``, and then nothing is
started here.

As root (``initdb`` refuses to run as root), the cluster is made and run as
the ``postgres`` user that the server package creates.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass

__all__ = ["INSTALL_HINT", "Server", "find_program", "start"]

INSTALL_HINT = (
    "install the PostgreSQL server (Debian/Ubuntu: apt-get install postgresql; "
    "Fedora: dnf install postgresql-server; macOS: brew install postgresql) "
    "or name a server with STATESTORE_PG_DSN"
)
ROLE = "statestore"
DATABASE = "statestore_test"


def find_program(name: str) -> str | None:
    """``name`` on PATH, or in Debian's versioned folder (newest version first)."""
    found = shutil.which(name)
    if found:
        return found
    candidates = glob.glob(f"/usr/lib/postgresql/*/bin/{name}")
    candidates.sort(key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0)
    return candidates[-1] if candidates else None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Server:
    folder: str
    data: str
    pg_ctl: str
    prefix: list[str]
    dsn: str

    def stop(self) -> None:
        subprocess.run(
            [*self.prefix, self.pg_ctl, "-D", self.data, "-m", "immediate", "-w", "stop"],
            capture_output=True,
            check=False,
        )
        shutil.rmtree(self.folder, ignore_errors=True)  # the folder this module made


def start() -> Server | str:
    """Start a server, or return why none could be started."""
    initdb, pg_ctl, psql = (find_program(p) for p in ("initdb", "pg_ctl", "psql"))
    if not (initdb and pg_ctl and psql):
        return f"PostgreSQL's server programs are not on this machine: {INSTALL_HINT}"
    prefix: list[str] = []
    folder = tempfile.mkdtemp(prefix="statestore-pg-")
    if os.geteuid() == 0:
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(folder)
            return "running as root, and there is no 'postgres' user to run the server as"
        os.chown(folder, user.pw_uid, user.pw_gid)
        prefix = ["runuser", "-u", "postgres", "--"]
    data = os.path.join(folder, "data")
    port = _free_port()
    steps = [
        [
            *prefix,
            initdb,
            "-D",
            data,
            "-U",
            "postgres",
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "-E",
            "UTF8",
            "--no-sync",
            "--locale=C",
        ],
        [
            *prefix,
            pg_ctl,
            "-D",
            data,
            "-l",
            os.path.join(folder, "server.log"),
            "-w",
            "-t",
            "60",
            "-o",
            f"-p {port} -k {folder} -c listen_addresses=127.0.0.1",
            "start",
        ],
    ]
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            shutil.rmtree(folder, ignore_errors=True)
            return f"could not start a throwaway PostgreSQL ({' '.join(step[:3])}): {done.stderr}"
    server = Server(folder, data, pg_ctl, prefix, "")
    # The tests' own role logs in over TCP with a password (a wrong one must fail,
    # as on a real server); the set-up here uses the folder's socket, trusted.
    setup = (
        f"CREATE ROLE {ROLE} LOGIN PASSWORD '{ROLE}';\nCREATE DATABASE {DATABASE} OWNER {ROLE};\n"
    )
    done = subprocess.run(
        [
            *prefix,
            psql,
            "-X",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            folder,
            "-p",
            str(port),
            "-U",
            "postgres",
            "-d",
            "postgres",
        ],
        input=setup,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        server.stop()
        return f"could not set up the throwaway PostgreSQL: {done.stderr}"
    server.dsn = f"postgresql://{ROLE}:{ROLE}@127.0.0.1:{port}/{DATABASE}"
    return server
