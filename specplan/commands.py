"""Registers the commands implemented in the subpackages onto the `specplan` app."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    from specplan.hwprofiles.cli import calibrate_cmd, profile_cmd
    from specplan.planner.cli import optimize_cmd
    from specplan.planner.sweep_cli import sweep_cmd
    from specplan.runtime.batch import batch_cmd
    from specplan.runtime.validate import validate_cmd  # torch is imported only when it runs
    from specplan.simulator.cli import simulate_cmd

    app.command("optimize")(optimize_cmd)
    app.command("sweep")(sweep_cmd)
    app.command("profile")(profile_cmd)
    app.command("calibrate")(calibrate_cmd)
    app.command("simulate")(simulate_cmd)
    app.command("validate")(validate_cmd)
    app.command("batch")(batch_cmd)
