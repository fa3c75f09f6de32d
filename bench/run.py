"""Benchmark the proxy against a direct call and the LiteLLM proxy; write the report.

Run by hand with `make bench` (or `.venv/bin/python bench/run.py`). In one run
it starts a fast fake upstream, the proxy under gunicorn with gunicorn.conf.py
on PostgreSQL and Redis, and LiteLLM's proxy from its own virtualenv under
/tmp (installed on first use), measures all three, and writes
docs/benchmarks.md. All traffic stays on 127.0.0.1; every run is bounded in
requests and seconds, and every process started here is stopped at the end.

Environment: BENCH_DATABASE_URL (default postgres://postgres@127.0.0.1:5432/
proxy_bench, created if missing), BENCH_CACHE_URL (default
redis://127.0.0.1:6379/10, flushed), BENCH_POOL_SIZE (database connections
per worker, default 30), BENCH_WORK_DIR (default /tmp/proxy-bench).
"""

from __future__ import annotations

import http.client
import json
import pickle
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import load  # noqa: E402
import report  # noqa: E402
from launch import (  # noqa: E402
    BIN,
    LITELLM_MASTER_KEY,
    LITELLM_VENV,
    POOL_SIZE,
    RESULTS_FILE,
    ROOT,
    SERVER_LIB,
    TOOLS_VENV,
    WORK,
    WORKERS,
    database_backends,
    ensure_tools,
    gunicorn_setting,
    log,
    prepare_database,
    proxy_env,
    start_gunicorn,
    start_litellm,
    start_uvicorn,
)
from servers import (  # noqa: E402
    HOST,
    CPUMeter,
    RSSSampler,
    Server,
    free_port,
    pids_named,
    rss_mb,
    wait_until_idle,
)

INSTANT = "bench-instant"
SLOW = "bench-delay-1000"
# A call long enough that 500 clients ask for fewer requests per second than
# the proxy serves, so the run shows whether it holds them all at once. The
# clients start spread over one call's length, so that their requests arrive
# evenly rather than in waves of 500.
LONG_DELAY_SECONDS = 5
LONG = f"bench-delay-{LONG_DELAY_SECONDS * 1000}"
LONG_CLIENTS = 500
LONG_SECONDS = 25.0
STREAM_CHUNKS, STREAM_SPACING_MS = 20, 25
STREAM = f"bench-stream-{STREAM_CHUNKS}x{STREAM_SPACING_MS}"

# Bounds of each measurement: (clients, seconds, max requests).
SEQUENTIAL = (1, 10.0, 300)
CONCURRENT = (16, 10.0, 200_000)
WARM_UP = (16, 3.0, 2_000)
SLOW_SECONDS = 12.0
STREAMS = 10
# Alternating rounds of proxy and LiteLLM: how many, and seconds per load.
ROUNDS = 3
ROUND_SECONDS = 5.0


# The processes of every server in the run, set once they have started.
watched_pids: Callable[[], list[int]] = list


def upstream_stats(port: int) -> dict:
    """Return the fake upstream's in-flight counts and start a new peak."""
    connection = http.client.HTTPConnection(HOST, port, timeout=10)
    try:
        connection.request("GET", "/stats")
        return json.loads(connection.getresponse().read())
    finally:
        connection.close()


def settle() -> None:
    """Wait until no server is still busy with an earlier measurement's load."""
    waited = wait_until_idle(watched_pids)
    if waited > 2:
        log(f"waited {waited:.0f}s for the servers to go idle")


def warm_up(target: load.Target) -> None:
    """Send WARM_UP's load, so that caches and connections are warm."""
    clients, seconds, count = WARM_UP
    load.run_sync(
        target,
        load.chat_body(INSTANT),
        clients=clients,
        seconds=seconds,
        max_requests=count,
    )


def measure_target(
    target: load.Target,
    servers_pids: list[int],
    cpu_groups: Callable,
    upstream_port: int,
) -> dict:
    """Run every measurement against one target and return the results.

    `cpu_groups` returns {name: pids} of the processes whose CPU time the
    16-client run charges per request.
    """
    results: dict = {}
    log(f"{target.name}: warm-up")
    warm_up(target)
    results["rss_idle"] = [rss_mb(pid) for pid in servers_pids]
    settle()
    log(f"{target.name}: one client at a time")
    clients, seconds, count = SEQUENTIAL
    results["sequential"] = load.run_sync(
        target,
        load.chat_body(INSTANT),
        clients=clients,
        seconds=seconds,
        max_requests=count,
    )
    settle()
    log(f"{target.name}: {CONCURRENT[0]} clients, instant upstream")
    clients, seconds, count = CONCURRENT
    with CPUMeter(cpu_groups) as meter:
        results["concurrent"] = load.run_sync(
            target,
            load.chat_body(INSTANT),
            clients=clients,
            seconds=seconds,
            max_requests=count,
        )
    results["cpu"] = meter.used
    with RSSSampler(servers_pids) as sampler:
        for clients in (200, 500):
            settle()
            log(f"{target.name}: {clients} clients, 1-second upstream")
            results[f"slow_{clients}"] = load.run_sync(
                target,
                load.chat_body(SLOW),
                clients=clients,
                seconds=SLOW_SECONDS,
                max_requests=clients * 40,
            )
        settle()
        log(
            f"{target.name}: {LONG_CLIENTS} clients, "
            f"{LONG_DELAY_SECONDS}-second upstream"
        )
        upstream_stats(upstream_port)
        results["long"] = load.run_sync(
            target,
            load.chat_body(LONG),
            clients=LONG_CLIENTS,
            seconds=LONG_SECONDS,
            max_requests=LONG_CLIENTS * 10,
            ramp=LONG_DELAY_SECONDS,
        )
        results["long_peak_in_flight"] = upstream_stats(upstream_port)["peak_in_flight"]
    results["rss_load"] = [sampler.peak[pid] for pid in servers_pids]
    settle()
    log(f"{target.name}: streams")
    results["stream"] = load.run_sync(
        target,
        load.chat_body(STREAM, stream=True),
        clients=1,
        seconds=30.0,
        max_requests=STREAMS,
    )
    return results


def alternate_rounds(targets: dict[str, load.Target]) -> list[dict]:
    """Measure the targets in turn, round after round, on the instant upstream.

    The machine's speed drifts while a run goes on, which skews a comparison
    of targets measured minutes apart. Alternating short runs exposes each
    target to the same drift; the report compares the rounds' medians.
    """
    rounds = []
    for number in range(1, ROUNDS + 1):
        for name, target in targets.items():
            settle()
            log(f"round {number}: {name}")
            sequential = load.run_sync(
                target,
                load.chat_body(INSTANT),
                clients=1,
                seconds=ROUND_SECONDS,
                max_requests=300,
            )
            concurrent = load.run_sync(
                target,
                load.chat_body(INSTANT),
                clients=16,
                seconds=ROUND_SECONDS,
                max_requests=100_000,
            )
            rounds.append(
                {
                    "round": number,
                    "target": name,
                    "sequential_p50": sequential.p50,
                    "rate": concurrent.rate,
                    "failed": sequential.failed + concurrent.failed,
                }
            )
    return rounds


def profile_worker(pid: int, target: load.Target) -> str:
    """Record a worker with py-spy under 16 clients; return collapsed stacks."""
    output = WORK / "profile.txt"
    spy = subprocess.Popen(
        [
            str(TOOLS_VENV / "bin" / "py-spy"),
            "record",
            "--pid",
            str(pid),
            "--duration",
            "8",
            "--rate",
            "250",
            "--format",
            "raw",
            "--output",
            str(output),
            "--nonblocking",
            # Only the thread holding the GIL: where the worker's CPU goes.
            "--gil",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    load.run_sync(
        target, load.chat_body(INSTANT), clients=16, seconds=9.0, max_requests=100_000
    )
    spy.wait(timeout=30)
    return output.read_text() if output.exists() else ""


def per_request_queries(env: dict[str, str], key: str) -> str:
    result = subprocess.run(
        [str(BIN / "python"), "bench/queries.py", key, INSTANT],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return result.stdout


def compare_worker_models(env: dict[str, str], key: str) -> dict:
    """Serve the same loads with gthread, gevent and uvicorn in turn.

    gthread and gevent run twice, alternating, so that a change in the load
    of other programs on the machine shows up as a difference between rounds.
    A last gthread run with fewer threads shows what the threads cost in
    memory.
    """
    gevent = {"GUNICORN_WORKER_CLASS": "gevent", "PYTHONPATH": str(SERVER_LIB)}
    threads = gunicorn_setting(env, "threads")
    models = [
        (
            f"gthread, {threads} threads, round 1",
            lambda: start_gunicorn(env, "gthread"),
        ),
        (
            "gevent, 1000 connections, round 1",
            lambda: start_gunicorn(env, "gevent", **gevent),
        ),
        ("uvicorn (ASGI)", lambda: start_uvicorn(env)),
        (
            f"gthread, {threads} threads, round 2",
            lambda: start_gunicorn(env, "gthread"),
        ),
        (
            "gevent, 1000 connections, round 2",
            lambda: start_gunicorn(env, "gevent", **gevent),
        ),
        (
            "gthread, 64 threads",
            lambda: start_gunicorn(env, "gthread", GUNICORN_THREADS="64"),
        ),
    ]
    results = {}
    for name, start in models:
        log(f"worker model {name}")
        server, port = start()
        try:
            target = load.Target(name, HOST, port, "/v1/chat/completions", (key,))
            warm_up(target)
            instant = load.run_sync(
                target,
                load.chat_body(INSTANT),
                clients=16,
                seconds=8.0,
                max_requests=100_000,
            )
            pids = server.worker_pids() or [server.process.pid]
            with RSSSampler(pids) as sampler:
                slow = load.run_sync(
                    target,
                    load.chat_body(SLOW),
                    clients=500,
                    seconds=10.0,
                    max_requests=20_000,
                )
            results[name] = {
                "instant": instant,
                "slow_500": slow,
                "rss_peak": max(sampler.peak.values()),
            }
        finally:
            server.stop()
    return results


def main() -> None:
    started = time.monotonic()
    loadavg_start = Path("/proc/loadavg").read_text().strip()
    ensure_tools()
    upstream_port = free_port()
    env = proxy_env(upstream_port)
    keys = prepare_database(env)
    servers: list[Server] = []
    data: dict = {
        "pool_size": POOL_SIZE,
        "long_delay_seconds": LONG_DELAY_SECONDS,
        "workers": WORKERS,
        "threads": gunicorn_setting(env, "threads"),
        "loadavg_start": loadavg_start,
    }
    try:
        upstream = Server(
            "upstream",
            [str(BIN / "python"), "bench/upstream.py", "--port", str(upstream_port)],
            port=upstream_port,
            ready_path="/health",
            env=env,
            cwd=ROOT,
            log_path=WORK / "upstream.log",
        ).start()
        servers.append(upstream)
        log("starting the proxy and LiteLLM")
        proxy, proxy_port = start_gunicorn(env, "proxy")
        servers.append(proxy)
        litellm, litellm_port = start_litellm(upstream_port)
        servers.append(litellm)
        global watched_pids

        def watched_pids() -> list[int]:
            return [
                upstream.process.pid,
                *proxy.worker_pids(),
                *litellm.worker_pids(),
                *database_backends(),
            ]

        data["rss_start"] = {
            "proxy": [rss_mb(pid) for pid in proxy.worker_pids()],
            "litellm": [rss_mb(pid) for pid in litellm.worker_pids()],
        }
        path = "/v1/chat/completions"
        targets = {
            "direct": (
                load.Target("direct", HOST, upstream_port, path),
                [upstream.process.pid],
            ),
            "proxy": (
                load.Target("proxy", HOST, proxy_port, path, (keys[0],)),
                proxy.worker_pids(),
            ),
            "litellm": (
                load.Target("litellm", HOST, litellm_port, path, (LITELLM_MASTER_KEY,)),
                litellm.worker_pids(),
            ),
        }
        data["targets"] = {}
        for name, (target, pids) in targets.items():

            def groups(pids: list[int] = pids, name: str = name) -> dict:
                found = {"upstream": [upstream.process.pid]}
                if name != "direct":
                    found["server processes"] = pids
                if name == "proxy":
                    found["PostgreSQL backends"] = database_backends()
                    found["Redis server"] = pids_named("redis-server")
                return found

            data["targets"][name] = measure_target(target, pids, groups, upstream_port)
        data["rounds"] = alternate_rounds(
            {"proxy": targets["proxy"][0], "litellm": targets["litellm"][0]}
        )
        settle()
        log("proxy: 500 clients, 1-second upstream, a key per client")
        data["slow_500_many_keys"] = load.run_sync(
            load.Target("proxy", HOST, proxy_port, path, tuple(keys)),
            load.chat_body(SLOW),
            clients=500,
            seconds=SLOW_SECONDS,
            max_requests=20_000,
        )
        settle()
        log("profiling a proxy worker")
        data["profile"] = profile_worker(proxy.worker_pids()[0], targets["proxy"][0])
        litellm.stop()
        proxy.stop()
        data["queries"] = per_request_queries(env, keys[0])
        data["worker_models"] = compare_worker_models(env, keys[0])
    finally:
        for server in reversed(servers):
            server.stop()
    data["elapsed"] = time.monotonic() - started
    data["machine"] = report.describe_machine()
    data["litellm_version"] = subprocess.run(
        [
            str(LITELLM_VENV / "bin" / "python"),
            "-c",
            "import importlib.metadata as m; print(m.version('litellm'))",
        ],
        capture_output=True,
        text=True,
    ).stdout.strip()
    RESULTS_FILE.write_bytes(pickle.dumps(data))
    output = ROOT / "docs" / "benchmarks.md"
    output.write_text(report.render(data))
    log(f"wrote {output} in {data['elapsed']:.0f}s")


if __name__ == "__main__":
    main()
