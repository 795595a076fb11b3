"""The `oncelery` command line: the job commands, the operator's, and those that run processes."""

from __future__ import annotations

from jobs.cli.commands import cli, main

__all__ = ["cli", "main"]
