"""Printing a benchmark's result: one JSON object, or aligned lines for people."""

import json

import click


def emit(result: dict, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(result))
        return
    width = max(len(k) for k in result) + 2
    for key, value in result.items():
        click.echo(f"{key:<{width}}{value}")
