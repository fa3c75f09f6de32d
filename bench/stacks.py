"""Summarise py-spy's raw (collapsed-stack) output: where a worker spends its time.

Each input line is `frame;frame;...;frame COUNT`, outermost frame first, and a
frame reads `function (path:line)`. Idle samples (a worker waiting on a socket
or in gevent's hub) are counted apart, so the shares are of busy time.

Run alone with `python bench/stacks.py PROFILE.txt`.
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

_FRAME = re.compile(r"^(?P<function>.*?) \((?P<path>.*?)(?::(?P<line>\d+))?\)$")
# Leaf functions that mean the thread or greenlet is waiting, not working.
_IDLE_LEAVES = (
    "select",
    "poll",
    "epoll",
    "wait",
    "_wait",
    "run (gevent/hub.py",
    "accept",
    "sleep",
    "recv_into",
    "recv",
    "acquire",
)
PROJECT_PACKAGES = ("keys/", "generation/", "proxy_site/")


@dataclass(frozen=True)
class Frame:
    function: str
    path: str

    @property
    def short_path(self) -> str:
        for marker in ("site-packages/", "/work/main/", "lib/python3"):
            if marker in self.path:
                return self.path.split(marker, 1)[1]
        return self.path

    @property
    def label(self) -> str:
        return f"{self.function} ({self.short_path})"

    @property
    def is_project(self) -> bool:
        return self.short_path.startswith(PROJECT_PACKAGES)


def _parse_frame(text: str) -> Frame:
    match = _FRAME.match(text.strip())
    if match is None:
        return Frame(function=text.strip(), path="")
    return Frame(function=match["function"], path=match["path"])


def _is_idle(stack: list[Frame]) -> bool:
    if not stack:
        return True
    leaf = stack[-1]
    text = f"{leaf.function} ({leaf.short_path}"
    return any(text.startswith(idle) or leaf.function == idle for idle in _IDLE_LEAVES)


@dataclass
class Profile:
    """Sample counts of one py-spy recording."""

    total: int
    busy: int
    # Samples in which a function is anywhere on the stack (busy samples only).
    inclusive: Counter
    # Samples in which a function is the innermost frame (busy samples only).
    own: Counter

    def top_inclusive(self, count: int, project_only: bool) -> list[tuple[str, int]]:
        rows = [
            (frame, samples)
            for frame, samples in self.inclusive.items()
            if not project_only or frame.is_project
        ]
        # Ties keep a fixed order, so that the same input renders the same.
        rows.sort(key=lambda row: (-row[1], row[0].label))
        return [(frame.label, samples) for frame, samples in rows[:count]]

    def top_own(self, count: int) -> list[tuple[str, int]]:
        rows = sorted(self.own.items(), key=lambda row: (-row[1], row[0].label))
        return [(frame.label, samples) for frame, samples in rows[:count]]


def summarise(text: str) -> Profile:
    """Count busy samples per function in collapsed-stack text."""
    inclusive: Counter = Counter()
    own: Counter = Counter()
    total = busy = 0
    for line in text.splitlines():
        stack_text, _, count_text = line.rpartition(" ")
        if not stack_text or not count_text.isdigit():
            continue
        samples = int(count_text)
        total += samples
        stack = [_parse_frame(part) for part in stack_text.split(";")]
        # py-spy puts the thread or process name first; it is not a frame.
        stack = [frame for frame in stack if frame.path]
        if _is_idle(stack):
            continue
        busy += samples
        own[stack[-1]] += samples
        for frame in set(stack):
            inclusive[frame] += samples
    return Profile(total=total, busy=busy, inclusive=inclusive, own=own)


def main() -> None:
    profile = summarise(Path(sys.argv[1]).read_text())
    print(f"{profile.busy} busy samples of {profile.total}")
    print("\nProject functions, inclusive:")
    for label, samples in profile.top_inclusive(25, project_only=True):
        print(f"{100 * samples / profile.busy:6.1f}%  {label}")
    print("\nAll functions, inclusive:")
    for label, samples in profile.top_inclusive(40, project_only=False):
        print(f"{100 * samples / profile.busy:6.1f}%  {label}")
    print("\nOwn time:")
    for label, samples in profile.top_own(25):
        print(f"{100 * samples / profile.busy:6.1f}%  {label}")


if __name__ == "__main__":
    main()
