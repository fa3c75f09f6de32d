"""Start, watch and stop the benchmark's server processes, all on 127.0.0.1."""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

HOST = "127.0.0.1"
# Seconds a server may take, after it starts, until its readiness URL returns 200.
START_TIMEOUT = 90.0
# Seconds a server may take to exit after SIGTERM before its group is killed.
STOP_TIMEOUT = 15.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


class Server:
    """One server process (and its workers) in its own process group."""

    def __init__(
        self,
        name: str,
        command: list[str],
        *,
        port: int,
        ready_path: str,
        env: dict[str, str],
        cwd: Path,
        log_path: Path,
    ) -> None:
        self.name = name
        self.command = command
        self.port = port
        self.ready_path = ready_path
        self.env = env
        self.cwd = cwd
        self.log_path = log_path
        self.process: subprocess.Popen | None = None

    def start(self) -> Server:
        log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            self.command,
            cwd=self.cwd,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with status {self.process.returncode} "
                    f"while starting; see {self.log_path}"
                )
            if self._answers():
                return self
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"{self.name} did not start in {START_TIMEOUT}s")

    def _answers(self) -> bool:
        connection = http.client.HTTPConnection(HOST, self.port, timeout=2)
        try:
            connection.request("GET", self.ready_path)
            return connection.getresponse().status == 200
        except OSError:
            return False
        finally:
            connection.close()

    def worker_pids(self) -> list[int]:
        """Return the pids of the server's worker processes (its descendants)."""
        if self.process is None:
            return []
        children = _children()
        pids, queue = [], [self.process.pid]
        while queue:
            pid = queue.pop()
            for child in children.get(pid, []):
                pids.append(child)
                queue.append(child)
        # Helper processes such as multiprocessing's resource tracker are tiny;
        # workers are the ones that loaded the application.
        return [pid for pid in pids if rss_mb(pid) > 40] or pids

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        else:
            # Workers of a server that exited first must not outlive it.
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _children() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    return children


def rss_mb(pid: int) -> float:
    """Return a process's resident set size in MiB, 0 when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class RSSSampler:
    """Record the largest RSS of each given process while the block runs."""

    def __init__(self, pids: list[int], interval: float = 0.5) -> None:
        self.pids = pids
        self.interval = interval
        self.peak: dict[int, float] = dict.fromkeys(pids, 0.0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            for pid in self.pids:
                self.peak[pid] = max(self.peak[pid], rss_mb(pid))
            self._stop.wait(self.interval)

    def __enter__(self) -> RSSSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """Return the CPU time (user plus system) a process has used, 0 when gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    # After the command name: state is field 0, utime 11 and stime 12.
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def pids_named(name: str) -> list[int]:
    """Return the pids of processes whose command name is `name`."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() == name:
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


class CPUMeter:
    """Measure the CPU time that groups of processes use while the block runs.

    `groups` returns {group name: pids}; it is called before and after the
    block, so processes that start during the block (such as new database
    backends) are counted from zero.
    """

    def __init__(self, groups) -> None:
        self.groups = groups
        self.used: dict[str, float] = {}

    def __enter__(self) -> CPUMeter:
        self._before = {
            pid: cpu_seconds(pid) for pids in self.groups().values() for pid in pids
        }
        return self

    def __exit__(self, *exc_info) -> None:
        for name, pids in self.groups().items():
            self.used[name] = sum(
                cpu_seconds(pid) - self._before.get(pid, 0.0) for pid in pids
            )


def wait_until_idle(
    pids, *, busy_share: float = 0.1, interval: float = 1.0, timeout: float = 60.0
) -> float:
    """Wait until the processes use less than `busy_share` of one core.

    A server can still be working through requests whose clients gave up, and
    that work would slow the next measurement, of whichever target. `pids` is
    a callable returning the pids to watch. Returns the seconds waited; gives
    up after `timeout`.
    """
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        watched = pids()
        before = sum(cpu_seconds(pid) for pid in watched)
        time.sleep(interval)
        used = sum(cpu_seconds(pid) for pid in watched) - before
        if used < busy_share * interval:
            break
    return time.monotonic() - started
