"""The step scheduler: the one place a schedule is written.

Token-centric, in the way vLLM's V1 scheduler is: there is no prefill phase and no decode
phase, only passes, and for every pass the scheduler says which rows compute how many new
tokens. A row (a slot of the KV caches) computes a chunk of its prompt, gamma + 1 verify
positions, or one decode token. The scheduler owns the queue of waiting prompts and the row
slots; it admits prompts into free slots, tells the draft which rows to propose for (and
whether that runs beside the target's pass or before it), moves rows between batches for
specoffload's tail, and takes back what each pass produced (tokens gained, finished rows).

    sched = StepScheduler(config, requests)
    while (p := sched.next_pass()) is not None:
        outcome = executor.run(p)      # the SimPy scenario costs it; the torch engine runs it
        sched.complete(p, outcome)

Both executors consume the same `Pass` records, so the simulator and the engine run the same
schedule by construction (tests/test_scheduler_agreement.py feeds both the same outcomes and
compares the pass sequences).

Slots are grouped into `groups` batches of `group_rows` slots (slot s is in group
s // group_rows). The four policies differ only in which group(s) a pass serves and where the
draft runs:

    specoffload  groups alternate; a pass verifies one group while the draft proposes for the
                 other beside it (on the GPU, during the PCIe-bound pass)
    spec-serial  one group per pass, round robin; the draft proposes for it first, then the
                 pass verifies it
    flexgen      every pass serves all groups, one after another at each streamed layer
    sequential   one group per pass, round robin, no prefetch

and the two admission modes only in when slots are refilled:

    waves        static batches: a wave of rows is admitted when every slot is free, its
                 prompts are prefilled in passes of `prefill_rows` whole prompts, then it is
                 decoded until its slowest row is done
    continuous   a freed slot is refilled at once; the new row's prompt is prefilled in chunks
                 inside the passes that decode the others, at most `prefill_tokens` prompt
                 tokens per pass, against the weights those passes stream anyway; until the
                 first row finishes (start-up) a pass may carry `prefill_rows` whole prompts
                 instead, so the slots fill as fast as a wave's prefill passes fill them

Token counts are floats so that the simulator's expected-value mode (every row gains E tokens
per verification) runs through the same code; the engine gains whole tokens.
"""

from __future__ import annotations

import operator
from collections import deque
from dataclasses import dataclass, field
from typing import NamedTuple

POLICIES = ("specoffload", "spec-serial", "flexgen", "sequential")
ADMISSIONS = ("continuous", "waves")
DRAFT_KV_HOMES = ("gpu", "cpu", "recompute")
_EPS = 1e-9


@dataclass(frozen=True)
class SchedulerConfig:
    policy: str
    groups: int  # batches of slots
    group_rows: int  # slots per batch
    gen_len: int  # most new tokens a row generates
    gamma: int = 0  # tokens the draft proposes per row per verification
    admission: str = "waves"
    prefill_rows: int = 64  # waves: whole prompts per prefill pass
    prefill_tokens: int = 2048  # continuous: prompt tokens a pass may carry
    max_row_tokens: int | None = None  # a slot's KV capacity: prompt + gen_len must fit
    draft_kv: str = "gpu"  # "recompute": the draft keeps no KV and re-reads each row's context
    merge_tails: bool = True  # specoffload: move the last rows of one batch into the other's free slots

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {self.policy!r}")
        if self.admission not in ADMISSIONS:
            raise ValueError(f"admission must be one of {ADMISSIONS}, got {self.admission!r}")
        if self.draft_kv not in DRAFT_KV_HOMES:
            raise ValueError(f"draft_kv must be one of {DRAFT_KV_HOMES}, got {self.draft_kv!r}")
        if min(self.groups, self.group_rows, self.gen_len, self.prefill_rows, self.prefill_tokens) < 1:
            raise ValueError("groups, group_rows, gen_len, prefill_rows and prefill_tokens must be positive")
        if self.policy == "specoffload" and self.groups != 2:
            raise ValueError("specoffload alternates two groups")
        if self.speculative != (self.gamma > 0):
            raise ValueError(f"gamma {self.gamma} with policy {self.policy}")

    @property
    def speculative(self) -> bool:
        return self.policy in ("specoffload", "spec-serial")

    @property
    def slots(self) -> int:
        return self.groups * self.group_rows

    @classmethod
    def from_schedule(cls, schedule, gen_len: int, prompts: int, draft_kv: str = "gpu",
                      max_row_tokens: int | None = None) -> "SchedulerConfig":
        """The scheduler a plan's Schedule (specplan.plan) describes, for a job of `prompts`
        prompts: fewer prompts than rows shrink each batch to its share of them."""
        group_rows = max(1, min(schedule.target_batch, -(-prompts // schedule.num_batches)))
        return cls(policy=schedule.policy, groups=schedule.num_batches, group_rows=group_rows,
                   gen_len=gen_len, gamma=schedule.gamma if schedule.speculative else 0,
                   admission=schedule.admission, prefill_rows=schedule.prefill_chunk,
                   prefill_tokens=schedule.prefill_tokens, max_row_tokens=max_row_tokens, draft_kv=draft_kv)


@dataclass(frozen=True)
class Request:
    id: int  # position in the input; outputs are returned by it
    prompt_len: int


class RowWork(NamedTuple):  # immutable, and cheap to make: a pass makes one per row
    """What one row computes in a pass: `tokens` new positions starting at position `start`."""

    slot: int
    kind: str  # "prefill" (a prompt chunk), "verify" (gamma + 1 positions) or "decode" (one token)
    start: int
    tokens: int
    last: bool = True  # prefill: this chunk completes the prompt (its logits give the first token)


_slot_of = operator.attrgetter("slot")


class Run(NamedTuple):
    """Consecutive slots that compute alike in a pass (Pass.runs): one batch through a layer."""

    kind: str
    slots: slice
    work: RowWork  # the first row's; a run's rows share kind, and a prompt chunk run its chunk


class DraftRow(NamedTuple):
    """The draft's work for one row: read positions [cached, context) it does not hold yet
    (a new row's prompt, or every round under draft_kv='recompute'), then, if `propose`,
    gamma steps from the row's last two tokens."""

    slot: int
    cached: int
    context: int  # the row's tokens less 2 (the round re-reads its last two)
    propose: bool = True


@dataclass(frozen=True)
class Pass:
    index: int
    groups: tuple[int, ...]  # the batches the target pass serves, in compute order
    rows: tuple[RowWork, ...]  # per group in `groups` order, slots ascending within a group
    draft_first: tuple[DraftRow, ...] = ()  # the draft runs before the target pass (it verifies these)
    draft_beside: tuple[DraftRow, ...] = ()  # the draft runs while the target pass streams
    admitted: tuple[tuple[int, int], ...] = ()  # (slot, request id) filled before this pass
    moves: tuple[tuple[int, int, float], ...] = ()  # (from slot, to slot, tokens held) before this pass

    prefill_tokens: int = 0  # prompt tokens the pass carries (set when the scheduler emits it)
    decode_rows: int = 0  # rows that verify or decode

    def of_kind(self, kind: str) -> tuple[RowWork, ...]:
        return tuple(w for w in self.rows if w.kind == kind)

    def runs(self) -> tuple[Run, ...]:
        """The pass's rows as both executors compute them: maximal runs of consecutive slots
        doing the same thing (prompt chunks only with the same start, length and last flag),
        in slot order. A run goes through a layer as one batch, so a flexgen pass, whose
        groups decode side by side, is one run of all their rows."""
        out: list[Run] = []
        first = None  # the open run's first row, and the slot after its last
        stop = 0
        for w in sorted(self.rows, key=_slot_of):
            if first is not None and w.slot == stop and w.kind == first.kind and (
                    w.kind != "prefill" or (first.start, first.tokens, first.last) == (w.start, w.tokens, w.last)):
                stop += 1
                continue
            if first is not None:
                out.append(Run(first.kind, slice(first.slot, stop), first))
            first, stop = w, w.slot + 1
        if first is not None:
            out.append(Run(first.kind, slice(first.slot, stop), first))
        return tuple(out)

    def signature(self) -> tuple:
        """What the agreement test compares: row sets and token counts, draft rows, admissions, moves."""
        return (self.groups, tuple((w.slot, w.kind, w.start, w.tokens, w.last) for w in self.rows),
                tuple(d.slot for d in self.draft_first), tuple(d.slot for d in self.draft_beside),
                self.admitted, tuple((a, b) for a, b, _ in self.moves))


@dataclass(frozen=True)
class Outcome:
    """What a pass produced: tokens each row gained (first token after its last prefill chunk,
    accepted prefix + 1 after a verification, 1 after a decode), capped at gen_len and at EOS,
    and the rows that stopped at EOS."""

    gained: dict[int, float]
    eos: frozenset[int] = frozenset()


@dataclass(slots=True)
class Row:
    request: Request
    computed: int = 0  # prompt tokens already in the target's KV cache
    generated: float = 0.0
    done: bool = False
    draft_ready: bool = False  # the draft's KV holds the row's positions [0, L - 2)
    proposed: bool = False  # a draft proposal waits to be verified
    rounds: int = 0  # verifications (or decode steps) the row took part in

    @property
    def prefilling(self) -> bool:
        return self.computed < self.request.prompt_len

    @property
    def length(self) -> float:
        """Tokens of the row so far: prompt and generated."""
        return self.request.prompt_len + self.generated


@dataclass
class Counts:
    passes: int = 0
    prefill_passes: int = 0  # passes that carried prompt tokens and nothing else
    mixed_passes: int = 0  # passes that carried prompt tokens beside decode / verify rows
    admitted: int = 0
    prefill_tokens: int = 0
    prefill_tokens_in_decode_passes: int = 0
    verify_row_rounds: int = 0
    moved_rows: int = 0
    draft_prefill_tokens: float = 0.0  # positions the draft read to catch up (new rows, recompute)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class StepScheduler:
    config: SchedulerConfig
    requests: list[Request]
    slots: list[Row | None] = field(init=False)
    finished: list[Row] = field(init=False, default_factory=list)
    counts: Counts = field(init=False, default_factory=Counts)

    def __post_init__(self) -> None:
        cap = self.config.max_row_tokens
        for r in self.requests:
            if r.prompt_len < 1:
                raise ValueError(f"request {r.id}: an empty prompt")
            if cap is not None and r.prompt_len + self.config.gen_len > cap:
                raise ValueError(f"request {r.id}: prompt {r.prompt_len} + gen_len {self.config.gen_len} tokens "
                                 f"exceed a row's KV capacity of {cap}")
        self.waiting: deque[Request] = deque(self.requests)
        self.slots = [None] * self.config.slots
        self._turn = 0  # the group the next pass starts looking from
        self._longest = max((r.prompt_len for r in self.requests), default=1)
        self._index = 0
        self._wave_prefilling = False  # waves: the current wave's prompts are not all in yet

    # ---- the loop's two calls -----------------------------------------------------------------------
    def next_pass(self) -> Pass | None:
        """The next pass, or None when every prompt has finished."""
        cfg = self.config
        admitted = self._admit_wave() if cfg.admission == "waves" else ()
        if admitted:
            self._wave_prefilling = True
        if self._wave_prefilling:  # waves: a wave's prompts first, in passes of their own
            if self._prefilling_slots():
                return self._emit(self._wave_prefill_pass(admitted))
            self._wave_prefilling = False
        plan = {"specoffload": self._specoffload, "spec-serial": self._spec_serial,
                "flexgen": self._flexgen, "sequential": self._sequential}[cfg.policy]
        p = plan(admitted)
        return self._emit(p) if p is not None else None

    def complete(self, p: Pass, outcome: Outcome) -> None:
        """Fold a pass's outcome back into the rows; finished rows free their slots."""
        cfg = self.config
        for d in p.draft_first + p.draft_beside:
            row = self.slots[d.slot]
            # a round leaves the draft's KV holding [0, L - 2) of the row, whatever it accepts
            row.draft_ready = cfg.draft_kv != "recompute"
            if d.propose:
                row.proposed = True
        slots, gained, eos, finished = self.slots, outcome.gained.get, outcome.eos, self.finished
        gen = float(cfg.gen_len)
        verified = 0
        for slot, kind, _, tokens, last in p.rows:  # the rows' hot loop: a pass may hold thousands
            row = slots[slot]
            if kind == "prefill":
                row.computed += tokens
                if not last:
                    continue
            else:
                row.rounds += 1
                row.proposed = False
                verified += kind == "verify"
            row.generated = min(gen, row.generated + gained(slot, 0.0))
            if row.generated >= gen - _EPS or slot in eos:
                row.done = True
                finished.append(row)
                slots[slot] = None
        self.counts.verify_row_rounds += verified

    # ---- policies: which groups a pass serves, where the draft runs ------------------------------------
    def _specoffload(self, admitted) -> Pass | None:
        moves = self._merge_tails()
        g = self._next_group(self._has_work)
        if g is None:
            return None
        other = 1 - g
        # rows of g without a proposal (the first pass of a wave, rows just moved, or a pass
        # the other batch had nothing for) get one first; in steady state there are none
        first = self._draft_rows(g)
        # the other batch's rows get their proposals beside this pass, ready for its next one
        beside = self._draft_rows(other)
        admitted += self._admit_continuous((g,))
        rows = self._rows_of((g,), "verify")
        self._turn = other
        return Pass(0, (g,), rows, first, beside + self._draft_reads(rows), admitted, moves)

    def _spec_serial(self, admitted) -> Pass | None:
        g = self._next_group(self._has_work)
        if g is None:
            return None
        admitted += self._admit_continuous((g,))
        self._turn = (g + 1) % self.config.groups
        rows = self._rows_of((g,), "verify")
        return Pass(0, (g,), rows, self._draft_rows(g), self._draft_reads(rows), admitted)

    def _flexgen(self, admitted) -> Pass | None:
        groups = tuple(range(self.config.groups))
        admitted += self._admit_continuous(groups)
        live = tuple(g for g in groups if self._has_work(g))
        if not live:
            return None
        return Pass(0, live, self._rows_of(live, "decode"), (), (), admitted)

    def _sequential(self, admitted) -> Pass | None:
        g = self._next_group(self._has_work)
        if g is None:
            return None
        admitted += self._admit_continuous((g,))
        self._turn = (g + 1) % self.config.groups
        return Pass(0, (g,), self._rows_of((g,), "decode"), (), (), admitted)

    # ---- the pieces they share ---------------------------------------------------------------------------
    def _group_slots(self, g: int) -> range:
        n = self.config.group_rows
        return range(g * n, (g + 1) * n)

    def _has_work(self, g: int) -> bool:
        return any(self.slots[s] is not None for s in self._group_slots(g)) or (
            self.config.admission == "continuous" and bool(self.waiting))

    def _next_group(self, wants) -> int | None:
        n = self.config.groups
        for k in range(n):
            g = (self._turn + k) % n
            if wants(g):
                return g
        return None

    def _draft_rows(self, g: int) -> tuple[DraftRow, ...]:
        """Proposals for the decoding rows of group g that have none."""
        out = []
        slots = self.slots
        read = 0
        for s in self._group_slots(g):
            row = slots[s]
            if row is not None and not row.proposed and not row.done:
                p = row.request.prompt_len
                if row.computed < p:  # still prefilling
                    continue
                context = int(p + row.generated) - 2
                cached = context if row.draft_ready else 0
                out.append(DraftRow(s, cached, context))
                read += max(0, context - cached)
        self.counts.draft_prefill_tokens += read
        return tuple(out)

    def _draft_reads(self, rows: tuple[RowWork, ...]) -> tuple[DraftRow, ...]:
        """The draft reads the prompts that complete in this pass, beside it, so that their
        first proposal need not (not when the draft keeps no KV)."""
        if not self.config.speculative or self.config.draft_kv == "recompute":
            return ()
        out = tuple(DraftRow(w.slot, 0, w.start + w.tokens - 1, propose=False)
                    for w in rows if w.kind == "prefill" and w.last)
        self.counts.draft_prefill_tokens += sum(d.context for d in out)
        return out

    def _rows_of(self, groups, decode_kind: str) -> tuple[RowWork, ...]:
        """Every decoding row of `groups` (verify or decode), then prompt chunks for the
        prefilling rows within the pass's prefill token budget (continuous admission)."""
        work: list[RowWork] = []
        add = work.append
        budget = self._budget()
        q = self.config.gamma + 1 if decode_kind == "verify" else 1
        slots = self.slots
        for g in groups:
            for s in self._group_slots(g):
                row = slots[s]
                if row is None or row.done:
                    continue
                p = row.request.prompt_len
                if row.computed >= p:
                    add(RowWork(s, decode_kind, int(p + row.generated) - 1, q))
                elif budget > 0:
                    n = min(p - row.computed, budget)
                    budget -= n
                    add(RowWork(s, "prefill", row.computed, n, row.computed + n == p))
        return tuple(work)

    def _budget(self) -> int:
        """Prompt tokens this pass may carry: `prefill_tokens`, or at start-up (no row has
        finished yet) as many as `prefill_rows` prompts, if that is more."""
        cfg = self.config
        return cfg.prefill_tokens if self.finished else max(cfg.prefill_tokens, cfg.prefill_rows * self._longest)

    def _free_slots(self, groups) -> list[int]:
        return [s for g in groups for s in self._group_slots(g) if self.slots[s] is None]

    def _admit(self, slot: int) -> tuple[int, int]:
        req = self.waiting.popleft()
        self.slots[slot] = Row(req)
        self.counts.admitted += 1
        return (slot, req.id)

    def _admit_continuous(self, groups) -> tuple[tuple[int, int], ...]:
        """Refill the free slots of `groups` with as many prompts as this pass can start prefilling."""
        if self.config.admission != "continuous":
            return ()
        budget = self._budget() - sum(
            r.request.prompt_len - r.computed for g in groups for s in self._group_slots(g)
            if (r := self.slots[s]) is not None and r.prefilling)
        out = []
        for s in self._free_slots(groups):
            if not self.waiting or budget <= 0:
                break
            budget -= self.waiting[0].prompt_len
            out.append(self._admit(s))
        return tuple(out)

    def _admit_wave(self) -> tuple[tuple[int, int], ...]:
        """Waves: when every slot is free, the next wave fills them, split evenly over the groups."""
        if not self.waiting or any(r is not None for r in self.slots):
            return ()
        cfg = self.config
        n = min(len(self.waiting), cfg.slots)
        per = -(-n // cfg.groups)
        out = []
        for g in range(cfg.groups):
            for s in list(self._group_slots(g))[:min(per, n - len(out))]:
                out.append(self._admit(s))
        self._turn = 0
        return tuple(out)

    def _prefilling_slots(self) -> list[int]:
        return [s for s, r in enumerate(self.slots) if r is not None and r.prefilling]

    def _wave_prefill_pass(self, admitted) -> Pass:
        """Waves: the next `prefill_rows` whole prompts, alone in one pass. The resident draft
        reads the same prompts beside it."""
        slots = self._prefilling_slots()[:self.config.prefill_rows]
        rows = tuple(RowWork(s, "prefill", 0, self.slots[s].request.prompt_len) for s in slots)
        groups = tuple(sorted({s // self.config.group_rows for s in slots}))
        return Pass(0, groups, rows, (), self._draft_reads(rows), admitted)

    def _merge_tails(self) -> tuple[tuple[int, int, float], ...]:
        """specoffload's tail: once no prompt waits and the live rows of the group the turn is
        not on fit in the free slots of the one it is on, they move there, so one pass verifies
        all that is left instead of two (their proposals are dropped: the draft proposes again)."""
        cfg = self.config
        if not cfg.merge_tails or (cfg.admission == "continuous" and self.waiting):
            return ()
        g, other = self._turn, 1 - self._turn
        live_o = [s for s in self._group_slots(other) if self.slots[s] is not None]
        live_g = [s for s in self._group_slots(g) if self.slots[s] is not None]
        free_g = self._free_slots((g,))
        if not live_o or not live_g or len(live_o) > len(free_g):
            return ()
        if any(self.slots[s].prefilling for s in live_o):
            return ()
        moves = []
        for src, dst in zip(live_o, free_g):
            row = self.slots[src]
            row.proposed = False
            moves.append((src, dst, row.length))
            self.slots[dst], self.slots[src] = row, None
        self.counts.moved_rows += len(moves)
        return tuple(moves)

    def _emit(self, p: Pass) -> Pass:
        pre = sum(w.tokens for w in p.rows if w.kind == "prefill")
        p = Pass(self._index, p.groups, p.rows, p.draft_first, p.draft_beside, p.admitted, p.moves, pre,
                 sum(1 for w in p.rows if w.kind != "prefill"))
        assert p.rows, "a pass computes at least one row"
        self._index += 1
        c = self.counts
        c.passes += 1
        c.prefill_tokens += pre
        if pre and p.decode_rows:
            c.mixed_passes += 1
            c.prefill_tokens_in_decode_passes += pre
        elif pre:
            c.prefill_passes += 1
        return p
