"""Printing a benchmark's result: one JSON object, or aligned lines for people."""

import json
import resource

import click


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MB (Linux reports KB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def emit(result: dict, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(result))
        return
    width = max(len(k) for k in result) + 2
    for key, value in result.items():
        click.echo(f"{key:<{width}}{value}")
