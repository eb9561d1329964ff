"""HardwareProfile: what a machine can do, measured or taken from datasheets.

A profile has three parts that compose: the GPU, the host link (PCIe) and the host
(CPU, memory). Shipped profiles live in ``hwprofiles/shipped/*.json``; standard links
and hosts in ``hwprofiles/parts.json``. ``load_profile("rtx4090", pcie=3,
host_memory_bytes=256e9)`` is "an RTX 4090 on PCIe 3.0 with 256 GB host memory".
Measured kernel tables, when present, take precedence over roofline estimates.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import InputError, UnknownNameError
from .fileio import read_json, write_json
from .tables import KernelTable

SCHEMA_VERSION = 1


# What a machine's numbers can physically be, by the field's unit (a profile outside these was
# mistyped or measured wrong, and would send the solver and simulator to absurd answers):
# bandwidths 1 MB/s - 100 TB/s, memories 1 MB (toy test machines) - 1 PB, FLOP/s 100 MFLOP/s - 1 EFLOP/s,
# latencies and launch costs under a second
PLAUSIBLE = {"bytes_per_s": (1e6, 1e14, "1e6 - 1e14 B/s"), "memory_bytes": (1e6, 1e15, "1e6 - 1e15 bytes"),
             "flops_per_s": (1e8, 1e18, "1e8 - 1e18 FLOP/s"), "_s": (0.0, 1.0, "0 - 1 s")}


def _plausible(v: float, key: str, where: str, source: str) -> None:
    for unit, (lo, hi, text) in PLAUSIBLE.items():
        if key.endswith(unit) or where.endswith(unit):
            if not lo <= v <= hi:
                raise InputError(source, f"{where}.{key}", f"got {v:g}, not physically plausible", text)
            return


def check_memory_size(n: float, source: str, field: str, unit_given: bool = True) -> float:
    """A memory size given by a person (--host-mem, --gpu-mem, a grid's host_mem): positive and
    physically plausible (PLAUSIBLE), or refused with the field named. A bare number is bytes,
    so '256' meant as gigabytes is caught here."""
    from .units import fmt_bytes

    lo, hi, _ = PLAUSIBLE["memory_bytes"]
    if not math.isfinite(n) or n <= 0:
        raise InputError(source, field, f"got {n:.4g} B", "a positive size, e.g. 256GB")
    if n < lo:
        raise InputError(source, field, f"{n:.4g} B is less than any machine has"
                         + ("" if unit_given else " (a bare number is bytes)"),
                         f"at least {fmt_bytes(lo)}, with a unit, e.g. 256GB")
    if n > hi:
        raise InputError(source, field, f"{n:.4g} B is more than any machine has", f"at most {hi:g} B (1 PB)")
    return n


def memory_size(text: str | float, source: str, field: str) -> int:
    """A size (units.size_bytes) that check_memory_size accepts, in whole bytes."""
    from .units import size_bytes

    n, unit_given = size_bytes(text, source, field)
    check_memory_size(n, source, field, unit_given)
    return int(round(n))


def _num(d: dict, key: str, source: str, where: str, *, positive: bool = True, default: Any = ...) -> float:
    if key not in d:
        if default is not ...:
            return default
        raise InputError(source, f"{where}.{key}", "is missing", "a number")
    v = d[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise InputError(source, f"{where}.{key}", f"got {v!r}", "a number")
    if not math.isfinite(v):
        raise InputError(source, f"{where}.{key}", f"got {v}", "a finite number")
    if v < 0 or (positive and v == 0):
        raise InputError(source, f"{where}.{key}", f"got {v}", "a positive number" if positive else "a number >= 0")
    _plausible(float(v), key, where, source)
    return float(v)


def _lanes(d: dict, source: str, where: str) -> int:
    v = d.get("lanes", 1)
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 1024:
        raise InputError(source, f"{where}.lanes", f"got {v!r}", "an integer in 1 - 1024")
    return v


def _bool(d: dict, key: str, source: str, where: str, default: bool = False) -> bool:
    v = d.get(key, default)
    if not isinstance(v, bool):
        raise InputError(source, f"{where}.{key}", f"got {v!r}", "true or false")
    return v


def _obj(d: dict, key: str, source: str, where: str) -> dict:
    v = d.get(key)
    if not isinstance(v, dict):
        raise InputError(source, f"{where}.{key}".lstrip("."), "is missing or not an object", "a JSON object")
    return v


@dataclass(frozen=True)
class Provenance:
    kind: str  # "measured" or "datasheet"
    sources: tuple[str, ...] = ()
    notes: str = ""
    date: str = ""
    tool_version: str = ""
    torch_version: str | None = None
    cuda_version: str | None = None
    driver_version: str | None = None
    device_name: str | None = None
    cpu_model: str | None = None
    profiled_ranges: dict = field(default_factory=dict)
    machine_load: dict = field(default_factory=dict)  # other processes' use of the cores while measuring (specplan.host)

    @classmethod
    def from_dict(cls, d: dict, source: str) -> "Provenance":
        kind = d.get("kind")
        if kind not in ("measured", "datasheet", "calibrated"):
            raise InputError(source, "provenance.kind", f"got {kind!r}", "'measured', 'datasheet' or 'calibrated'")
        known = {f for f in cls.__dataclass_fields__}
        kw = {k: v for k, v in d.items() if k in known}
        kw["sources"] = tuple(d.get("sources", ()))
        return cls(**kw)


@dataclass(frozen=True)
class GpuSpec:
    name: str
    memory_bytes: float
    peak_flops_per_s: dict  # dtype -> dense tensor-core FLOP/s
    memory_bandwidth_bytes_per_s: float
    matmul_efficiency: float  # fraction of peak a large GEMM reaches (roofline fallback only)
    bandwidth_efficiency: float  # fraction of memory bandwidth a streaming kernel reaches
    kernel_launch_s: float  # fixed cost per kernel, dominates tiny decode steps
    reserved_bytes: float  # CUDA context, allocator slack: memory a plan may not use
    # The host thread's time to issue the runtime's work, apart from the work itself (measured
    # by the profiler on the runtime's own code at shapes too small to compute anything):
    host_layer_s: float = 0.0  # one layer (norms, projections, RoPE, KV write, attention, MLP) for one row group
    host_expert_s: float = 0.0  # each expert an MoE layer runs (gather, SwiGLU, scatter)
    host_pass_s: float = 0.0  # a pass's fixed part: embedding, positions, LM head, choosing the tokens
    # The device is the host's own cores (a CPU profiled as the device): its "GPU" and "CPU"
    # work, and the host thread's issuing, share one pool of cores and cannot overlap.
    shares_host_cores: bool = False
    lanes: int = 1  # with shares_host_cores: threads of work the cores run at once (cores / torch threads)
    # the speed each lane keeps while another is busy too (measured on a target layer beside the draft)
    lane_factor: float = 1.0

    @classmethod
    def from_dict(cls, d: dict, source: str) -> "GpuSpec":
        w = "gpu"
        flops = _obj(d, "peak_flops_per_s", source, w)
        for k in flops:
            _num(flops, k, source, f"{w}.peak_flops_per_s")
        memory, reserved = _num(d, "memory_bytes", source, w), _num(d, "reserved_bytes", source, w, positive=False)
        if reserved >= memory:
            raise InputError(source, "gpu.reserved_bytes", f"{reserved:g} is not below memory_bytes {memory:g}",
                             "the share of the card a plan may not use")
        return cls(
            name=str(d.get("name", "")),
            memory_bytes=memory,
            peak_flops_per_s=dict(flops),
            memory_bandwidth_bytes_per_s=_num(d, "memory_bandwidth_bytes_per_s", source, w),
            matmul_efficiency=_fraction(d, "matmul_efficiency", source, w),
            bandwidth_efficiency=_fraction(d, "bandwidth_efficiency", source, w),
            kernel_launch_s=_num(d, "kernel_launch_s", source, w, positive=False),
            reserved_bytes=reserved,
            host_layer_s=_num(d, "host_layer_s", source, w, positive=False, default=0.0),
            host_expert_s=_num(d, "host_expert_s", source, w, positive=False, default=0.0),
            host_pass_s=_num(d, "host_pass_s", source, w, positive=False, default=0.0),
            shares_host_cores=_bool(d, "shares_host_cores", source, w),
            lanes=_lanes(d, source, w),
            lane_factor=_fraction(d, "lane_factor", source, w) if "lane_factor" in d else 1.0,
        )

    def flops_per_s(self, dtype: str) -> float:
        key = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}.get(dtype, dtype)
        return self.peak_flops_per_s.get(key) or self.peak_flops_per_s["float32"]


@dataclass(frozen=True)
class CopyPath:
    """One copy direction and memory kind: time(bytes) = latency_s + bytes / bytes_per_s."""

    latency_s: float
    bytes_per_s: float
    fit_rel_error: float | None = None  # median relative error of the fit, when measured

    @classmethod
    def from_dict(cls, d: dict, source: str, where: str) -> "CopyPath":
        if not isinstance(d, dict):
            raise InputError(source, where, "is not an object", "{latency_s, bytes_per_s}")
        err = d.get("fit_rel_error")
        return cls(_num(d, "latency_s", source, where, positive=False), _num(d, "bytes_per_s", source, where),
                   None if err is None else float(err))


@dataclass(frozen=True)
class LinkSpec:
    name: str
    h2d_pinned: CopyPath
    h2d_pageable: CopyPath
    d2h_pinned: CopyPath
    d2h_pageable: CopyPath
    duplex_factor: float  # each direction's bandwidth is multiplied by this when both run at once
    disk_read_bytes_per_s: float  # NVMe -> host, for tensors placed on disk

    @classmethod
    def from_dict(cls, d: dict, source: str) -> "LinkSpec":
        paths = {k: CopyPath.from_dict(d.get(k), source, f"link.{k}")
                 for k in ("h2d_pinned", "h2d_pageable", "d2h_pinned", "d2h_pageable")}
        return cls(name=str(d.get("name", "")), **paths,
                   duplex_factor=_fraction(d, "duplex_factor", source, "link"),
                   disk_read_bytes_per_s=_num(d, "disk_read_bytes_per_s", source, "link"))

    def path(self, direction: str, pinned: bool) -> CopyPath:
        return getattr(self, f"{direction}_{'pinned' if pinned else 'pageable'}")


@dataclass(frozen=True)
class HostSpec:
    name: str
    memory_bytes: float
    cores: int
    matmul_flops_per_s: dict  # dtype -> FLOP/s of a large GEMM on all cores
    memory_bandwidth_bytes_per_s: float
    attention_efficiency: float  # fraction of memory bandwidth CPU decode attention reaches
    pinned_fraction: float  # share of memory_bytes that may be page-locked

    @classmethod
    def from_dict(cls, d: dict, source: str) -> "HostSpec":
        w = "host"
        flops = _obj(d, "matmul_flops_per_s", source, w)
        for k in flops:
            _num(flops, k, source, f"{w}.matmul_flops_per_s")
        return cls(
            name=str(d.get("name", "")),
            memory_bytes=_num(d, "memory_bytes", source, w),
            cores=int(_num(d, "cores", source, w)),
            matmul_flops_per_s=dict(flops),
            memory_bandwidth_bytes_per_s=_num(d, "memory_bandwidth_bytes_per_s", source, w),
            attention_efficiency=_fraction(d, "attention_efficiency", source, w),
            pinned_fraction=_fraction(d, "pinned_fraction", source, w),
        )

    def flops_per_s(self, dtype: str) -> float:
        key = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}.get(dtype, dtype)
        return self.matmul_flops_per_s.get(key) or self.matmul_flops_per_s["float32"]


def _calibration(d: Any, source: str) -> dict:
    if not isinstance(d, dict):
        raise InputError(source, "calibration", "is not an object", "stage name -> positive multiplier")
    return {k: _num(d, k, source, "calibration") for k in d}


def _fraction(d: dict, key: str, source: str, where: str) -> float:
    v = _num(d, key, source, where)
    if v > 1:
        raise InputError(source, f"{where}.{key}", f"got {v}", "a fraction in (0, 1]")
    return v


@dataclass(frozen=True)
class HardwareProfile:
    name: str
    provenance: Provenance
    gpu: GpuSpec
    link: LinkSpec
    host: HostSpec
    kernels: dict = field(default_factory=dict)  # op name -> KernelTable
    calibration: dict = field(default_factory=dict)  # stage -> time multiplier from `specplan calibrate`
    schema_version: int = SCHEMA_VERSION

    @classmethod
    def from_dict(cls, d: Any, source: str) -> "HardwareProfile":
        if not isinstance(d, dict):
            raise InputError(source, "top level", "is not a JSON object", "a hardware profile object")
        version = d.get("schema_version")
        if version != SCHEMA_VERSION:
            raise InputError(source, "schema_version", f"got {version!r}", f"{SCHEMA_VERSION} (this specplan reads version {SCHEMA_VERSION})")
        kernels = d.get("kernels", {})
        if not isinstance(kernels, dict):
            raise InputError(source, "kernels", "is not an object", "op name -> table")
        return cls(
            name=str(d.get("name") or Path(source).stem),
            provenance=Provenance.from_dict(_obj(d, "provenance", source, ""), source),
            gpu=GpuSpec.from_dict(_obj(d, "gpu", source, ""), source),
            link=LinkSpec.from_dict(_obj(d, "link", source, ""), source),
            host=HostSpec.from_dict(_obj(d, "host", source, ""), source),
            kernels={op: KernelTable.from_dict(op, t, source) for op, t in kernels.items()},
            calibration=_calibration(d.get("calibration", {}), source),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "name": self.name,
            "provenance": {**asdict(self.provenance), "sources": list(self.provenance.sources)},
            "gpu": asdict(self.gpu),
            "link": asdict(self.link),
            "host": asdict(self.host),
            "kernels": {op: t.to_dict() for op, t in self.kernels.items()},
            "calibration": dict(self.calibration),
        }

    def save(self, path: str | Path) -> Path:
        return write_json(path, self.to_dict())

    def kernel(self, op: str) -> KernelTable | None:
        return self.kernels.get(op)

    def compose(self, *, pcie: str | int | None = None, host: str | None = None,
                host_memory_bytes: float | None = None, host_cores: int | None = None,
                gpu_memory_bytes: float | None = None) -> "HardwareProfile":
        """Swap or adjust parts: another PCIe generation, host preset, host memory, or a GPU memory cap."""
        p = self
        notes = []
        if pcie is not None:
            link = standard_link(pcie)
            p = replace(p, link=link)
            notes.append(link.name)
        if host is not None:
            p = replace(p, host=standard_host(host))
            notes.append(f"host-{host}")
        if host_memory_bytes is not None:
            check_memory_size(host_memory_bytes, "argument", "--host-mem")
            p = replace(p, host=replace(p.host, memory_bytes=float(host_memory_bytes)))
            notes.append(f"host-mem-{host_memory_bytes / 1e9:g}GB")
        if host_cores is not None:
            if host_cores <= 0:
                raise InputError("argument", "--host-cores", f"got {host_cores}", "a positive integer")
            scale = host_cores / p.host.cores
            flops = {k: v * scale for k, v in p.host.matmul_flops_per_s.items()}
            p = replace(p, host=replace(p.host, cores=host_cores, matmul_flops_per_s=flops))
            notes.append(f"host-cores-{host_cores}")
        if gpu_memory_bytes is not None:
            check_memory_size(gpu_memory_bytes, "argument", "--gpu-mem")
            if gpu_memory_bytes > p.gpu.memory_bytes:
                from .units import fmt_bytes

                raise InputError("argument", "--gpu-mem", f"{fmt_bytes(gpu_memory_bytes)} is more than {p.name}'s "
                                 f"{fmt_bytes(p.gpu.memory_bytes)}; it can only cap the card's memory",
                                 f"at most {fmt_bytes(p.gpu.memory_bytes)}")
            if gpu_memory_bytes <= p.gpu.reserved_bytes:
                from .units import fmt_bytes

                raise InputError("argument", "--gpu-mem", f"{fmt_bytes(gpu_memory_bytes)} leaves nothing beside the "
                                 f"{fmt_bytes(p.gpu.reserved_bytes)} {p.name} reserves (CUDA context, allocator)",
                                 f"more than {fmt_bytes(p.gpu.reserved_bytes)}")
            p = replace(p, gpu=replace(p.gpu, memory_bytes=float(gpu_memory_bytes)))
            notes.append(f"gpu-mem-{gpu_memory_bytes / 1e9:g}GB")
        if notes:
            prov = replace(p.provenance, notes=(p.provenance.notes + " | composed: " + ", ".join(notes)).strip(" |"))
            p = replace(p, provenance=prov, name="+".join([p.name, *notes]))
        return p


# ---- shipped profiles and parts -----------------------------------------------------------

def _shipped_dir():
    return resources.files("specplan.hwprofiles").joinpath("shipped")


def shipped_names() -> list[str]:
    return sorted(p.name[:-5] for p in _shipped_dir().iterdir() if p.name.endswith(".json"))


def _parts() -> dict:
    return json.loads(resources.files("specplan.hwprofiles").joinpath("parts.json").read_text())


def standard_link(pcie: str | int) -> LinkSpec:
    links = _parts()["links"]
    key = str(pcie).lower()
    key = {"3": "pcie3x16", "4": "pcie4x16", "5": "pcie5x16"}.get(key, key)
    if key not in links:
        raise UnknownNameError("PCIe link", str(pcie), list(links) + ["3", "4", "5"])
    return LinkSpec.from_dict({"name": key, **links[key]}, "hwprofiles/parts.json")


def standard_host(name: str) -> HostSpec:
    hosts = _parts()["hosts"]
    if name not in hosts:
        raise UnknownNameError("host", name, hosts)
    return HostSpec.from_dict({"name": name, **hosts[name]}, "hwprofiles/parts.json")


def profile_file(name_or_path: str | Path) -> Path | None:
    """The user's file a profile name reads: the path itself, or for a name that is not shipped,
    hwprofiles/measured/NAME.json where `specplan profile` writes by default (None for a
    shipped name, or a name no file holds)."""
    path = Path(name_or_path)
    if path.suffix == ".json" or path.exists():
        return path
    measured = Path("hwprofiles") / "measured" / f"{name_or_path}.json"
    return measured if str(name_or_path).lower() not in shipped_names() and measured.exists() else None


def profile_path(name_or_path: str | Path | None) -> Path | None:
    """The file a profile name reads, a shipped profile's included (an output may not be it)."""
    if not name_or_path:
        return None
    path = profile_file(name_or_path)
    key = str(name_or_path).lower()
    if path is None and key in shipped_names():
        path = Path(str(_shipped_dir().joinpath(f"{key}.json")))
    return path


def load_profile(name_or_path: str | Path, **compose_kw: Any) -> HardwareProfile:
    """A shipped profile name or a JSON file path, optionally composed with other parts."""
    path = profile_file(name_or_path)
    if path is not None:
        prof = HardwareProfile.from_dict(read_json(path), str(path))
    else:
        key = str(name_or_path).lower()
        names = shipped_names()
        if key not in names:
            raise UnknownNameError("GPU profile", str(name_or_path), names)
        text = _shipped_dir().joinpath(f"{key}.json").read_text()
        prof = HardwareProfile.from_dict(json.loads(text), f"hwprofiles/shipped/{key}.json")
    kw = {k: v for k, v in compose_kw.items() if v is not None}
    return prof.compose(**kw) if kw else prof
