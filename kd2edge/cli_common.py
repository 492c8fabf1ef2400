"""Shared pieces of the CLI: options, output, and the error boundary.

Commands stay thin: parse, call one library function, print a summary (or JSON with
`--json`). Heavy libraries are imported inside the command bodies only.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Callable

import click

json_option = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON instead of a summary.")
profile_option = click.option("--profile", "-p", "profile", default=None, metavar="NAME|FILE",
                              help="Device profile name (kd2edge profiles list) or a .toml file. [default: laptop-cpu]")
config_option = click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
                             help="A run config file (JSON or TOML, as written by --print-config).")


def emit(result: Any, as_json: bool, summary: Callable[[Any], str] | str) -> None:
    """Print `result` as JSON, or the human summary."""
    if as_json:
        click.echo(json.dumps(result, indent=2, default=str))
    else:
        click.echo(summary(result) if callable(summary) else summary)


def info(message: str) -> None:
    """Progress and notes go to stderr, so stdout stays clean for --json."""
    click.echo(message, err=True)


def warn(message: str) -> None:
    click.echo(click.style("warning: ", fg="yellow") + message, err=True)


def fail_line(message: str) -> None:
    click.echo(click.style("error: ", fg="red", bold=True) + message, err=True)


def table(rows: list[list[Any]], header: list[str]) -> str:
    """A plain aligned text table."""
    cells = [header] + [[("" if c is None else str(c)) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def stderr_is_tty() -> bool:
    return sys.stderr.isatty()
