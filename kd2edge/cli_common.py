"""Shared pieces of the CLI: options, output, and the error boundary.

Commands stay thin: parse, call one library function, print a summary (or JSON with
`--json`). Heavy libraries are imported inside the command bodies only.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Callable

import click

from kd2edge.distributed import is_secondary_process

json_option = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON instead of a summary.")
profile_option = click.option("--profile", "-p", "profile", default=None, metavar="NAME|FILE",
                              help="Device profile name (kd2edge profiles list) or a .toml file. [default: laptop-cpu]")
config_option = click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
                             metavar="FILE|RECIPE",
                             help="A run config file (JSON or TOML, as written by --print-config), or the name "
                                  "of a shipped recipe (study: the study's compression, about 70 min on 2 cores).")


# The flags that start a command's processes through accelerate's launcher (`kd2edge.distributed`).
LAUNCH_PARAMS = ("num_processes", "num_machines", "machine_rank", "main_process_ip", "main_process_port",
                 "accelerate_config")
_LAUNCH_OPTIONS = (
    click.option("--num-processes", type=click.IntRange(min=1), default=None,
                 help="Distill in this many processes over all machines (one per GPU, or CPU processes), started "
                      "through accelerate's launcher; batch_size is per process. [default: 1, this process]"),
    click.option("--num-machines", type=click.IntRange(min=1), default=None,
                 help="Machines taking part (run the same command on each, with its --machine-rank). [default: 1]"),
    click.option("--machine-rank", type=click.IntRange(min=0), default=None, help="This machine's rank, 0 to "
                 "--num-machines - 1; machine 0 writes the stage folder. [default: 0]"),
    click.option("--main-process-ip", default=None, help="Address of machine 0 (several machines)."),
    click.option("--main-process-port", type=click.IntRange(1, 65535), default=None,
                 help="Port on machine 0. [default: a free one on one machine, 29500 on several]"),
    click.option("--accelerate-config", type=click.Path(dir_okay=False, exists=True), default=None,
                 help="An accelerate config file for the launcher (its distributed_type, environment...)."),
)


def launch_options(command: Callable) -> Callable:
    """Add --num-processes and the multi-machine flags (`LAUNCH_PARAMS`) to a command."""
    for option in reversed(_LAUNCH_OPTIONS):
        command = option(command)
    return command


def emit(result: Any, as_json: bool, summary: Callable[[Any], str] | str) -> None:
    """Print `result` as JSON, or the human summary (the main process only, when launched in several)."""
    if is_secondary_process():
        return
    if as_json:
        click.echo(json.dumps(result, indent=2, default=str))
    else:
        click.echo(summary(result) if callable(summary) else summary)


def info(message: str) -> None:
    """Progress and notes go to stderr, so stdout stays clean for --json (the main process only)."""
    if not is_secondary_process():
        click.echo(message, err=True)


def warn(message: str) -> None:
    if not is_secondary_process():
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
