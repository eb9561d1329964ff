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

import functools
from collections import deque
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import numpy as np

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


# a pass's rows are columns (Pass.slot, .kind, ...): the scheduler and the simulator handle a
# pass of a thousand rows in a few array operations rather than a loop over them
KINDS = ("prefill", "verify", "decode")
PREFILL, VERIFY, DECODE = range(3)


class RowWork(NamedTuple):
    """What one row computes in a pass (a view of one of the pass's columns): `tokens` new
    positions starting at position `start`."""

    slot: int
    kind: str  # "prefill" (a prompt chunk), "verify" (gamma + 1 positions) or "decode" (one token)
    start: int
    tokens: int
    last: bool = True  # prefill: this chunk completes the prompt (its logits give the first token)


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


_INT = np.int64
_NO_INTS = np.zeros(0, _INT)


@dataclass(frozen=True, eq=False)
class DraftWork:
    """The draft's work for some rows of a pass, as columns (one entry per row, DraftRow's
    fields); iterating it gives DraftRows."""

    slot: np.ndarray = field(default_factory=lambda: _NO_INTS)
    cached: np.ndarray = field(default_factory=lambda: _NO_INTS)
    context: np.ndarray = field(default_factory=lambda: _NO_INTS)
    propose: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))

    def __len__(self) -> int:
        return len(self.slot)

    def __iter__(self):
        return (DraftRow(*row) for row in zip(self.slot.tolist(), self.cached.tolist(), self.context.tolist(),
                                               self.propose.tolist()))

    def __add__(self, other: "DraftWork") -> "DraftWork":
        if not len(other):
            return self
        if not len(self):
            return other
        return DraftWork(*(np.concatenate((a, b)) for a, b in zip(self.columns(), other.columns())))

    def columns(self) -> tuple[np.ndarray, ...]:
        return self.slot, self.cached, self.context, self.propose

    def take(self, which) -> "DraftWork":
        """The rows `which` (a mask or indices, or a slice) selects."""
        return DraftWork(*(c[which] for c in self.columns()))


NO_DRAFT = DraftWork()


@dataclass(frozen=True, eq=False)
class Pass:
    """One pass of the target over its layers: the rows it computes, as columns (row i is
    slot[i] computing tokens[i] positions of kind KINDS[kind[i]] from start[i]), per group
    in `groups` order and slots ascending within a group; the draft's work before it and
    beside it; the prompts admitted and the rows moved before it."""

    index: int
    groups: tuple[int, ...]  # the batches the target pass serves, in compute order
    slot: np.ndarray
    kind: np.ndarray  # PREFILL, VERIFY or DECODE
    start: np.ndarray
    tokens: np.ndarray
    last: np.ndarray  # prefill: the chunk completes the prompt (its logits give the first token)
    draft_first: DraftWork = NO_DRAFT  # the draft runs before the target pass (it verifies these)
    draft_beside: DraftWork = NO_DRAFT  # the draft runs while the target pass streams
    admitted: tuple[tuple[int, int], ...] = ()  # (slot, request id) filled before this pass
    moves: tuple[tuple[int, int, float], ...] = ()  # (from slot, to slot, tokens held) before this pass

    prefill_tokens: int = 0  # prompt tokens the pass carries (set when the scheduler emits it)
    decode_rows: int = 0  # rows that verify or decode

    @classmethod
    def of_rows(cls, index: int, groups: tuple[int, ...], rows, **kw) -> "Pass":
        """A pass from RowWork records (tests, and anyone who thinks in rows)."""
        rows = list(rows)
        return cls(index, groups, np.array([w.slot for w in rows], _INT),
                   np.array([KINDS.index(w.kind) for w in rows], np.int8),
                   np.array([w.start for w in rows], _INT), np.array([w.tokens for w in rows], _INT),
                   np.array([w.last for w in rows], bool), **kw)

    @functools.cached_property
    def rows(self) -> tuple[RowWork, ...]:
        """The rows as records, in the pass's order."""
        return tuple(RowWork(s, KINDS[k], b, n, la) for s, k, b, n, la in zip(
            self.slot.tolist(), self.kind.tolist(), self.start.tolist(), self.tokens.tolist(), self.last.tolist()))

    def of_kind(self, kind: str) -> tuple[RowWork, ...]:
        return tuple(w for w in self.rows if w.kind == kind)

    @functools.cached_property
    def _runs(self) -> tuple[Run, ...]:
        order = np.argsort(self.slot, kind="stable")
        s, k, b, n, la = (c[order] for c in (self.slot, self.kind, self.start, self.tokens, self.last))
        cut = np.ones(len(s), bool)
        # a run breaks where slots stop being consecutive or rows differ in kind, and, among
        # prompt chunks, in start, length or last flag
        cut[1:] = (s[1:] != s[:-1] + 1) | (k[1:] != k[:-1]) | (
            (k[1:] == PREFILL) & ((b[1:] != b[:-1]) | (n[1:] != n[:-1]) | (la[1:] != la[:-1])))
        firsts = np.flatnonzero(cut).tolist()
        s_, k_, b_, n_, la_ = s.tolist(), k.tolist(), b.tolist(), n.tolist(), la.tolist()
        return tuple(Run(KINDS[k_[i]], slice(s_[i], s_[j - 1] + 1), RowWork(s_[i], KINDS[k_[i]], b_[i], n_[i], la_[i]))
                     for i, j in zip(firsts, firsts[1:] + [len(s_)]))

    def runs(self) -> tuple[Run, ...]:
        """The pass's rows as both executors compute them: maximal runs of consecutive slots
        doing the same thing (prompt chunks only with the same start, length and last flag),
        in slot order. A run goes through a layer as one batch, so a flexgen pass, whose
        groups decode side by side, is one run of all their rows."""
        return self._runs

    def signature(self) -> tuple:
        """What the agreement test compares: row sets and token counts, draft rows, admissions, moves."""
        return (self.groups, tuple(tuple(w) for w in self.rows),
                tuple(d.slot for d in self.draft_first), tuple(d.slot for d in self.draft_beside),
                self.admitted, tuple((a, b) for a, b, _ in self.moves))


@dataclass(frozen=True)
class Outcome:
    """What a pass produced: tokens each row gained (first token after its last prefill chunk,
    accepted prefix + 1 after a verification, 1 after a decode), capped at gen_len and at EOS,
    and the rows that stopped at EOS. `gained`: by slot, or one entry per row of the pass."""

    gained: dict[int, float] | np.ndarray
    eos: frozenset[int] = frozenset()

    def per_row(self, p: Pass) -> np.ndarray:
        """Tokens gained by each row of `p`, in its order."""
        if isinstance(self.gained, np.ndarray):
            return self.gained
        got = self.gained.get
        return np.fromiter((got(s, 0.0) for s in p.slot.tolist()), float, len(p.slot))


@dataclass(slots=True)
class Row:
    """A row, as the scheduler held it (StepScheduler.row, and its `finished`)."""

    request: Request
    computed: int = 0  # prompt tokens already in the target's KV cache
    generated: float = 0.0
    done: bool = False
    draft_ready: bool = False  # the draft's KV holds the row's positions [0, L - 2)
    proposed: bool = False  # a draft proposal waits to be verified
    rounds: int = 0  # verifications (or decode steps) the row took part in


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
    """The rows live in per-slot columns: `live` (the slot holds a row), `prompt_len`,
    `computed` (prompt tokens in the target's KV), `generated`, `draft_ready` (the draft's KV
    holds positions [0, L - 2)), `proposed` (a proposal waits to be verified), `rounds`
    (verifications or decode steps taken) and `request` (the Request, or None)."""

    config: SchedulerConfig
    requests: list[Request]
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
        n = self.config.slots
        self.request: list[Request | None] = [None] * n
        self.live = np.zeros(n, bool)
        self.prompt_len = np.zeros(n, _INT)
        self.computed = np.zeros(n, _INT)
        self.generated = np.zeros(n, float)
        self.draft_ready = np.zeros(n, bool)
        self.proposed = np.zeros(n, bool)
        self.rounds = np.zeros(n, _INT)
        self._columns = (self.live, self.prompt_len, self.computed, self.generated, self.draft_ready, self.proposed,
                         self.rounds)
        self._ranges: dict[tuple[int, ...], np.ndarray] = {}
        self._turn = 0  # the group the next pass starts looking from
        self._longest = max((r.prompt_len for r in self.requests), default=1)
        self._index = 0
        self._wave_prefilling = False  # waves: the current wave's prompts are not all in yet

    def row(self, slot: int) -> Row | None:
        """Slot `slot`'s row as a record (a copy), or None if the slot is free."""
        if not self.live[slot]:
            return None
        return Row(self.request[slot], int(self.computed[slot]), float(self.generated[slot]), False,
                   bool(self.draft_ready[slot]), bool(self.proposed[slot]), int(self.rounds[slot]))

    @property
    def slots(self) -> list[Row | None]:
        """Every slot's row (copies; for tests and reports, not the hot path)."""
        return [self.row(s) for s in range(self.config.slots)]

    # ---- the loop's two calls -----------------------------------------------------------------------
    def next_pass(self) -> Pass | None:
        """The next pass, or None when every prompt has finished."""
        cfg = self.config
        admitted = self._admit_wave() if cfg.admission == "waves" else ()
        if admitted:
            self._wave_prefilling = True
        if self._wave_prefilling:  # waves: a wave's prompts first, in passes of their own
            if self._prefilling_slots().size:
                return self._emit(self._wave_prefill_pass(admitted))
            self._wave_prefilling = False
        plan = {"specoffload": self._specoffload, "spec-serial": self._spec_serial,
                "flexgen": self._flexgen, "sequential": self._sequential}[cfg.policy]
        p = plan(admitted)
        return self._emit(p) if p is not None else None

    def complete(self, p: Pass, outcome: Outcome) -> None:
        """Fold a pass's outcome back into the rows; finished rows free their slots."""
        cfg = self.config
        for d in (p.draft_first, p.draft_beside):
            if len(d):
                # a round leaves the draft's KV holding [0, L - 2) of the row, whatever it accepts
                self.draft_ready[d.slot] = cfg.draft_kv != "recompute"
                self.proposed[d.slot[d.propose]] = True
        gained = outcome.per_row(p)
        prefill = p.kind == PREFILL
        if prefill.any():
            self.computed[p.slot[prefill]] += p.tokens[prefill]
        stepped = p.slot[~prefill]  # rows that verified or decoded
        self.rounds[stepped] += 1
        self.proposed[stepped] = False
        self.counts.verify_row_rounds += int(np.count_nonzero(p.kind == VERIFY))
        gains = ~prefill | p.last  # rows that gained tokens (a prompt's last chunk gives its first)
        slots = p.slot[gains]
        gen = float(cfg.gen_len)
        now = np.minimum(gen, self.generated[slots] + gained[gains])
        self.generated[slots] = now
        done = now >= gen - _EPS
        if outcome.eos:
            done |= np.isin(slots, np.fromiter(outcome.eos, _INT, len(outcome.eos)))
        for s in slots[done].tolist():  # in the pass's order
            row = self.row(s)
            row.done = True
            self.finished.append(row)
            self._free(s)

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
        rows = self._rows_of((g,), VERIFY)
        self._turn = other
        return self._pass((g,), rows, first, beside + self._draft_reads(*rows), admitted, moves)

    def _spec_serial(self, admitted) -> Pass | None:
        g = self._next_group(self._has_work)
        if g is None:
            return None
        admitted += self._admit_continuous((g,))
        self._turn = (g + 1) % self.config.groups
        rows = self._rows_of((g,), VERIFY)
        return self._pass((g,), rows, self._draft_rows(g), self._draft_reads(*rows), admitted)

    def _flexgen(self, admitted) -> Pass | None:
        groups = tuple(range(self.config.groups))
        admitted += self._admit_continuous(groups)
        live = tuple(g for g in groups if self._has_work(g))
        if not live:
            return None
        return self._pass(live, self._rows_of(live, DECODE), NO_DRAFT, NO_DRAFT, admitted)

    def _sequential(self, admitted) -> Pass | None:
        g = self._next_group(self._has_work)
        if g is None:
            return None
        admitted += self._admit_continuous((g,))
        self._turn = (g + 1) % self.config.groups
        return self._pass((g,), self._rows_of((g,), DECODE), NO_DRAFT, NO_DRAFT, admitted)

    # ---- the pieces they share ---------------------------------------------------------------------------
    @staticmethod
    def _pass(groups, rows, first, beside, admitted, moves=()) -> Pass:
        return Pass(0, groups, *rows, first, beside, admitted, moves)

    def _slots_of(self, groups: tuple[int, ...]) -> np.ndarray:
        """The slots of `groups`, group by group, ascending within each."""
        got = self._ranges.get(groups)
        if got is None:
            n = self.config.group_rows
            got = self._ranges[groups] = np.concatenate([np.arange(g * n, (g + 1) * n) for g in groups])
        return got

    def _has_work(self, g: int) -> bool:
        n = self.config.group_rows
        return bool(self.live[g * n:(g + 1) * n].any()) or (self.config.admission == "continuous" and bool(self.waiting))

    def _next_group(self, wants) -> int | None:
        n = self.config.groups
        for k in range(n):
            g = (self._turn + k) % n
            if wants(g):
                return g
        return None

    def _draft_rows(self, g: int) -> DraftWork:
        """Proposals for the decoding rows of group g that have none."""
        idx = self._slots_of((g,))
        want = self.live[idx] & ~self.proposed[idx] & (self.computed[idx] >= self.prompt_len[idx])  # not prefilling
        if not want.any():
            return NO_DRAFT
        s = idx[want]
        context = (self.prompt_len[s] + self.generated[s]).astype(_INT) - 2
        cached = np.where(self.draft_ready[s], context, 0)
        self.counts.draft_prefill_tokens += int(np.maximum(context - cached, 0).sum())
        return DraftWork(s, cached, context, np.ones(len(s), bool))

    def _draft_reads(self, slot, kind, start, tokens, last) -> DraftWork:
        """The draft reads the prompts that complete in this pass, beside it, so that their
        first proposal need not (not when the draft keeps no KV)."""
        if not self.config.speculative or self.config.draft_kv == "recompute":
            return NO_DRAFT
        done = (kind == PREFILL) & last
        if not done.any():
            return NO_DRAFT
        context = start[done] + tokens[done] - 1
        self.counts.draft_prefill_tokens += int(context.sum())
        return DraftWork(slot[done], np.zeros(len(context), _INT), context, np.zeros(len(context), bool))

    def _rows_of(self, groups, decode_kind: int) -> tuple[np.ndarray, ...]:
        """Every decoding row of `groups` (verify or decode), then prompt chunks for the
        prefilling rows within the pass's prefill token budget (continuous admission), in
        slot order: the pass's columns (slot, kind, start, tokens, last)."""
        idx = self._slots_of(groups)
        live, plen, computed = self.live[idx], self.prompt_len[idx], self.computed[idx]
        decoding = live & (computed >= plen)
        prefilling = np.flatnonzero(live & (computed < plen))
        chunk = np.zeros(len(idx), _INT)
        if prefilling.size:
            # the budget goes to the prefilling rows in slot order, each its whole prompt's rest
            # while it lasts
            budget = self._budget()
            rest = plen[prefilling] - computed[prefilling]
            before = np.cumsum(rest) - rest
            fits = before < budget
            chunk[prefilling[fits]] = np.minimum(rest[fits], budget - before[fits])
        take = decoding | (chunk > 0)
        q = self.config.gamma + 1 if decode_kind == VERIFY else 1
        dec = decoding[take]
        s = idx[take]
        start = np.where(dec, (plen[take] + self.generated[s]).astype(_INT) - 1, computed[take])
        return (s, np.where(dec, decode_kind, PREFILL).astype(np.int8), start, np.where(dec, q, chunk[take]),
                dec | (computed[take] + chunk[take] == plen[take]))

    def _budget(self) -> int:
        """Prompt tokens this pass may carry: `prefill_tokens`, or at start-up (no row has
        finished yet) as many as `prefill_rows` prompts, if that is more."""
        cfg = self.config
        return cfg.prefill_tokens if self.finished else max(cfg.prefill_tokens, cfg.prefill_rows * self._longest)

    def _free_slots(self, groups) -> np.ndarray:
        idx = self._slots_of(groups)
        return idx[~self.live[idx]]

    def _admit(self, slot: int) -> tuple[int, int]:
        req = self.waiting.popleft()
        self.request[slot] = req
        self.live[slot] = True
        self.prompt_len[slot] = req.prompt_len
        self.computed[slot] = self.generated[slot] = self.rounds[slot] = 0
        self.draft_ready[slot] = self.proposed[slot] = False
        self.counts.admitted += 1
        return (slot, req.id)

    def _free(self, slot: int) -> None:
        self.request[slot] = None
        self.live[slot] = False

    def _admit_continuous(self, groups) -> tuple[tuple[int, int], ...]:
        """Refill the free slots of `groups` with as many prompts as this pass can start prefilling."""
        if self.config.admission != "continuous":
            return ()
        idx = self._slots_of(groups)
        prefilling = self.live[idx] & (self.computed[idx] < self.prompt_len[idx])
        budget = self._budget() - int((self.prompt_len[idx] - self.computed[idx])[prefilling].sum())
        out = []
        for s in self._free_slots(groups).tolist():
            if not self.waiting or budget <= 0:
                break
            budget -= self.waiting[0].prompt_len
            out.append(self._admit(s))
        return tuple(out)

    def _admit_wave(self) -> tuple[tuple[int, int], ...]:
        """Waves: when every slot is free, the next wave fills them, split evenly over the groups."""
        if not self.waiting or self.live.any():
            return ()
        cfg = self.config
        n = min(len(self.waiting), cfg.slots)
        per = -(-n // cfg.groups)
        out = []
        for g in range(cfg.groups):
            for s in self._slots_of((g,))[:min(per, n - len(out))].tolist():
                out.append(self._admit(s))
        self._turn = 0
        return tuple(out)

    def _prefilling_slots(self) -> np.ndarray:
        return np.flatnonzero(self.live & (self.computed < self.prompt_len))

    def _wave_prefill_pass(self, admitted) -> Pass:
        """Waves: the next `prefill_rows` whole prompts, alone in one pass. The resident draft
        reads the same prompts beside it."""
        s = self._prefilling_slots()[:self.config.prefill_rows]
        n = len(s)
        rows = (s, np.full(n, PREFILL, np.int8), np.zeros(n, _INT), self.prompt_len[s].copy(), np.ones(n, bool))
        groups = tuple(sorted(set((s // self.config.group_rows).tolist())))
        return self._pass(groups, rows, NO_DRAFT, self._draft_reads(*rows), admitted)

    def _merge_tails(self) -> tuple[tuple[int, int, float], ...]:
        """specoffload's tail: once no prompt waits and the live rows of the group the turn is
        not on fit in the free slots of the one it is on, they move there, so one pass verifies
        all that is left instead of two (their proposals are dropped: the draft proposes again)."""
        cfg = self.config
        if not cfg.merge_tails or (cfg.admission == "continuous" and self.waiting):
            return ()
        g, other = self._turn, 1 - self._turn
        live_o = self._slots_of((other,))[self.live[self._slots_of((other,))]]
        live_g = self._slots_of((g,))[self.live[self._slots_of((g,))]]
        free_g = self._free_slots((g,))
        if not len(live_o) or not len(live_g) or len(live_o) > len(free_g):
            return ()
        if (self.computed[live_o] < self.prompt_len[live_o]).any():
            return ()
        moves = []
        for src, dst in zip(live_o.tolist(), free_g.tolist()):
            self.proposed[src] = False
            moves.append((src, dst, float(self.prompt_len[src] + self.generated[src])))
            for col in self._columns:
                col[dst] = col[src]
            self.request[dst] = self.request[src]
            self._free(src)
        self.counts.moved_rows += len(moves)
        return tuple(moves)

    def _emit(self, p: Pass) -> Pass:
        prefill = p.kind == PREFILL
        pre = int(p.tokens[prefill].sum())
        decode_rows = len(p.kind) - int(np.count_nonzero(prefill))
        p = replace(p, index=self._index, prefill_tokens=pre, decode_rows=decode_rows)
        assert len(p.slot), "a pass computes at least one row"
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
