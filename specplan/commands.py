"""Registers the commands implemented in the subpackages onto the `specplan` app."""

from __future__ import annotations

from importlib import import_module

import typer

# name -> (module, function), in the order `specplan --help` lists them. torch is imported only
# when a command that needs it runs.
COMMANDS = {
    "optimize": ("specplan.planner.cli", "optimize_cmd"),
    "sweep": ("specplan.planner.sweep_cli", "sweep_cmd"),
    "profile": ("specplan.hwprofiles.cli", "profile_cmd"),
    "calibrate": ("specplan.hwprofiles.cli", "calibrate_cmd"),
    "simulate": ("specplan.simulator.cli", "simulate_cmd"),
    "validate": ("specplan.runtime.validate", "validate_cmd"),
    "batch": ("specplan.runtime.batch", "batch_cmd"),
}


def register(app: typer.Typer, argv: list[str] | None = None) -> None:
    """Register the commands: where `argv` (the command line's arguments) names one of them, that
    one alone (the others' modules cost every command some 45 ms to import), else all of them
    (`specplan --help`, a mistyped command)."""
    named = next((a for a in argv or () if not a.startswith("-")), None)
    for name in [named] if named in COMMANDS else COMMANDS:
        module, function = COMMANDS[name]
        app.command(name)(getattr(import_module(module), function))
