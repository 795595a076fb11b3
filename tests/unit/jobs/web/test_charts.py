"""`jobs.web.charts`: minutes filled with zeros, round axis tops, and SVG that escapes what it
shows and survives no data, one point and figures that are not numbers."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from datetime import UTC, datetime

import pytest

from jobs.web.charts import (
    Frame,
    fill_minutes,
    format_number,
    minute_chart,
    minute_keys,
    nice_ceiling,
    throughput_charts,
)

END = datetime(2026, 3, 1, 12, 4, 37, tzinfo=UTC)
SVG = "{http://www.w3.org/2000/svg}"


def parse(markup: str) -> ET.Element:
    """The chart as XML (it must be well-formed to be valid inline SVG)."""
    return ET.fromstring(markup)


def heights(root: ET.Element) -> list[float]:
    return [float(rect.attrib["height"]) for rect in root.iter(f"{SVG}rect")]


def test_minute_keys_end_with_the_current_minute_oldest_first() -> None:
    assert minute_keys(END, 3) == ["2026-03-01 12:02", "2026-03-01 12:03", "2026-03-01 12:04"]


def test_minute_keys_cross_midnight() -> None:
    keys = minute_keys(datetime(2026, 3, 2, 0, 1, tzinfo=UTC), 3)
    assert keys == ["2026-03-01 23:59", "2026-03-02 00:00", "2026-03-02 00:01"]


def test_empty_minutes_are_zero_and_minutes_outside_the_window_are_dropped() -> None:
    values = {"2026-03-01 12:03": 7, "2026-03-01 11:00": 99}
    assert fill_minutes(values, end=END, minutes=3) == [
        ("2026-03-01 12:02", 0.0),
        ("2026-03-01 12:03", 7.0),
        ("2026-03-01 12:04", 0.0),
    ]


def test_an_hour_has_sixty_points() -> None:
    assert len(fill_minutes({}, end=END)) == 60


@pytest.mark.parametrize(
    ("value", "top"),
    [
        (0, 1.0),
        (-3, 1.0),
        (float("nan"), 1.0),
        (float("inf"), 1.0),
        (1, 1.0),
        (1.2, 2.0),
        (2.2, 2.5),
        (3, 5.0),
        (7, 10.0),
        (10, 10.0),
        (42, 50.0),
        (180, 200.0),
        (0.03, 0.05),
    ],
)
def test_the_axis_top_is_a_round_number_at_or_above_the_highest_value(
    value: float, top: float
) -> None:
    assert nice_ceiling(value) == pytest.approx(top)


@pytest.mark.parametrize(
    ("value", "text"), [(3.0, "3"), (2.5, "2.5"), (0.25, "0.25"), (1250.0, "1250"), (12.34, "12.3")]
)
def test_numbers_read_as_people_write_them(value: float, text: str) -> None:
    assert format_number(value) == text


def test_bars_are_scaled_to_the_axis_top() -> None:
    frame = Frame()
    points = [("2026-03-01 12:00", 0.0), ("2026-03-01 12:01", 5.0), ("2026-03-01 12:02", 10.0)]
    root = parse(minute_chart(points, title="done", unit="jobs", frame=frame))

    assert heights(root) == pytest.approx([0.0, frame.plot_height / 2, frame.plot_height], abs=0.1)
    ticks = [t.text for t in root.iter(f"{SVG}text") if t.attrib.get("class") == "tick"]
    assert ticks[:3] == ["0", "5", "10"]


def test_every_minute_has_a_bar_with_a_tooltip_and_the_axes_are_labelled() -> None:
    chart = minute_chart(fill_minutes({"2026-03-01 12:04": 3}, end=END), title="t", unit="jobs")
    root = parse(chart)

    bars = list(root.iter(f"{SVG}rect"))
    assert len(bars) == 60
    tooltip = bars[-1].find(f"{SVG}title")
    assert tooltip is not None
    assert tooltip.text == "2026-03-01 12:04 UTC: 3 jobs"
    labels = [t.text for t in root.iter(f"{SVG}text") if t.attrib.get("class") == "axis-label"]
    assert labels == ["jobs", "minute (UTC)"]
    assert "12:04" in chart
    assert "11:05" in chart  # the first minute of the hour is labelled too


def test_a_line_chart_has_one_point_per_minute() -> None:
    points = fill_minutes({"2026-03-01 12:03": 250.5}, end=END, minutes=5)
    root = parse(minute_chart(points, title="p99", unit="ms", kind="line"))

    [line] = root.iter(f"{SVG}polyline")
    assert len(line.attrib["points"].split()) == 5
    assert len(list(root.iter(f"{SVG}circle"))) == 5


def test_no_data_at_all_is_a_chart_that_says_so() -> None:
    for kind in ("bars", "line"):
        root = parse(minute_chart([], title="empty", unit="jobs", kind=kind))
        assert "no data" in ET.tostring(root, encoding="unicode")
        assert heights(root) == []


def test_an_hour_of_zeros_draws_flat_bars_on_an_axis_of_one() -> None:
    root = parse(minute_chart(fill_minutes({}, end=END), title="quiet", unit="jobs"))

    assert heights(root) == [0.0] * 60
    ticks = [t.text for t in root.iter(f"{SVG}text") if t.attrib.get("class") == "tick"]
    assert ticks[:3] == ["0", "0.5", "1"]


def test_figures_that_are_not_numbers_are_drawn_as_zero() -> None:
    points = [("a", float("nan")), ("b", float("inf")), ("c", -5.0), ("d", 2.0)]
    chart = minute_chart(points, title="odd", unit="ms")

    assert "nan" not in chart.lower()
    assert "inf" not in chart.lower()
    assert heights(parse(chart))[:3] == [0.0, 0.0, 0.0]


def test_text_is_escaped() -> None:
    evil = '<script>alert("x")</script> & "quotes"'
    chart = minute_chart([(evil, 1.0)], title=evil, unit=evil)

    assert "<script>" not in chart
    assert "&lt;script&gt;" in chart
    root = parse(chart)  # still well-formed XML
    assert root.attrib["aria-label"] == evil
    title = root.find(f"{SVG}title")
    assert title is not None
    assert title.text == evil


def test_the_home_page_gets_a_bar_chart_and_a_line_chart() -> None:
    completed, p99 = {"2026-03-01 12:04": 2}, {"2026-03-01 12:04": 812.25}
    done, latency = throughput_charts(completed, p99, end=END, minutes=60)

    assert "Jobs completed per minute" in done
    assert len(re.findall(r"<rect ", done)) == 60
    assert "Step duration p99 per minute" in latency
    assert "812.2 ms" in latency
    assert "<polyline" in latency
