"""Write docs/benchmarks.md from the results of bench/run.py.

`python bench/report.py` renders the report again from the results that the
last run saved, without measuring anything.
"""

from __future__ import annotations

import json
import pickle
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import stacks  # noqa: E402
import tables  # noqa: E402


def _output(command: list[str]) -> str:
    try:
        return subprocess.run(command, capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unavailable"


def describe_machine() -> dict[str, str]:
    """Describe the machine for the report, read when a run ends."""
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return {
        "nproc": _output(["nproc"]),
        "cpu": cpu,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "loadavg_end": Path("/proc/loadavg").read_text().strip(),
        "free": _output(["free", "-h"]),
        "finished_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def _machine(data: dict) -> list[str]:
    machine = data["machine"]
    return [
        f"- `nproc`: {machine['nproc']}",
        f"- CPU: {machine['cpu']}",
        f"- Python: {machine['python']}, Linux {machine['kernel']}",
        f"- `/proc/loadavg` at the start: {data['loadavg_start']}",
        f"- `/proc/loadavg` at the end: {machine['loadavg_end']}",
        "- `free -h`:",
        "",
        "```",
        machine["free"],
        "```",
    ]


def _round_trips(commands: list[str]) -> int:
    """Count the commands sent by the client, not those run inside a script."""
    return sum(1 for command in commands if not command.startswith("("))


def _queries(text: str) -> list[str]:
    try:
        measured = json.loads(text)
    except ValueError:
        return ["The per-request query listing failed; see bench/queries.py."]
    statements = measured["sql"]
    total = sum(item["ms"] for item in statements)
    rows = [
        f"One chat completion (status {measured['status']}, "
        f"{measured['request_ms']} ms in-process, warm) sent {len(statements)} SQL "
        f"queries ({sum(item.get('count', 1) for item in statements)} statements) "
        f"taking {total:.1f} ms in all, {_transactions(measured)}. It "
        f"made {_round_trips(measured['redis'])} Redis round trips "
        f"({', '.join(measured['redis'])}).",
        "",
        "| # | ms | statements (values replaced by ?) |",
        "|---|---|---|",
    ]
    for number, item in enumerate(statements, start=1):
        parts = [part[:70] for part in item["sql"].split("; ")]
        sql = "; ".join(parts).replace("|", "\\|")
        rows.append(f"| {number} | {item['ms']:.2f} | `{sql}` |")
    return rows


def _rounds(data: dict) -> list[str]:
    if not data.get("rounds"):
        return []
    return [
        "## Alternating rounds",
        "",
        "The machine's speed drifts during a run, and the tables above measure "
        "each target minutes apart. These short runs (one client, then 16, "
        "for a few seconds each, instant upstream) alternate between this proxy "
        "and LiteLLM, so both meet the same drift.",
        "",
        *tables.rounds_table(data),
        "",
    ]


def _transactions(measured: dict) -> str:
    count = measured.get("transactions")
    if count is None:
        return "transactions not counted"
    if count == 0:
        return "each in its own implicit transaction (no BEGIN and COMMIT)"
    return f"plus the BEGIN and COMMIT of {count} transaction(s)"


def _profile(text: str) -> list[str]:
    if not text:
        return ["py-spy recorded nothing (it needs permission to trace processes)."]
    profile = stacks.summarise(text)
    rows = [
        f"py-spy sampled one worker 250 times a second under 16 clients, "
        f"keeping only the thread that held the GIL: {profile.busy} samples. "
        "Inclusive shares count a function with everything it called.",
        "",
        "| share of busy samples | project function (inclusive) |",
        "|---|---|",
    ]
    for label, samples in profile.top_inclusive(20, project_only=True):
        rows.append(f"| {100 * samples / profile.busy:.1f}% | `{label}` |")
    rows += ["", "| share | innermost function (own time) |", "|---|---|"]
    for label, samples in profile.top_own(15):
        rows.append(f"| {100 * samples / profile.busy:.1f}% | `{label}` |")
    return rows


def render(data: dict) -> str:
    """Return the Markdown report for one run's results."""
    from run import STREAM_CHUNKS, STREAM_SPACING_MS

    targets = data["targets"]
    analysis = (Path(__file__).with_name("analysis.md")).read_text()
    parts = [
        "# Benchmarks",
        "",
        "Generated by `bench/run.py` on "
        f"{data['machine']['finished_at']} in "
        f"{data['elapsed']:.0f} seconds. Do not edit the numbers by hand: run "
        "`make bench` again. The analysis at the end is written by hand, in "
        "`bench/analysis.md`.",
        "",
        "## How to run",
        "",
        "```sh",
        "make bench        # or: .venv/bin/python bench/run.py",
        "```",
        "",
        "It needs PostgreSQL and Redis on 127.0.0.1 (database `proxy_bench`, Redis "
        "database 10; see `BENCH_*` in `bench/run.py`), PyPI for the first run, "
        "which installs `litellm[proxy]`, py-spy and uvicorn under "
        "`/tmp/proxy-bench`, and root (or ptrace permission) for py-spy.",
        "",
        "## Machine",
        "",
        *_machine(data),
        "",
        "Other programs on the machine share its two cores, so repeated runs vary; "
        "compare the rows of one run with each other rather than across runs.",
        "",
        "## Set-up",
        "",
        "- **Upstream:** `bench/upstream.py`, an asyncio server that answers chat "
        "completions at once (`bench-instant`), after one second "
        "(`bench-delay-1000`), or as a stream of "
        f"{STREAM_CHUNKS} chunks {STREAM_SPACING_MS} ms apart.",
        f"- **This proxy:** `gunicorn -c gunicorn.conf.py proxy_site.wsgi`, "
        f"{data['workers']} gthread workers of {data.get('threads', 256)} threads, "
        "each listening on its own socket (`SO_REUSEPORT`), PostgreSQL with "
        f"`DATABASE_POOL_MAX_SIZE={data['pool_size']}` per worker, Redis cache, "
        "`DEBUG=off` and the default `LOG_LEVEL=INFO` (one access line per "
        "request). One key of a tier with a rate limit, daily and monthly token "
        "caps and one keyword rule, so every request runs key lookup, rate "
        "limit, prompt rules, quota reservation, the upstream call and the "
        "usage record.",
        f"- **LiteLLM:** {data['litellm_version']} from PyPI in its own "
        f"virtualenv, `litellm --config ... --num_workers {data['workers']}`, a "
        "master key, no database, the same upstream as an OpenAI-compatible "
        "provider (`openai/*` with `api_base`).",
        "- **Load:** `bench/load.py`, asyncio clients with one keep-alive "
        "connection each, in the same process as `bench/run.py`. The same "
        "request body goes to all three. Before each measurement the script "
        "waits (up to a minute) until the servers and PostgreSQL use less than "
        "a tenth of a core, so that no server is still working through an "
        "earlier load whose clients gave up.",
        "",
        "## Added latency",
        "",
        'Milliseconds per request, instant upstream; "added" is the '
        "difference from the direct call.",
        "",
        *tables.latency_table(targets),
        "",
        "## Throughput with an instant upstream, 16 clients",
        "",
        *tables.throughput_table(targets),
        "",
        "CPU milliseconds used per request in the same run, read from "
        "`/proc/PID/stat` before and after. The Redis server is shared with other "
        "programs, so its figure is an upper bound; the load generator is not "
        "counted.",
        "",
        *tables.cpu_table(targets),
        "",
        "## Slow upstream: one second per call",
        "",
        "Each client sends its next request as soon as the last one returns, "
        "so N clients ask for N requests per second. Latency over one second is "
        "time spent queued in front of the upstream call. This proxy gives its "
        "database connection back to the pool during the upstream call, so the "
        f"pool ({data['pool_size']} connections per worker) does not cap the "
        "calls in flight. A request that waits longer than "
        "`DATABASE_POOL_TIMEOUT` for a connection fails with 503.",
        "",
        *tables.slow_table(targets, data["slow_500_many_keys"]),
        "",
        f"## Long upstream: {data.get('long_delay_seconds', '-')} seconds per call",
        "",
        "The same load with a longer call, so that the clients ask for fewer "
        "requests per second than the CPU serves. It shows whether a server "
        "holds every client's call open at once: the last column is the most "
        "calls the fake upstream had waiting at one time.",
        "",
        *tables.long_table(targets),
        "",
        "## Streaming",
        "",
        *tables.stream_table(targets, STREAM_CHUNKS, STREAM_SPACING_MS),
        "",
        "## Memory per worker process",
        "",
        *tables.rss_table(data),
        "",
        *_rounds(data),
        "## Goals",
        "",
        "Where the run has alternating rounds, the first two goals use their "
        "medians; the other goals use the tables above.",
        "",
        *tables.goal_rows(data),
        "",
        "## Worker model",
        "",
        "The same proxy and settings under three servers, one after another "
        "(the ASGI server runs the same synchronous views through Django's "
        "ASGI handler). The last row is gthread with `GUNICORN_THREADS=64` in "
        f"place of {data.get('threads', 256)}, to show what the threads cost in "
        "memory.",
        "",
        *tables.worker_table(data["worker_models"]),
        "",
        "## Where the time goes",
        "",
        "### Database and cache work per request",
        "",
        *_queries(data["queries"]),
        "",
        "### CPU profile of a worker",
        "",
        *_profile(data["profile"]),
        "",
        analysis.rstrip(),
        "",
    ]
    return "\n".join(parts)


def main() -> None:
    from launch import RESULTS_FILE, ROOT

    data = pickle.loads(RESULTS_FILE.read_bytes())
    (ROOT / "docs" / "benchmarks.md").write_text(render(data))


if __name__ == "__main__":
    main()
