"""A PostgreSQL cluster of the test run's own (Debian's `postgresql` package, as
`tests/src/postgres.rs` starts it for the Rust tests): `initdb` and `pg_ctl` in a temporary
directory, as the unprivileged `postgres` user when the tests run as root, on a free port,
trusting local connections as the `postern` role."""

import itertools
import os
import pathlib
import shutil
import socket
import subprocess
import tempfile


def _bin():
    found = sorted(p / "bin" for p in pathlib.Path("/usr/lib/postgresql").iterdir()
                   if (p / "bin" / "initdb").exists())
    assert found, "PostgreSQL is installed (scripts/setup installs it)"
    return found[-1]


def _free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Cluster:
    def __init__(self):
        self.bin = _bin()
        self.dir = pathlib.Path(tempfile.mkdtemp(prefix="postern-pg."))
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")
        self.data = self.dir / "data"
        self.port = _free_port()
        self._names = itertools.count(1)
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postern",
                  "--no-sync", "-E", "UTF8")
        self.start()

    def _run(self, program, *args):
        command = [str(self.bin / program), *args]
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        out = subprocess.run(command, capture_output=True, text=True)
        assert out.returncode == 0, f"{program} {args}: {out.stdout}{out.stderr}"

    def start(self):
        # fsync off: a test cluster's durability is not what is tested (a crash of PostgreSQL
        # itself is pg_ctl's immediate stop, after which it recovers from its WAL in memory).
        options = (f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 "
                   "-c max_connections=300 -c fsync=off")
        self._run("pg_ctl", "-D", str(self.data), "-o", options,
                  "-l", str(self.dir / "postgres.log"), "-w", "start")

    def stop(self, immediate=True):
        self._run("pg_ctl", "-D", str(self.data), "-m", "immediate" if immediate else "fast",
                  "-w", "stop")

    def url(self, database="postgres"):
        return f"postgres://postern@127.0.0.1:{self.port}/{database}"

    def new_database(self):
        """A fresh, empty database's name."""
        name = f"t{next(self._names)}"
        self.sql("postgres", f"CREATE DATABASE {name}")
        return name

    def sql(self, database, query):
        """Rows of a query, as lists of text fields (psql's unaligned output)."""
        out = subprocess.run(
            ["psql", "-X", "-q", "-A", "-t", "-F", "\t", "-v", "ON_ERROR_STOP=1",
             "-h", "127.0.0.1", "-p", str(self.port), "-U", "postern", "-d", database,
             "-c", query],
            capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        return [line.split("\t") for line in out.stdout.splitlines() if line]

    def close(self):
        try:
            self.stop()
        except AssertionError:
            pass
        shutil.rmtree(self.dir, ignore_errors=True)
