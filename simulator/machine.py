"""The simulated machine: SimPy resources for GPU compute, the two PCIe directions and the
CPU, memory containers for GPU and pinned host memory, and the bookkeeping of who used what
and when (stage busy times, utilisation, an optional timeline of spans)."""

from __future__ import annotations

from collections import defaultdict, deque
from dataclasses import dataclass

import simpy

from specplan.errors import InfeasibleError
from specplan.hardware import HardwareProfile

RESOURCES = ("gpu", "h2d", "d2h", "cpu", "disk")


@dataclass(frozen=True)
class Span:
    resource: str
    stage: str
    who: str
    start_s: float
    end_s: float


@dataclass(frozen=True)
class Chain:
    """Steps (resource, or None for a critical-path delay; stage; seconds) run back to back,
    summed once: their total, and the seconds they add to each stage and resource. A step
    whose resource is "async:NAME" starts a use of NAME at that point and does not wait for
    it (a copy the chain sets off): kept, with its offset into the chain, in `later`."""

    total_s: float
    stage_s: tuple[tuple[str, float], ...]
    busy_s: tuple[tuple[str, float], ...]
    later: tuple[tuple[float, str, str, float], ...] = ()  # (offset s, resource, stage, seconds)

    @classmethod
    def of(cls, steps: list[tuple[str | None, str, float]]) -> "Chain":
        stage: dict[str, float] = defaultdict(float)
        busy: dict[str, float] = defaultdict(float)
        later = []
        total = 0.0
        for resource, name, seconds in steps:
            if seconds <= 0:
                continue
            if resource is not None and resource.startswith("async:"):
                later.append((total, resource[len("async:"):], name, seconds))
                continue
            total += seconds
            stage[name] += seconds
            if resource is not None:
                busy[resource] += seconds
        return cls(total, tuple(stage.items()), tuple(busy.items()), tuple(later))


class Unit:
    """A FIFO resource of `capacity` identical lanes (one, unless the device is a pool of host
    cores), lighter than simpy.Resource: taking a free lane costs no event (the holder goes on
    at once), and a release hands the lane to the longest waiter. The simulator makes tens of
    thousands of uses per run; this halves its events."""

    __slots__ = ("env", "capacity", "free", "waiters")

    def __init__(self, env: simpy.Environment, capacity: int = 1):
        self.env = env
        self.capacity = self.free = capacity
        self.waiters: deque[simpy.Event] = deque()

    @property
    def busy(self) -> bool:
        return self.free < self.capacity

    def acquire(self) -> simpy.Event | None:
        """None if a lane was free and is now the caller's; else an event to wait on."""
        if self.free:
            self.free -= 1
            return None
        ev = self.env.event()
        self.waiters.append(ev)
        return ev

    def release(self) -> None:
        if self.waiters:
            self.waiters.popleft().succeed()  # the lane passes on
        else:
            self.free += 1


class Machine:
    def __init__(self, env: simpy.Environment, profile: HardwareProfile, *, record_spans: bool = False):
        self.env = env
        self.profile = profile
        self.res = {name: Unit(env) for name in RESOURCES}
        if profile.gpu.shares_host_cores:
            # the "GPU" is the host's cores: its work and the CPU's take lanes of one pool (a
            # lane: the cores one thread of work uses; the target's and the draft's threads
            # run at once only when there are two)
            self.res["gpu"] = self.res["cpu"] = Unit(env, profile.gpu.lanes)
        gpu_cap = profile.gpu.memory_bytes - profile.gpu.reserved_bytes
        pinned_cap = profile.host.memory_bytes * profile.host.pinned_fraction
        self.gpu_mem = simpy.Container(env, capacity=gpu_cap, init=gpu_cap)
        self.pinned_mem = simpy.Container(env, capacity=pinned_cap, init=pinned_cap)
        self.peak_gpu_bytes = 0.0
        self.peak_pinned_bytes = 0.0
        self.stage_s: dict[str, float] = defaultdict(float)
        self.resource_busy_s: dict[str, float] = defaultdict(float)
        self.spans: list[Span] | None = [] if record_spans else None
        self.events = 0

    def use(self, resource: str, stage: str, seconds: float, who: str = ""):
        """Hold `resource` for `seconds` (after queueing for it). A generator: `yield from`."""
        if seconds <= 0:
            return
        unit = self.res[resource]
        wait = unit.acquire()
        if wait is not None:
            try:
                yield wait
            except BaseException:  # interrupted while queued: leave the queue (or pass the unit on)
                if wait in unit.waiters:
                    unit.waiters.remove(wait)
                elif wait.triggered:
                    unit.release()
                raise
        if unit.capacity > 1 and unit.free < unit.capacity - 1:
            seconds /= self.profile.gpu.lane_factor  # another lane of the pool is busy: they share the cores' memory
        if resource == "h2d" and self.res["d2h"].busy:
            seconds /= self.profile.link.duplex_factor  # both directions at once share the link
        elif resource == "d2h" and self.res["h2d"].busy:
            seconds /= self.profile.link.duplex_factor
        start = self.env.now
        try:
            yield self.env.timeout(seconds)
        finally:  # an interrupted holder still gives the unit back
            unit.release()
        self.account(resource, stage, seconds)
        if self.spans is not None:
            self.spans.append(Span(resource, stage, who, start, start + seconds))

    def chain(self, steps: "Chain", who: str = ""):
        """Run `steps` back to back as one timeout: what `use` and `delay` one after another
        cost when no other process can take their resources meanwhile (the caller's promise),
        with the same stage and busy times. A generator: `yield from`."""
        self.account_chain(steps)
        for offset, resource, stage, seconds in steps.later:
            self.env.process(self._use_after(offset, resource, stage, seconds, who))
        if steps.total_s > 0:
            yield self.env.timeout(steps.total_s)

    def account_chain(self, steps: "Chain") -> None:
        """The stage and busy times of `steps` run back to back (chain)."""
        for stage, seconds in steps.stage_s:
            self.stage_s[stage] += seconds
        for resource, seconds in steps.busy_s:
            self.resource_busy_s[resource] += seconds
        if steps.total_s > 0:
            self.events += 1

    def account(self, resource: str, stage: str, seconds: float) -> None:
        """The stage and busy time of one use of `resource` (use; Scenario._layers_alone works
        out uses nothing contended for rather than running them)."""
        self.events += 2
        self.stage_s[stage] += seconds
        self.resource_busy_s[resource] += seconds

    def alone(self) -> bool:
        """Nothing else is scheduled or waiting: no event is queued (env.peek), no resource is
        held or waited for, so what the caller does next cannot collide with anything."""
        return self.env.peek() == float("inf") and self.idle(*RESOURCES)

    def _use_after(self, offset: float, resource: str, stage: str, seconds: float, who: str):
        if offset > 0:
            yield self.env.timeout(offset)
        yield from self.use(resource, stage, seconds, who)

    def idle(self, *resources: str) -> bool:
        """No process holds or waits for any of `resources` now."""
        return all(not self.res[r].busy and not self.res[r].waiters for r in resources)

    def delay(self, stage: str, seconds: float, who: str = ""):
        """Spend `seconds` on the caller's critical path without queueing for a resource: used
        for small activation copies, which the runtime slips between per-tensor weight copies.
        They count as stage time, not as link utilisation."""
        if seconds <= 0:
            return
        start = self.env.now
        yield self.env.timeout(seconds)
        self.events += 1
        self.stage_s[stage] += seconds
        if self.spans is not None:
            self.spans.append(Span("critical path", stage, who, start, start + seconds))

    # ---- memory ------------------------------------------------------------------------
    def allocate(self, where: str, nbytes: float, what: str) -> None:
        """Take memory now; a plan that needs more than the device has is infeasible."""
        box = self.gpu_mem if where == "gpu" else self.pinned_mem
        if nbytes <= 0:
            return
        if nbytes > box.level + 1e-6:
            used = box.capacity - box.level
            raise InfeasibleError(f"{where} memory: {what} needs {nbytes / 1e9:.2f} GB more with "
                                  f"{used / 1e9:.2f} GB in use, capacity {box.capacity / 1e9:.2f} GB")
        box.get(nbytes)  # completes at once: the level was checked above
        self._note_peak()

    def free(self, where: str, nbytes: float) -> None:
        if nbytes > 0:
            (self.gpu_mem if where == "gpu" else self.pinned_mem).put(nbytes)

    def _note_peak(self) -> None:
        self.peak_gpu_bytes = max(self.peak_gpu_bytes, self.gpu_mem.capacity - self.gpu_mem.level)
        self.peak_pinned_bytes = max(self.peak_pinned_bytes, self.pinned_mem.capacity - self.pinned_mem.level)

    def utilisation(self) -> dict[str, float]:
        total = self.env.now or 1.0
        return {r: self.resource_busy_s.get(r, 0.0) / total for r in RESOURCES}
