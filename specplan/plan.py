"""Plan: everything `specrun` needs to execute, and what the planner predicted for it.

A plan is a frozen Schedule (policy and sizes) plus a Placement (where each tensor group
lives), the names of the models and hardware it was made for, the workload, and the
prediction. The simulator, the planner and the runtime all read the same objects.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import InputError, require
from .fileio import read_json, write_json

POLICIES = ("specoffload", "flexgen", "sequential", "spec-serial")
SPECULATIVE = ("specoffload", "spec-serial")
WEIGHT_HOMES = ("gpu", "cpu_pinned", "cpu_pageable", "disk")
ATTENTION_DEVICES = ("cpu", "gpu")
DRAFT_KV = ("gpu", "cpu", "recompute")
ADMISSIONS = ("waves", "continuous")
PLAN_FORMAT = 1


@dataclass(frozen=True)
class Schedule:
    policy: str = "specoffload"
    target_batch: int = 256  # rows per batch
    num_batches: int = 2  # specoffload alternates two; flexgen's micro-batches per block
    prefill_chunk: int = 80  # rows per prefill pass over the weights
    draft_batch: int = 10  # rows the draft processes at once
    gamma: int = 6  # tokens drafted per row per round
    attention_device: str = "cpu"  # target decode attention, and where its KV cache lives
    prefetch_depth: int = 1  # layers streamed ahead of the one computing (0 = no overlap)
    admission: str = "waves"  # "continuous": freed rows are refilled, prompts prefilled inside decode passes
    prefill_tokens: int = 512  # continuous: prompt tokens one pass may carry beside its decode rows

    def validate(self, source: str = "plan") -> "Schedule":
        require(self.policy in POLICIES, source, "schedule.policy", f"got {self.policy!r}", " | ".join(POLICIES))
        require(self.admission in ADMISSIONS, source, "schedule.admission", f"got {self.admission!r}",
                " | ".join(ADMISSIONS))
        for key in ("target_batch", "num_batches", "prefill_chunk", "draft_batch", "prefill_tokens"):
            v = getattr(self, key)
            require(isinstance(v, int) and v > 0, source, f"schedule.{key}", f"got {v!r}", "a positive integer")
        require(isinstance(self.gamma, int) and self.gamma >= 0, source, "schedule.gamma", f"got {self.gamma!r}", "an integer >= 0")
        require(self.speculative or self.gamma == 0, source, "schedule.gamma",
                f"{self.gamma} with non-speculative policy {self.policy}", "0")
        require(not self.speculative or self.gamma >= 1, source, "schedule.gamma", "0 with a speculative policy", ">= 1")
        require(self.attention_device in ATTENTION_DEVICES, source, "schedule.attention_device",
                f"got {self.attention_device!r}", " | ".join(ATTENTION_DEVICES))
        require(isinstance(self.prefetch_depth, int) and self.prefetch_depth >= 0, source, "schedule.prefetch_depth",
                f"got {self.prefetch_depth!r}", "an integer >= 0")
        require(self.policy != "specoffload" or self.num_batches == 2, source, "schedule.num_batches",
                f"{self.num_batches} with specoffload", "2 (two batches alternate)")
        require(self.policy != "sequential" or self.prefetch_depth == 0, source, "schedule.prefetch_depth",
                "sequential loads a layer only after the previous one computed", "0")
        return self

    @property
    def speculative(self) -> bool:
        return self.policy in SPECULATIVE

    @property
    def rows(self) -> int:
        """Rows in flight at once."""
        return self.target_batch * self.num_batches


EXPERT_STREAMS = ("layer", "routed")


@dataclass(frozen=True)
class Placement:
    attention: str = "cpu_pinned"  # target q/k/v/o weights of every layer
    ffn: str = "cpu_pinned"  # home of the experts / MLP of the layers not kept on the GPU
    ffn_gpu_layers: int = 0  # the first N layers keep their experts / MLP on the GPU
    embed: str = "cpu_pinned"  # token embedding: looked up on the CPU, rows copied over
    lm_head: str = "gpu"
    # "cpu": each draft micro-batch's KV is swapped in and out per round; "recompute": the draft
    # keeps no KV and re-reads each row's context every round (GPU compute instead of memory)
    draft_kv: str = "gpu"
    # a streamed MoE layer: "layer" copies every expert, prefetched while the layer before computes;
    # "routed" prefetches the rest and copies only the experts its router picked, once it has
    experts: str = "layer"

    def validate(self, source: str = "plan", layers: int | None = None) -> "Placement":
        for key in ("attention", "ffn"):
            v = getattr(self, key)
            require(v in WEIGHT_HOMES, source, f"placement.{key}", f"got {v!r}", " | ".join(WEIGHT_HOMES))
        for key in ("embed", "lm_head"):
            v = getattr(self, key)
            require(v in WEIGHT_HOMES[:3], source, f"placement.{key}", f"got {v!r}", " | ".join(WEIGHT_HOMES[:3]))
        require(self.draft_kv in DRAFT_KV, source, "placement.draft_kv", f"got {self.draft_kv!r}", " | ".join(DRAFT_KV))
        require(self.experts in EXPERT_STREAMS, source, "placement.experts", f"got {self.experts!r}",
                " | ".join(EXPERT_STREAMS))
        hi = layers if layers is not None else 10**6
        require(isinstance(self.ffn_gpu_layers, int) and 0 <= self.ffn_gpu_layers <= hi, source,
                "placement.ffn_gpu_layers", f"got {self.ffn_gpu_layers!r}", f"an integer in [0, {hi}]")
        return self

    def ffn_home(self, layer: int) -> str:
        return "gpu" if layer < self.ffn_gpu_layers else self.ffn


@dataclass(frozen=True)
class Plan:
    target: str  # preset name or path the model spec came from
    draft: str | None
    hardware: str
    schedule: Schedule
    placement: Placement
    workload: dict  # Workload.to_dict()
    prediction: dict = field(default_factory=dict)  # throughput, stage times, utilisation, memory
    inputs: dict = field(default_factory=dict)  # hashes of the model specs, profile and workload
    versions: dict = field(default_factory=dict)
    profile: dict = field(default_factory=dict)  # the full hardware profile it was made for
    weights: dict = field(default_factory=dict)  # tensor group -> format, where not the model's dtype (formats.py)
    format: int = PLAN_FORMAT

    def hardware_profile(self):
        """The profile the plan was made for: embedded (measured or composed profiles have no
        loadable name), else the shipped profile named by `hardware`."""
        from .hardware import HardwareProfile, load_profile

        if self.profile:
            return HardwareProfile.from_dict(self.profile, f"plan profile {self.hardware}")
        return load_profile(self.hardware)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: str) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def from_dict(cls, d: Any, source: str) -> "Plan":
        require(isinstance(d, dict), source, "top level", "is not an object", "a plan JSON object")
        require(d.get("format") == PLAN_FORMAT, source, "format", f"got {d.get('format')!r}", str(PLAN_FORMAT))
        for key in ("target", "hardware", "schedule", "placement", "workload"):
            require(key in d, source, key, "is missing", "see docs/planner.md for the plan format")
        try:
            schedule = Schedule(**d["schedule"]).validate(source)
            placement = Placement(**d["placement"]).validate(source)
        except TypeError as e:
            raise InputError(source, "schedule/placement", str(e), "the fields in docs/planner.md") from None
        from .formats import WeightFormats

        weights = WeightFormats.from_dict(d.get("weights"), source).to_dict()
        return cls(target=d["target"], draft=d.get("draft"), hardware=d["hardware"], schedule=schedule,
                   placement=placement, workload=d["workload"], prediction=d.get("prediction", {}),
                   inputs=d.get("inputs", {}), versions=d.get("versions", {}), profile=d.get("profile", {}),
                   weights=weights)

    def weight_formats(self):
        from .formats import WeightFormats

        return WeightFormats.from_dict(self.weights, "plan")

    @classmethod
    def load(cls, path: str) -> "Plan":
        return cls.from_dict(read_json(path), path)
