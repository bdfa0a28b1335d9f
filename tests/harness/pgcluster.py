"""A throwaway PostgreSQL cluster for tests and benchmarks (like asyncpg's `cluster.py`).

initdb into a temporary directory, `wal_level=logical`, trust authentication on loopback
(replication included), a Unix socket in the data directory's parent, a random free TCP port
on 127.0.0.1, started and stopped with pg_ctl. PostgreSQL refuses to run as root, so when the
tests run as root every server command runs as the `postgres` OS user (Debian's packages create
it) through `runuser`.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time

from tests.harness.ports import free_port


class ClusterError(Exception):
    """The cluster could not be created, started or stopped."""


def find_bindir() -> str:
    """The newest /usr/lib/postgresql/*/bin holding initdb (or $PG_BINDIR)."""
    env = os.environ.get("PG_BINDIR")
    if env:
        return env
    candidates = glob.glob("/usr/lib/postgresql/*/bin/initdb")
    if not candidates:
        found = shutil.which("initdb")
        if found:
            return os.path.dirname(found)
        raise ClusterError("PostgreSQL server binaries not found (apt-get install postgresql)")
    candidates.sort(key=lambda p: int(p.split("/")[-3]) if p.split("/")[-3].isdigit() else 0)
    return os.path.dirname(candidates[-1])


class PgCluster:
    """One PostgreSQL server: `dsn` (superuser `postgres`), `port`, start/stop/restart."""

    def __init__(self, base_dir: str | None = None, port: int | None = None, settings: dict | None = None):
        self.bindir = find_bindir()
        self.base_dir = base_dir or tempfile.mkdtemp(prefix="rt-pgcluster-")
        self.data_dir = os.path.join(self.base_dir, "data")
        self.socket_dir = os.path.join(self.base_dir, "sock")
        self.log_file = os.path.join(self.base_dir, "server.log")
        self.port = port or free_port()
        self.user = "postgres"
        self.settings = {
            "wal_level": "logical",
            "max_replication_slots": "20",
            "max_wal_senders": "20",
            "max_connections": "100",
            "fsync": "off",  # throwaway cluster: durability across OS crashes is not tested
            "synchronous_commit": "on",
            "full_page_writes": "off",
            "shared_buffers": "64MB",
            "wal_sender_timeout": "60s",
            "logical_decoding_work_mem": "64MB",
            # START_REPLICATION and the slots' use in the log a failed test prints (fixtures_postgres)
            "log_replication_commands": "on",
            **(settings or {}),
        }
        self._as_postgres = os.geteuid() == 0

    # -- process plumbing -------------------------------------------------------------------

    def _run(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        cmd = list(args)
        if self._as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise ClusterError(f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr or proc.stdout}\n{self.log_tail()}")
        return proc

    def log_tail(self, lines: int = 30) -> str:
        try:
            with open(self.log_file, errors="replace") as fh:
                return "".join(fh.readlines()[-lines:])
        except OSError:
            return ""

    @property
    def dsn(self) -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/postgres"

    def dsn_for(self, database: str) -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{database}"

    # -- lifecycle ----------------------------------------------------------------------------

    def prepare_dirs(self) -> None:
        """The cluster's directories, owned by the user the server runs as (postgres under root)."""
        os.makedirs(self.socket_dir, exist_ok=True)
        if self._as_postgres:
            pw = pwd.getpwnam("postgres")
            os.chmod(self.base_dir, 0o755)
            for path in (self.base_dir, self.socket_dir):
                os.chown(path, pw.pw_uid, pw.pw_gid)

    def init(self) -> None:
        self.prepare_dirs()
        self._run(
            os.path.join(self.bindir, "initdb"), "-D", self.data_dir, "-U", self.user,
            "-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync",
        )
        lines = [f"{k} = '{v}'" for k, v in self.settings.items()]
        lines += [
            f"port = {self.port}",
            "listen_addresses = '127.0.0.1'",
            f"unix_socket_directories = '{self.socket_dir}'",
            "timezone = 'UTC'",
        ]
        conf = os.path.join(self.data_dir, "postgresql.auto.conf")
        with open(conf, "a") as fh:
            fh.write("\n".join(lines) + "\n")
        hba = os.path.join(self.data_dir, "pg_hba.conf")
        with open(hba, "w") as fh:
            fh.write(
                "local all all trust\n"
                "local replication all trust\n"
                "host all all 127.0.0.1/32 trust\n"
                "host replication all 127.0.0.1/32 trust\n"
            )

    def start(self, wait: float = 30) -> None:
        self._run(
            os.path.join(self.bindir, "pg_ctl"), "-D", self.data_dir, "-l", self.log_file,
            "-w", "-t", str(int(wait)), "start",
        )
        self._wait_accepting(wait)

    def stop(self, mode: str = "fast") -> None:
        self._run(os.path.join(self.bindir, "pg_ctl"), "-D", self.data_dir, "-m", mode, "-w", "stop", check=False)

    def restart(self, mode: str = "fast") -> None:
        self.stop(mode)
        self.start()

    def running(self) -> bool:
        proc = self._run(os.path.join(self.bindir, "pg_ctl"), "-D", self.data_dir, "status", check=False)
        return proc.returncode == 0

    def _wait_accepting(self, wait: float) -> None:
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                time.sleep(0.05)
        raise ClusterError(f"PostgreSQL did not accept connections on port {self.port}\n{self.log_tail()}")

    def psql(self, sql: str, database: str = "postgres") -> str:
        proc = self._run(
            os.path.join(self.bindir, "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
            "-h", "127.0.0.1", "-p", str(self.port), "-U", self.user, "-d", database, "-c", sql,
        )
        return proc.stdout

    def destroy(self) -> None:
        if os.path.isdir(self.data_dir):
            self.stop("immediate")
        shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self) -> PgCluster:
        self.init()
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()
