"""Fold what `specrun` measured back into a hardware profile.

The plan is simulated as it ran (the measured per-token acceptance, the same number of
prompts). For each stage both sides know (copies, projections, attention, FFN, LM head,
draft), the profile gets a time multiplier measured / simulated (`calibration` in the
profile; the cost model applies it, see specplan.cost.stage_factor). The plan is then
simulated again on the calibrated profile, so the drop in prediction error shows how much
of it the calibrated stages explained.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from specplan.cost import error_pct, stage_total
from specplan.hardware import HardwareProfile
from specplan.models import ModelSpec, resolve_draft
from specplan.plan import Plan

CALIBRATED_STAGES = ("h2d", "target_proj", "target_attention", "target_ffn", "target_head", "draft")


@dataclass
class Calibration:
    profile: HardwareProfile
    factors: dict  # stage -> new multiplier
    measured_acceptance: float | None
    measured_tok_s: float
    before_tok_s: float
    after_tok_s: float

    @property
    def error_before_pct(self) -> float:
        return error_pct(self.measured_tok_s, self.before_tok_s)

    @property
    def error_after_pct(self) -> float:
        return error_pct(self.measured_tok_s, self.after_tok_s)


def stage_factors(measured: dict, predicted: dict, old: dict) -> dict:
    factors = dict(old)
    for stage in CALIBRATED_STAGES:
        m, p = stage_total(measured, stage), stage_total(predicted, stage)
        if m > 0 and p > 0:
            factors[stage] = old.get(stage, 1.0) * m / p
    return factors


def calibrated_name(name: str) -> str:
    return name + "+calibrated"


def calibrate(report: dict, plan: Plan, profile: HardwareProfile) -> Calibration:
    from specplan.simulator.run import simulate_as_run

    measured = report["measured"]
    target = ModelSpec.resolve(plan.target)
    draft = resolve_draft(plan.draft, target, "draft")
    def sim(p: HardwareProfile):  # the plan as it ran: measured acceptance and its spread, the same rows
        return simulate_as_run(plan, target, draft, p, measured)

    # stage multipliers against that simulation, not the plan's own prediction, which assumed an
    # acceptance the run may not have had (and so another number of rounds per stage)
    before = sim(profile)
    factors = stage_factors(measured.get("stage_s") or {}, before.stage_s, profile.calibration)
    prov = replace(profile.provenance, kind="calibrated",
                   notes=(profile.provenance.notes + f" | calibrated from a specrun report of plan {plan.schedule.policy} "
                          f"on {report.get('device', {}).get('name', '?')}").strip(" |"))
    new = replace(profile, calibration=factors, provenance=prov, name=calibrated_name(profile.name))
    return Calibration(new, factors, measured.get("acceptance_per_token"), float(measured["throughput_tok_s"]),
                       before.throughput_tok_s, sim(new).throughput_tok_s)
