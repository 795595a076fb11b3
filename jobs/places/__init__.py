"""The places crawl: the geometry it plans and splits circles with (the pipeline comes later)."""

from __future__ import annotations

from jobs.places.geometry import Circle, cover, distance_m, plan, split

__all__ = ["Circle", "cover", "distance_m", "plan", "split"]
