"""Proxy server processes for tests: gunicorn on loopback ports, started and stopped.

Each process runs the proxy with the test settings, so tests can check what
several processes sharing one database and one cache do together.
"""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO
from urllib.parse import quote

PROJECT_ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
# Seconds a new process may take to start and return 200 for GET /healthz.
READY_TIMEOUT = 20.0
# Seconds a process may take to exit after SIGTERM before it is killed.
STOP_TIMEOUT = 10.0


def run_in_project(
    args: list[str],
    *,
    unset: tuple[str, ...] = (),
    timeout: float = 60,
    **env: str,
) -> subprocess.CompletedProcess:
    """Run Python with `args` in the project directory and return its output.

    The process inherits this one's environment with the proxy's settings,
    DEBUG on and `env` added, and without the variables named in `unset`.
    Raises subprocess.TimeoutExpired after `timeout` seconds.
    """
    environment = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "proxy_site.settings",
        "DEBUG": "on",
        **env,
    }
    for name in unset:
        environment.pop(name, None)
    return subprocess.run(
        [sys.executable, *args],
        cwd=PROJECT_ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def shared_environment(upstream_url: str) -> dict[str, str]:
    """Return the environment that points a server process at the test database.

    The process uses the test settings, the test run's PostgreSQL database
    (the cache comes from the inherited CACHE_URL) and the fake upstream.
    """
    from django.db import connections

    database = connections["default"].settings_dict
    user = quote(database["USER"] or "", safe="")
    password = quote(database["PASSWORD"] or "", safe="")
    credentials = f"{user}:{password}@" if password else f"{user}@"
    address = f"{database['HOST'] or HOST}:{database['PORT'] or 5432}"
    return {
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "DATABASE_URL": f"postgres://{credentials}{address}/{database['NAME']}",
        "PROXY_TEST_UPSTREAM_URL": upstream_url,
    }


def free_port() -> int:
    """Return a loopback port that was free a moment ago.

    Another process may bind it first, and then the server exits at start-up.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


class ProxyServer:
    """One gunicorn process serving the proxy on a free loopback port.

    The server inherits the test process's environment with `environment`
    added, so it uses the same cache and settings unless overridden.
    """

    def __init__(self, environment: dict[str, str], *, threads: int = 8) -> None:
        self.port = free_port()
        self._environment = {**os.environ, **environment}
        self._threads = threads
        self._process: subprocess.Popen | None = None
        self._log: IO[bytes] | None = None

    def start(self) -> ProxyServer:
        """Start the process and return at once. wait_ready() waits until it serves."""
        self._log = tempfile.TemporaryFile()
        command = [
            sys.executable,
            "-m",
            "gunicorn",
            "proxy_site.wsgi:application",
            f"--bind={HOST}:{self.port}",
            "--workers=1",
            f"--threads={self._threads}",
            "--graceful-timeout=5",
            # Every gunicorn shares one control socket path by default, so
            # test servers would take it from each other and from others.
            "--no-control-socket",
        ]
        # A new session makes the server and its worker one process group,
        # which stop() can kill as a whole if the server ignores SIGTERM.
        self._process = subprocess.Popen(
            command,
            cwd=PROJECT_ROOT,
            env=self._environment,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return self

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Poll GET /healthz until it returns 200, or raise RuntimeError."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(
                    f"The proxy server on port {self.port} exited with status "
                    f"{self._process.returncode} before it was ready. Its output:\n"
                    f"{self.output()}"
                )
            if self._is_healthy():
                return
            time.sleep(0.1)
        raise RuntimeError(
            f"The proxy server on port {self.port} did not return 200 for GET /healthz "
            f"within {timeout} seconds. Its output:\n{self.output()}"
        )

    def _is_healthy(self) -> bool:
        connection = http.client.HTTPConnection(HOST, self.port, timeout=1)
        try:
            connection.request("GET", "/healthz")
            return connection.getresponse().status == 200
        except OSError:
            return False
        finally:
            connection.close()

    def output(self) -> str:
        """Return everything the process wrote to stdout and stderr so far."""
        if self._log is None:
            return ""
        self._log.seek(0)
        return self._log.read().decode(errors="replace")

    def stop(self) -> None:
        """Stop the process with SIGTERM, and kill its process group if it lingers."""
        process = self._process
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        self._process = None
        if self._log is not None:
            self._log.close()
            self._log = None
