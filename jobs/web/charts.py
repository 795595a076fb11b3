"""Small charts for the pages, rendered on the server as SVG: pure functions from numbers to
markup, no JavaScript. Every text that reaches the markup is escaped here."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final, Literal

from markupsafe import Markup, escape

#: The minute keys `LedgerStats.per_minute` uses (UTC).
MINUTE_FORMAT: Final = "%Y-%m-%d %H:%M"
#: A label on the time axis every this many points (and on the last one).
LABEL_EVERY: Final = 10


@dataclass(frozen=True)
class Frame:
    """A chart's size and the margins around its plot area, in SVG user units."""

    width: int = 640
    height: int = 200
    left: int = 56
    right: int = 14
    top: int = 30
    bottom: int = 42

    @property
    def plot_width(self) -> float:
        """The plot area's width."""
        return float(self.width - self.left - self.right)

    @property
    def plot_height(self) -> float:
        """The plot area's height."""
        return float(self.height - self.top - self.bottom)


def minute_keys(end: datetime, minutes: int) -> list[str]:
    """The `minutes` minute keys ending with `end`'s minute, oldest first."""
    last = end.replace(second=0, microsecond=0)
    return [
        (last - timedelta(minutes=n)).strftime(MINUTE_FORMAT) for n in range(minutes - 1, -1, -1)
    ]


def fill_minutes(
    values: Mapping[str, float], *, end: datetime, minutes: int = 60
) -> list[tuple[str, float]]:
    """One point per minute of the window ending at `end`; a minute without a value is 0.

    Args:
        values: figures by minute key (`YYYY-MM-DD HH:MM`, UTC); keys outside the window are
            dropped.
        end: the window's last minute (a UTC datetime).
        minutes: how many minutes the window spans.
    """
    return [(key, float(values.get(key, 0.0))) for key in minute_keys(end, minutes)]


def nice_ceiling(value: float) -> float:
    """The smallest 1, 2, 2.5 or 5 × 10ⁿ at or above `value` (1 for nothing to show): the
    axis' top, so its ticks read as round numbers."""
    if not math.isfinite(value) or value <= 0:
        return 1.0
    magnitude = 10.0 ** math.floor(math.log10(value))
    for step in (1.0, 2.0, 2.5, 5.0, 10.0):
        if value <= step * magnitude * (1 + 1e-9):
            return step * magnitude
    return 10.0 * magnitude  # pragma: no cover - the loop always returns


def format_number(value: float) -> str:
    """A figure as a person reads it: `3`, `2.5`, `0.25`, `1250`."""
    if value == int(value):
        return str(int(value))
    return f"{value:.3g}" if abs(value) < 1 else f"{value:.1f}".rstrip("0").rstrip(".")


def _clean(value: float) -> float:
    # NaN, infinities and negatives would break the geometry; none is a meaningful figure here.
    return value if math.isfinite(value) and value > 0 else 0.0


def minute_chart(
    points: Sequence[tuple[str, float]],
    *,
    title: str,
    unit: str,
    kind: Literal["bars", "line"] = "bars",
    frame: Frame | None = None,
) -> Markup:
    """An SVG chart of one figure per minute, with a labelled time axis (UTC) and value axis.

    Args:
        points: (minute key, value), oldest first, e.g. from `fill_minutes`.
        title: what the chart shows (its caption and accessible name).
        unit: the value axis' label, e.g. `ms`.
        kind: bars (counts) or a line (durations).
        frame: size and margins.

    Returns:
        `<svg>` markup, safe to put in a page as it is.
    """
    frame = frame or Frame()
    values = [_clean(value) for _, value in points]
    top = nice_ceiling(max(values, default=0.0))
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" role="img" '
        f'width="{frame.width}" height="{frame.height}" '
        f'viewBox="0 0 {frame.width} {frame.height}" aria-label="{escape(title)}" '
        f'font-family="sans-serif" font-size="11" fill="#333">',
        f"<title>{escape(title)}</title>",
        f'<text x="{frame.left}" y="16" class="chart-title" font-size="13" font-weight="bold">'
        f"{escape(title)}</text>",
        *_value_axis(frame, top, unit),
        *_time_axis(frame, [key for key, _ in points]),
    ]
    if not points:
        parts.append(_note(frame, "no data"))
    elif kind == "bars":
        parts.extend(_bars(frame, points, values, top, unit))
    else:
        parts.extend(_line(frame, points, values, top, unit))
    parts.append("</svg>")
    return Markup("\n".join(parts))  # noqa: S704 - every text above went through escape()


def _y(frame: Frame, value: float, top: float) -> float:
    return frame.top + frame.plot_height * (1 - value / top)


def _value_axis(frame: Frame, top: float, unit: str) -> list[str]:
    x0, x1 = frame.left, frame.width - frame.right
    lines = []
    for tick in (0.0, top / 2, top):
        y = _y(frame, tick, top)
        lines.append(
            f'<line x1="{x0}" y1="{y:.1f}" x2="{x1}" y2="{y:.1f}" class="grid" stroke="#ddd"/>'
        )
        lines.append(
            f'<text x="{x0 - 6}" y="{y + 4:.1f}" text-anchor="end" class="tick">'
            f"{escape(format_number(tick))}</text>"
        )
    middle = frame.top + frame.plot_height / 2
    lines.append(
        f'<text x="12" y="{middle:.1f}" text-anchor="middle" class="axis-label" '
        f'transform="rotate(-90 12 {middle:.1f})">{escape(unit)}</text>'
    )
    return lines


def _time_axis(frame: Frame, keys: Sequence[str]) -> list[str]:
    base = frame.top + frame.plot_height
    lines = [
        f'<line x1="{frame.left}" y1="{base:.1f}" x2="{frame.width - frame.right}" '
        f'y2="{base:.1f}" class="axis" stroke="#888"/>'
    ]
    slot = frame.plot_width / max(len(keys), 1)
    for index, key in enumerate(keys):
        if index % LABEL_EVERY and index != len(keys) - 1:
            continue
        x = frame.left + slot * (index + 0.5)
        lines.append(
            f'<text x="{x:.1f}" y="{base + 16:.1f}" text-anchor="middle" class="tick">'
            f"{escape(key[-5:])}</text>"
        )
    lines.append(
        f'<text x="{frame.left + frame.plot_width / 2:.1f}" y="{frame.height - 6}" '
        f'text-anchor="middle" class="axis-label">minute (UTC)</text>'
    )
    return lines


def _tooltip(key: str, value: float, unit: str) -> str:
    return f"<title>{escape(key)} UTC: {escape(format_number(value))} {escape(unit)}</title>"


def _bars(
    frame: Frame, points: Sequence[tuple[str, float]], values: list[float], top: float, unit: str
) -> list[str]:
    slot = frame.plot_width / len(points)
    width = max(slot * 0.8, 1.0)
    bars = []
    for index, ((key, _), value) in enumerate(zip(points, values, strict=True)):
        y = _y(frame, value, top)
        x = frame.left + slot * index + (slot - width) / 2
        height = frame.top + frame.plot_height - y
        bars.append(
            f'<rect x="{x:.1f}" y="{y:.1f}" width="{width:.1f}" height="{height:.1f}" '
            f'class="bar" fill="#3b6fc4">{_tooltip(key, value, unit)}</rect>'
        )
    return bars


def _line(
    frame: Frame, points: Sequence[tuple[str, float]], values: list[float], top: float, unit: str
) -> list[str]:
    slot = frame.plot_width / len(points)
    coords = [
        (frame.left + slot * (index + 0.5), _y(frame, value, top))
        for index, value in enumerate(values)
    ]
    path = " ".join(f"{x:.1f},{y:.1f}" for x, y in coords)
    marks = [
        f'<polyline points="{path}" class="line" fill="none" stroke="#c0392b" stroke-width="1.5"/>'
    ]
    for (key, _), value, (x, y) in zip(points, values, coords, strict=True):
        marks.append(
            f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2" class="dot" fill="#c0392b">'
            f"{_tooltip(key, value, unit)}</circle>"
        )
    return marks


def _note(frame: Frame, text: str) -> str:
    return (
        f'<text x="{frame.left + frame.plot_width / 2:.1f}" '
        f'y="{frame.top + frame.plot_height / 2:.1f}" text-anchor="middle" class="note" '
        'fill="#888">'
        f"{escape(text)}</text>"
    )


def throughput_charts(
    completed: Mapping[str, float], p99: Mapping[str, float], *, end: datetime, minutes: int
) -> list[Markup]:
    """The home page's two charts: jobs completed per minute (bars) and the p99 of step
    durations per minute (a line), over the `minutes` ending at `end`."""
    return [
        minute_chart(
            fill_minutes(completed, end=end, minutes=minutes),
            title="Jobs completed per minute",
            unit="jobs",
        ),
        minute_chart(
            fill_minutes(p99, end=end, minutes=minutes),
            title="Step duration p99 per minute",
            unit="ms",
            kind="line",
        ),
    ]
