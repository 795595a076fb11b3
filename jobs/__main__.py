"""`python -m jobs …` is `oncelery …`, for when the console script is not on PATH yet."""

from __future__ import annotations

from jobs.cli import main

main()
