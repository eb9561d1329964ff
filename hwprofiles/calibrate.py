"""Fold what `specrun` measured back into a hardware profile.

For each stage both sides know (copies, projections, attention, FFN, LM head, draft), the
profile gets a time multiplier measured / predicted (`calibration` in the profile; the cost
model applies it, see specplan.cost.stage_factor). The measured acceptance replaces the
workload's. The same plan is then simulated again, so the drop in prediction error shows
how much of it the calibrated stages explained.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from specplan.cost import error_pct
from specplan.hardware import HardwareProfile
from specplan.models import ModelSpec
from specplan.plan import Plan
from specplan.workload import Workload

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


def _stage_total(stage_s: dict, stage: str) -> float:
    return float(stage_s.get(stage) or 0.0) + float(stage_s.get(f"prefill.{stage}") or 0.0)


def stage_factors(measured: dict, predicted: dict, old: dict) -> dict:
    factors = dict(old)
    for stage in CALIBRATED_STAGES:
        m, p = _stage_total(measured, stage), _stage_total(predicted, stage)
        if m > 0 and p > 0:
            factors[stage] = old.get(stage, 1.0) * m / p
    return factors


def calibrate(report: dict, plan: Plan, profile: HardwareProfile) -> Calibration:
    from specplan.simulator.run import SimConfig, simulate

    measured = report["measured"]
    factors = stage_factors(measured.get("stage_s") or {}, plan.prediction.get("stage_s") or {}, profile.calibration)
    prov = replace(profile.provenance, kind="calibrated",
                   notes=(profile.provenance.notes + f" | calibrated from a specrun report of plan {plan.schedule.policy} "
                          f"on {report.get('device', {}).get('name', '?')}").strip(" |"))
    new = replace(profile, calibration=factors, provenance=prov, name=profile.name + "+calibrated")

    target = ModelSpec.resolve(plan.target)
    draft = ModelSpec.resolve(plan.draft) if plan.draft else None
    workload = Workload.from_dict(plan.workload, "plan workload")
    acc = measured.get("acceptance_per_token")  # the simulator's per-token alpha
    if acc is not None and plan.schedule.speculative:
        workload = replace(workload, acceptance=float(acc))
    # the same rows as the measured run
    workload = replace(workload, num_prompts=int(measured.get("rows") or workload.num_prompts))

    def sim(p: HardwareProfile) -> float:
        cfg = SimConfig(target, draft, p, workload, plan.schedule, plan.placement, check_memory=False)
        return simulate(cfg).throughput_tok_s

    return Calibration(new, factors, acc, float(measured["throughput_tok_s"]), sim(profile), sim(new))
