"""A throwaway PostgreSQL cluster for tests and benchmarks: initdb in a temp folder, 127.0.0.1, a free port.

    with ThrowawayPostgres() as pg:
        url = pg.create_database()          # postgresql://postgres@127.0.0.1:PORT/t_...
        store = PrefixStore(url, files_dir=...)

The server binaries come from PATH or Debian's /usr/lib/postgresql/*/bin. PostgreSQL refuses to run
as root, so under root the cluster runs as `nobody` and its folder belongs to that user. Durability
is switched off (fsync, synchronous_commit): the data is thrown away anyway.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path


def find_pg_bin() -> Path | None:
    """The folder holding initdb and postgres, or None when PostgreSQL is not installed."""
    found = shutil.which("initdb")
    if found and shutil.which("postgres"):
        return Path(os.path.realpath(found)).parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    return Path(versions[-1]).parent if versions else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ThrowawayPostgres:
    def __init__(self, user: str = "nobody"):
        self.bin = find_pg_bin()
        if self.bin is None:
            raise RuntimeError("PostgreSQL server binaries not found (initdb/postgres on PATH or "
                               "/usr/lib/postgresql/*/bin); install Debian's 'postgresql' package")
        self.run_as = pwd.getpwnam(user) if os.geteuid() == 0 else None  # postgres refuses to run as root
        self.dir = Path(tempfile.mkdtemp(prefix="prefixtune-pg-"))  # /tmp, so `nobody` can reach it
        self.port = 0
        self.proc: subprocess.Popen | None = None

    def _popen(self, args: list, **kw) -> subprocess.Popen:
        if self.run_as:
            kw.update(user=self.run_as.pw_uid, group=self.run_as.pw_gid, extra_groups=[])
        return subprocess.Popen([str(a) for a in args], cwd=self.dir, **kw)

    def start(self, timeout: float = 60.0) -> "ThrowawayPostgres":
        if self.run_as:
            os.chown(self.dir, self.run_as.pw_uid, self.run_as.pw_gid)
        data = self.dir / "data"
        init = self._popen([self.bin / "initdb", "-D", data, "-U", "postgres", "-A", "trust", "-E", "UTF8",
                            "--no-locale", "--no-sync"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        out = init.communicate(timeout=timeout)[0]
        if init.returncode != 0:
            raise RuntimeError(f"initdb failed:\n{out.decode(errors='replace')}")
        for _ in range(5):  # a free port can be taken between our probe and postgres' bind: try another
            self.port = free_port()
            self.log = open(self.dir / "postgres.log", "ab")
            self.proc = self._popen(
                [self.bin / "postgres", "-D", data, "-p", self.port, "-h", "127.0.0.1", "-k", self.dir,
                 "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
                 "-c", "max_connections=300", "-c", "dynamic_shared_memory_type=mmap"],
                stdout=self.log, stderr=subprocess.STDOUT)
            if self._wait_ready(timeout):
                return self
            self.stop(remove=False)
        raise RuntimeError(f"postgres did not start; log:\n{(self.dir / 'postgres.log').read_text(errors='replace')}")

    def _wait_ready(self, timeout: float) -> bool:
        # psycopg: only once a cluster runs; tests import this module to decide whether to skip (start-up time)
        import psycopg

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                psycopg.connect(self.url("postgres"), connect_timeout=2).close()
                return True
            except psycopg.OperationalError:
                time.sleep(0.05)
        return False

    def url(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str | None = None) -> str:
        """A new empty database; returns its URL."""
        # psycopg: only once a cluster runs; tests import this module to decide whether to skip (start-up time)
        import psycopg

        name = name or f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url("postgres"), autocommit=True) as db:
            db.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self, remove: bool = True) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # "fast" shutdown: disconnects clients, no waiting on them
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        if remove:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "ThrowawayPostgres":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class Replica:
    """A `prefixtune serve` process on 127.0.0.1 (a free port), for multi-replica tests and benchmarks.

        with Replica(["--model", model_dir, "--store", url, "--files-dir", files]) as a:
            httpx.get(a.url + "/health")

    `command`: what runs `prefixtune serve` (default: this Python, `-m prefixtune.cli serve`).
    """

    def __init__(self, args: list, command: list | None = None, env: dict | None = None, log_path=None):
        self.port = free_port()
        self.command = (command or [sys.executable, "-m", "prefixtune.cli", "serve"]) + [
            str(a) for a in args] + ["--host", "127.0.0.1", "--port", str(self.port)]
        self.env = {**os.environ, **(env or {})}
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 180.0) -> "Replica":
        # httpx: only once a replica starts (start-up time of tests that import this module and skip)
        import httpx

        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(self.command, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"replica exited with {self.proc.returncode} (log: {self.log_path})")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"replica did not become healthy within {timeout} s (log: {self.log_path})")

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, as when a machine dies."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # graceful: open requests finish
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()

    def __enter__(self) -> "Replica":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
