"""Markdown tables of the measured results, for bench/report.py."""

from __future__ import annotations

import math
import statistics

from load import RunResult

NAMES = {
    "direct": "direct to the upstream",
    "proxy": "this proxy",
    "litellm": "LiteLLM",
}


def _ms(seconds: float) -> str:
    return "n/a" if math.isnan(seconds) else f"{seconds * 1000:.1f}"


def latency_table(targets: dict) -> list[str]:
    direct = targets["direct"]
    rows = [
        "| | 1 client p50 | p99 | added p50 | added p99 "
        "| 16 clients p50 | p99 | added p50 | added p99 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, result in targets.items():
        one, many = result["sequential"], result["concurrent"]
        rows.append(
            f"| {NAMES[name]} | {_ms(one.p50)} | {_ms(one.p99)} "
            f"| {_ms(one.p50 - direct['sequential'].p50)} "
            f"| {_ms(one.p99 - direct['sequential'].p99)} "
            f"| {_ms(many.p50)} | {_ms(many.p99)} "
            f"| {_ms(many.p50 - direct['concurrent'].p50)} "
            f"| {_ms(many.p99 - direct['concurrent'].p99)} |"
        )
    return rows


def throughput_table(targets: dict) -> list[str]:
    litellm = targets["litellm"]["concurrent"].rate
    rows = [
        "| | requests/s | requests | errors | ratio to LiteLLM |",
        "|---|---|---|---|---|",
    ]
    for name, result in targets.items():
        run: RunResult = result["concurrent"]
        rows.append(
            f"| {NAMES[name]} | {run.rate:.0f} | {run.completed} | {run.failed} "
            f"| {run.rate / litellm:.2f} |"
        )
    return rows


def cpu_table(targets: dict) -> list[str]:
    groups = ["server processes", "PostgreSQL backends", "Redis server", "upstream"]
    rows = [
        "| | " + " | ".join(groups) + " | total |",
        "|---|" + "---|" * (len(groups) + 1),
    ]
    for name, result in targets.items():
        completed = result["concurrent"].completed or 1
        used = result.get("cpu", {})
        cells = [
            f"{1000 * used[group] / completed:.2f}" if group in used else "-"
            for group in groups
        ]
        total = 1000 * sum(used.values()) / completed
        rows.append(f"| {NAMES[name]} | {' | '.join(cells)} | {total:.2f} |")
    return rows


def _slow_row(label: str, run: RunResult, direct: RunResult) -> str:
    errors = run.failed
    detail = ", ".join(f"{k}: {v}" for k, v in {**run.errors}.items())
    statuses = ", ".join(
        f"{k}: {v}" for k, v in sorted(run.statuses.items()) if k != 200
    )
    extra = "; ".join(part for part in (detail, statuses) if part)
    errors_cell = f"{errors} ({extra})" if extra else str(errors)
    return (
        f"| {label} | {run.clients} | {run.rate:.0f} | {run.rate / direct.rate:.0%} "
        f"| {_ms(run.p50)} | {_ms(run.p99)} | {errors_cell} |"
    )


def slow_table(targets: dict, many_keys: RunResult) -> list[str]:
    rows = [
        "| | clients | requests/s | of direct | p50 ms | p99 ms | errors |",
        "|---|---|---|---|---|---|---|",
    ]
    for clients in (200, 500):
        direct = targets["direct"][f"slow_{clients}"]
        for name, result in targets.items():
            rows.append(_slow_row(NAMES[name], result[f"slow_{clients}"], direct))
    rows.append(
        _slow_row(
            "this proxy, a key per client", many_keys, targets["direct"]["slow_500"]
        )
    )
    return rows


def long_table(targets: dict) -> list[str]:
    direct = targets["direct"]
    if "long" not in direct:
        return ["(not measured in this run)"]
    rows = [
        "| | clients | requests/s | of direct | p50 ms | p99 ms | errors "
        "| most calls in flight at the upstream |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, result in targets.items():
        row = _slow_row(NAMES[name], result["long"], direct["long"])
        rows.append(f"{row} {result['long_peak_in_flight']} |")
    return rows


def stream_table(targets: dict, chunks: int, spacing_ms: int) -> list[str]:
    direct = targets["direct"]["stream"]
    rows = [
        "| | streams | first chunk p50 ms | added ms | content chunks per stream "
        "| mean spacing ms | largest spacing ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, result in targets.items():
        run: RunResult = result["stream"]
        counts = sorted(set(run.event_counts)) or ["none"]
        first = run.percentile(run.first_event, 0.5)
        added = first - direct.percentile(direct.first_event, 0.5)
        largest = max(run.event_gaps) if run.event_gaps else float("nan")
        rows.append(
            f"| {NAMES[name]} | {run.completed} | {_ms(first)} | {_ms(added)} "
            f"| {', '.join(map(str, counts))} (sent: {chunks}) "
            f"| {_ms(run.mean_gap)} (sent: {spacing_ms}) | {_ms(largest)} |"
        )
    return rows


def rss_table(data: dict) -> list[str]:
    rows = [
        "| | processes | after start MB | idle after warm-up MB | peak under load MB |",
        "|---|---|---|---|---|",
    ]
    for name in ("proxy", "litellm"):
        result = data["targets"][name]
        start = data["rss_start"][name]
        rows.append(
            f"| {NAMES[name]} | {len(start)} | {', '.join(f'{v:.0f}' for v in start)} "
            f"| {', '.join(f'{v:.0f}' for v in result['rss_idle'])} "
            f"| {', '.join(f'{v:.0f}' for v in result['rss_load'])} |"
        )
    return rows


def _round_pairs(rounds: list[dict]) -> list[tuple[dict, dict]]:
    """Pair each round's proxy result with its LiteLLM result."""
    by_round: dict[int, dict] = {}
    for result in rounds:
        by_round.setdefault(result["round"], {})[result["target"]] = result
    return [(pair["proxy"], pair["litellm"]) for _, pair in sorted(by_round.items())]


def rounds_table(data: dict) -> list[str]:
    direct_p50 = data["targets"]["direct"]["sequential"].p50
    rows = [
        "| round | 1 client, added p50 ms: this proxy | LiteLLM | ratio "
        "| 16 clients, requests/s: this proxy | LiteLLM | ratio | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for proxy, litellm in _round_pairs(data["rounds"]):
        added_proxy = proxy["sequential_p50"] - direct_p50
        added_litellm = litellm["sequential_p50"] - direct_p50
        rows.append(
            f"| {proxy['round']} | {_ms(added_proxy)} | {_ms(added_litellm)} "
            f"| {added_proxy / added_litellm:.2f} | {proxy['rate']:.0f} "
            f"| {litellm['rate']:.0f} | {proxy['rate'] / litellm['rate']:.2f} "
            f"| {proxy['failed'] + litellm['failed']} |"
        )
    return rows


def round_ratios(data: dict) -> tuple[float, float, float, float]:
    """Return the median added p50 of the proxy and of LiteLLM, in seconds,
    and the median ratios of added latency and of throughput."""
    direct_p50 = data["targets"]["direct"]["sequential"].p50
    pairs = _round_pairs(data["rounds"])
    added_proxy = statistics.median(p["sequential_p50"] - direct_p50 for p, _ in pairs)
    added_litellm = statistics.median(
        lite["sequential_p50"] - direct_p50 for _, lite in pairs
    )
    latency_ratio = statistics.median(
        (p["sequential_p50"] - direct_p50) / (lite["sequential_p50"] - direct_p50)
        for p, lite in pairs
    )
    throughput_ratio = statistics.median(p["rate"] / lite["rate"] for p, lite in pairs)
    return added_proxy, added_litellm, latency_ratio, throughput_ratio


def goal_rows(data: dict) -> list[str]:
    targets = data["targets"]
    direct, proxy, litellm = (targets[n] for n in ("direct", "proxy", "litellm"))
    if data.get("rounds"):
        added_proxy, added_litellm, latency_ratio, throughput = round_ratios(data)
    else:
        added_proxy = proxy["sequential"].p50 - direct["sequential"].p50
        added_litellm = litellm["sequential"].p50 - direct["sequential"].p50
        latency_ratio = added_proxy / added_litellm
        throughput = proxy["concurrent"].rate / litellm["concurrent"].rate
    slow = proxy["slow_500"]
    slow_ratio = slow.rate / direct["slow_500"].rate
    first = proxy["stream"].percentile(proxy["stream"].first_event, 0.5)
    first_added = first - direct["stream"].percentile(direct["stream"].first_event, 0.5)
    rss = max(proxy["rss_load"]) if proxy["rss_load"] else float("nan")
    goals = [
        (
            "added p50 (1 client) at most 1/4 of LiteLLM's",
            f"{_ms(added_proxy)} ms vs {_ms(added_litellm)} ms "
            f"({latency_ratio:.2f} of it)",
            latency_ratio <= 0.25,
        ),
        (
            "throughput (instant upstream, 16 clients) at least 3x LiteLLM's",
            f"{throughput:.2f}x",
            throughput >= 3,
        ),
        (
            "1-second upstream, 500 clients: at least 95% of direct, no errors",
            f"{slow_ratio:.0%}, {slow.failed} errors",
            slow_ratio >= 0.95 and slow.failed == 0,
        ),
        (
            "added time to first chunk at most 3 ms",
            f"{_ms(first_added)} ms",
            first_added <= 0.003,
        ),
        ("under 150 MB RSS per worker", f"{rss:.0f} MB peak", rss < 150),
    ]
    if "long" in proxy:
        long_run, clients = proxy["long"], proxy["long"].clients
        delay = data["long_delay_seconds"]
        held = proxy["long_peak_in_flight"]
        # Held without queueing means two things. Nearly every client's call
        # waits at the upstream at the same time, since each client also
        # spends a few milliseconds in the proxy around its call. And the
        # median call takes the upstream's delay plus at most 0.1 s.
        goals.append(
            (
                f"{clients} upstream calls held at once, no queueing "
                f"({delay}-second upstream)",
                f"{held} in flight at once, p50 {_ms(long_run.p50)} ms, "
                f"{long_run.failed} errors",
                held >= clients and long_run.p50 < delay + 0.1 and long_run.failed == 0,
            )
        )
    rows = ["| goal | measured | met |", "|---|---|---|"]
    rows += [
        f"| {goal} | {value} | {'yes' if met else 'no'} |" for goal, value, met in goals
    ]
    return rows


def worker_table(models: dict) -> list[str]:
    rows = [
        "| worker model | 16 clients, instant: requests/s | p50 ms "
        "| 500 clients, 1-second: requests/s | p50 ms | errors "
        "| peak RSS per worker MB |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, result in models.items():
        instant, slow = result["instant"], result["slow_500"]
        rows.append(
            f"| {name} | {instant.rate:.0f} | {_ms(instant.p50)} | {slow.rate:.0f} "
            f"| {_ms(slow.p50)} | {instant.failed + slow.failed} "
            f"| {result['rss_peak']:.0f} |"
        )
    return rows
