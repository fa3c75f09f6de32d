"""Daily usage charts as inline SVG, rendered by the server for the admin."""

import datetime
import math
from dataclasses import dataclass

from django.contrib import admin
from django.template.loader import render_to_string
from django.utils import timezone
from django.utils.safestring import SafeString

from keys.models import APIKey, Tier

from .reports import daily_totals

WIDTH = 640
HEIGHT = 180
MARGIN_LEFT = 64
MARGIN_RIGHT = 8
MARGIN_TOP = 24
MARGIN_BOTTOM = 36
PLOT_WIDTH = WIDTH - MARGIN_LEFT - MARGIN_RIGHT
PLOT_HEIGHT = HEIGHT - MARGIN_TOP - MARGIN_BOTTOM
# Share of each day's slot that its bar fills. The rest is the gap between bars.
BAR_FILL = 0.75

# A UTC day and its value.
Point = tuple[datetime.date, int]


@dataclass(frozen=True)
class Bar:
    day: datetime.date
    value: int
    # Geometry in SVG user units, rounded to two decimals.
    x: str
    y: str
    width: str
    height: str
    tooltip: str


@dataclass(frozen=True)
class Label:
    x: str
    y: str
    text: str
    anchor: str = "middle"


@dataclass(frozen=True)
class BarChart:
    """One series of daily values, laid out for generation/usage_chart.html."""

    heading: str
    description: str
    bars: list[Bar]
    # The value at the top of the plot, a round number at or above the max.
    axis_max: int
    y_labels: list[Label]
    x_labels: list[Label]
    axis_title: Label
    # Shown across the plot when every value is zero, else "".
    empty_message: str


def axis_ceiling(value: int) -> int:
    """Return the smallest round number at or above `value`, and at least 1.

    Round numbers are 1, 1.5, 2, 2.5, 3, 4, 5, 6 and 8 times a power of ten, so
    the tallest bar fills more than two thirds of the plot unless all are zero.
    """
    if value <= 1:
        return 1
    magnitude = 10 ** math.floor(math.log10(value))
    for step in (1, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10):
        if step * magnitude >= value:
            return math.ceil(step * magnitude)
    raise AssertionError("unreachable: 10 * magnitude exceeds value")


def compact_number(value: int) -> str:
    """Format a count for an axis label, e.g. 950, 12k, 1.5M."""
    for threshold, suffix in ((10**9, "G"), (10**6, "M"), (10**3, "k")):
        if value >= threshold:
            return f"{value / threshold:.1f}".removesuffix(".0") + suffix
    return str(value)


def _coordinate(value: float) -> str:
    return f"{value:.2f}".rstrip("0").rstrip(".")


def build_bar_chart(*, title: str, unit: str, points: list[Point]) -> BarChart:
    """Lay out one bar per (day, value) point, scaled to a round axis maximum."""
    values = [value for _, value in points]
    peak = max(values, default=0)
    axis_max = axis_ceiling(peak)
    slot = PLOT_WIDTH / max(len(points), 1)
    bar_width = max(slot * BAR_FILL, 1.0)
    baseline = MARGIN_TOP + PLOT_HEIGHT
    bars = []
    for index, (day, value) in enumerate(points):
        height = value / axis_max * PLOT_HEIGHT
        bars.append(
            Bar(
                day=day,
                value=value,
                x=_coordinate(MARGIN_LEFT + index * slot + (slot - bar_width) / 2),
                y=_coordinate(baseline - height),
                width=_coordinate(bar_width),
                height=_coordinate(height),
                tooltip=f"{day.isoformat()}: {value:,} {unit}",
            )
        )
    return BarChart(
        heading=f"{title} (total {sum(values):,})",
        description=_description(title, unit, points, peak),
        bars=bars,
        axis_max=axis_max,
        y_labels=_y_labels(axis_max),
        x_labels=_x_labels(points, slot),
        axis_title=Label(
            x=_coordinate(MARGIN_LEFT + PLOT_WIDTH / 2),
            y=_coordinate(HEIGHT - 4),
            text="Day (UTC)",
        ),
        empty_message=f"No {unit} in these days." if peak == 0 else "",
    )


def _description(title: str, unit: str, points: list[Point], peak: int) -> str:
    if not points:
        return f"{title}: no days."
    span = f"{points[0][0].isoformat()} to {points[-1][0].isoformat()} (UTC)"
    total = sum(value for _, value in points)
    if peak == 0:
        return f"{title}, {span}: no {unit}."
    peak_day = next(day for day, value in points if value == peak)
    return (
        f"{title}, {span}: {total:,} {unit} in total, "
        f"at most {peak:,} on {peak_day.isoformat()}."
    )


def _y_labels(axis_max: int) -> list[Label]:
    x = _coordinate(MARGIN_LEFT - 6)
    return [
        Label(x=x, y=_coordinate(MARGIN_TOP + PLOT_HEIGHT), text="0", anchor="end"),
        Label(
            x=x, y=_coordinate(MARGIN_TOP), text=compact_number(axis_max), anchor="end"
        ),
    ]


def _x_labels(points: list[Point], slot: float) -> list[Label]:
    """Label the first and last day at the plot's edges, and the middle day."""
    y = _coordinate(MARGIN_TOP + PLOT_HEIGHT + 14)
    labels = []
    if points:
        first = points[0][0].isoformat()
        labels.append(
            Label(x=_coordinate(MARGIN_LEFT), y=y, text=first, anchor="start")
        )
    if len(points) >= 3:
        middle = len(points) // 2
        center = _coordinate(MARGIN_LEFT + middle * slot + slot / 2)
        labels.append(Label(x=center, y=y, text=points[middle][0].isoformat()))
    if len(points) >= 2:
        right = _coordinate(MARGIN_LEFT + PLOT_WIDTH)
        last = points[-1][0].isoformat()
        labels.append(Label(x=right, y=y, text=last, anchor="end"))
    return labels


def usage_chart_html(
    *, api_key: APIKey | None = None, tier: Tier | None = None, days: int = 30
) -> SafeString:
    """Render charts of daily requests and tokens over the last `days` UTC days.

    The last day is today. Without `api_key` and `tier` the charts cover every
    key. The HTML is inline SVG, with no script, stylesheet or font to load.
    """
    if days < 1:
        raise ValueError(f"days must be 1 or more, not {days}.")
    today = timezone.now().astimezone(datetime.UTC).date()
    since = today - datetime.timedelta(days=days - 1)
    totals = daily_totals(since=since, until=today, api_key=api_key, tier=tier)
    charts = [
        build_bar_chart(
            title="Requests per day",
            unit="requests",
            points=[(total.day, total.requests) for total in totals],
        ),
        build_bar_chart(
            title="Tokens per day",
            unit="tokens",
            points=[(total.day, total.tokens) for total in totals],
        ),
    ]
    context = {
        "charts": charts,
        "width": WIDTH,
        "height": HEIGHT,
        "plot_left": MARGIN_LEFT,
        "plot_right": MARGIN_LEFT + PLOT_WIDTH,
        "plot_top": MARGIN_TOP,
        "middle": MARGIN_TOP + PLOT_HEIGHT // 2,
        "baseline": MARGIN_TOP + PLOT_HEIGHT,
    }
    return render_to_string("generation/usage_chart.html", context)


@admin.display(description="daily usage, last 30 days")
def usage_chart(obj: APIKey | Tier | None) -> SafeString | str:
    """Show the usage charts of an API key or tier as a read-only admin field.

    List the function itself, not its name, in a ModelAdmin's readonly fields
    and fieldsets. An object not saved yet (on an add page) shows "-".
    """
    if obj is None or obj.pk is None:
        return "-"
    if isinstance(obj, APIKey):
        return usage_chart_html(api_key=obj)
    if isinstance(obj, Tier):
        return usage_chart_html(tier=obj)
    raise TypeError(f"usage_chart shows API keys and tiers, not {type(obj).__name__}.")
