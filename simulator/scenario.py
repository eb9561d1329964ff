"""The SimPy executor of the step scheduler's passes (specplan.scheduler): one machine, one
scenario, every policy and admission mode.

Scenario. The target model's weights live in host memory. For every pass the loader copies
them layer by layer over PCIe into a ring of `prefetch_depth + 1` GPU buffers, running ahead
of the layer that computes. At each layer the pass computes its row groups one after another,
as the engine batches them (Pass.runs): runs of consecutive rows that verify (gamma + 1
positions) or decode (one), and runs of rows whose like prompt chunks ride in this pass; a
flexgen pass's groups, decoding side by side, are one run. A decode or verify group projects
Q/K/V on the GPU, sends them to the CPU, where attention runs against the CPU-resident KV
cache (or attends on the GPU when the KV lives there), and runs the FFN / experts on the GPU;
a prompt chunk attends on the GPU next to its fresh keys, and its KV is copied to the host.
The draft model, resident on the GPU, proposes gamma tokens per row: before the pass for the
rows it verifies (spec-serial, and specoffload's first pass), or beside it for the other
batch (specoffload).
Draft and target kernels queue on one GPU resource, so a specoffload round costs
max(T_target, T_draft) only when they do not collide, and up to T_draft + T_target_gpu when
they do. Rows the draft has not read yet (new rows, or every row when the draft keeps no KV)
are read first, in the same micro-batches; with the draft's KV on the host, the next
micro-batch's KV is swapped in while the current one drafts.

What runs in each pass is the scheduler's decision, never this file's: this file only costs it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from specplan.cost import (
    LayerCosts,
    activation_bytes,
    copies_overlap_compute,
    d2h_time_s,
    disk_read_time_s,
    draft_step_s,
    expected_accepted_tokens_table,
    h2d_time_s,
    memcpy_s,
    target_head_s,
    target_layer_costs,
    weights_h2d_s,
)
from specplan.memory import routed, routed_expert_chunks, streamed_chunks
from specplan.scheduler import DECODE, PREFILL, VERIFY, DraftWork, Outcome, Pass, StepScheduler

from .machine import Chain, Machine, Unit

# Run a layer nobody contends for as one timeout (False: every use and delay on its own, as
# a recorded timeline always does); the results agree either way.
CHAIN_UNCONTENDED = True


@dataclass(frozen=True)
class Group:
    """Rows computed together in one layer: how many, new tokens each, mean context."""

    rows: int
    q_len: float
    ctx: float
    prefill: bool = False

    @property
    def tokens(self) -> float:
        return self.rows * self.q_len


class Scenario:
    def __init__(self, machine: Machine, cfg, rng: np.random.Generator, sched: StepScheduler,
                 acceptance_factor: dict[int, float] | None = None, outcomes=None):
        self.m, self.env, self.cfg, self.rng = machine, machine.env, cfg, rng
        self.T, self.D, self.P = cfg.target, cfg.draft, cfg.profile
        self.sch, self.pl, self.wl = cfg.schedule, cfg.placement, cfg.workload
        self.sched = sched
        self.factor = acceptance_factor  # request id -> its acceptance over the mean (None: all 1)
        self.outcomes = outcomes  # pass -> Outcome, replacing the draws (the agreement test replays a run)
        self.passes: list[Pass] = []
        self._beside = None  # the draft's process beside the current target pass, if any
        self.verify_rounds = 0
        self.row_rounds = 0  # sum over verifications (or decode steps) of the rows in them
        self.gained_tokens = 0.0  # tokens those rows gained (capped at gen_len)
        self.drawn_tokens = 0.0  # the same before the cap (its mean estimates E)
        self.prefill_done_s = 0.0  # when the last pass that carried only prompt tokens ended
        self.finish_s: list[float] = []  # when each finished row finished, in order
        self.marks: list[tuple[float, int, int]] = []  # per pass: start s, prompts admitted, prompt tokens carried
        self.target_passes = 0  # the target's passes over its layers
        self.routed_experts = 0.0  # routed streaming: the experts those passes copied in (expected)

    # ---- the loop --------------------------------------------------------------------------------------
    def run(self):
        while (p := self.sched.next_pass()) is not None:
            self.passes.append(p)
            self.marks.append((self.env.now, len(p.admitted), p.prefill_tokens))
            yield from self.run_pass(p)
            self.sched.complete(p, self.outcome(p))
            self.finish_s += [self.env.now] * (len(self.sched.finished) - len(self.finish_s))
            if p.prefill_tokens and not p.decode_rows:
                self.prefill_done_s = self.env.now

    def run_pass(self, p: Pass):
        who = f"pass{p.index}.{'+'.join(chr(ord('A') + g) for g in p.groups)}"
        if p.moves:
            yield from self.move_rows(sum(tokens for *_, tokens in p.moves), who)
        if p.draft_first:  # nothing else computes meanwhile
            yield from self.draft_phase(p.draft_first, who, alone=True)
        procs = [self.env.process(self.target_pass(who, self.groups_of(p)))]
        self._beside = None  # target_pass looks at it from its first layer on, after this is set
        if p.draft_beside:
            self._beside = self.env.process(self.draft_phase(p.draft_beside, who + ".draft"))
            procs.append(self._beside)
        yield self.env.all_of(procs)

    def groups_of(self, p: Pass) -> list[Group]:
        """The pass's row groups as the engine computes them (Pass.runs): each run of
        consecutive slots that verify or decode, with the rows' mean length (fractional in
        expected mode), and each run of like prompt chunks."""
        plen, generated = self.sched.prompt_len, self.sched.generated
        groups = []
        for kind, sl, w in p.runs():
            n = sl.stop - sl.start
            if kind == "prefill":
                groups.append(Group(n, float(w.tokens), w.start + w.tokens / 2, prefill=True))
            else:
                groups.append(Group(n, float(w.tokens), (int(plen[sl].sum()) + float(generated[sl].sum())) / n))
        return groups

    def outcome(self, p: Pass) -> Outcome:
        """Tokens each row gains: the first after its last prompt chunk, one per decode, and per
        verification the accepted prefix plus the target's token, drawn per row (or E each, in
        expected mode); capped at gen_len."""
        if self.outcomes is not None:
            out = self.outcomes(p)
            gained = out.per_row(p)
        else:
            gained = ((p.kind == DECODE) | ((p.kind == PREFILL) & p.last)).astype(float)
            verify = p.kind == VERIFY
            if verify.any():
                gained[verify] = self._accepted(p.slot[verify])
            out = Outcome(gained)
        if p.decode_rows:
            stepped = p.kind != PREFILL
            drawn = gained[stepped]
            self.verify_rounds += 1
            self.row_rounds += p.decode_rows
            self.gained_tokens += float(np.minimum(drawn, self.wl.gen_len - self.sched.generated[p.slot[stepped]]).sum())
            self.drawn_tokens += float(drawn.sum())
        return out

    def _accepted(self, slots: np.ndarray) -> np.ndarray:
        n = len(slots)
        rates = np.asarray(self.wl.acceptance_rates(self.sch.gamma))
        if self.cfg.mode == "expected":
            return np.full(n, expected_accepted_tokens_table(rates))
        if self.factor is not None:  # rows differ (the workload has a spread)
            f = np.array([self.factor[self.sched.request[s].id] for s in slots.tolist()])
            rates = np.minimum(rates[None, :] * f[:, None], 1.0)
        ok = self.rng.random((n, self.sch.gamma)) < rates
        return np.cumprod(ok, axis=1).sum(axis=1) + 1.0

    # ---- one pass of the target over all its layers ------------------------------------------------------
    def target_pass(self, who: str, groups: list[Group]):
        """The target's pass over its layers. The draft's process running alongside (specoffload,
        self._beside) contends for the GPU until it ends; once it has, or where there is none,
        a layer's work runs as one timeout (Machine.chain), which costs what its uses one
        after another would (test_simulator: the two agree), in a fraction of the events."""
        env, m, T, sch, wl = self.env, self.m, self.T, self.sch, self.wl
        kind = "prefill" if all(g.prefill for g in groups) else "verify"
        # a ring slot ahead of the computing layer only where a copy can overlap compute
        nslots = sch.prefetch_depth + 1 if copies_overlap_compute(self.P) else 1
        # the groups go through a layer one after another: the larger working set is what is live
        act = max(activation_bytes(T, g.rows, wl.max_prompt_len, wl.max_prompt_len) if g.prefill
                  else activation_bytes(T, g.rows, g.q_len, wl.max_seq_len + sch.gamma) for g in groups)
        costs = [(g.prefill, self._layer_costs(g)) for g in groups]
        # a K/V copy to the host that the layer waits for queues on a link others use: such
        # passes keep every step (a copy it only sets off is part of the chain)
        waits_for_copy = any(c.kv_d2h for _, c in costs) and not self._copies_overlap()
        # routed experts are copied after each layer's router, on the link the ring also uses
        self.target_passes += 1
        expert_copies = self._routed_copies(groups)
        steps = (None if m.spans is not None or not CHAIN_UNCONTENDED or waits_for_copy or expert_copies
                 else Chain.of([st for prefill, c in costs for st in self._layer_steps("prefill" if prefill else "verify", c)]))
        if steps is not None and not steps.later and self._beside is None and m.alone():
            m.allocate("gpu", act, f"{kind} activations")
            yield from self._layers_alone(kind, steps, nslots)
        else:
            slots = Unit(env, nslots)  # the ring's free buffers
            loaded = [env.event() for _ in range(T.layers)]
            env.process(self._load_layers(who, kind, slots, loaded))
            m.allocate("gpu", act, f"{kind} activations")
            for layer in range(T.layers):
                yield loaded[layer]
                beside = self._beside
                if steps is not None and (beside is None or beside.triggered) and m.idle("gpu", "cpu"):
                    yield from m.chain(steps, who)
                else:
                    for j, (prefill, c) in enumerate(costs):
                        copy = expert_copies[layer][j] if expert_copies else None
                        yield from self._layer(who, "prefill" if prefill else "verify", c, copy)
                if loaded[layer].value:
                    slots.release()
        head_tokens = sum(g.rows if g.prefill else g.tokens for g in groups)  # a chunk keeps one position a row
        if self.pl.lm_head != "gpu":
            pinned = self.pl.lm_head == "cpu_pinned"
            t = weights_h2d_s(self.P, T.head_bytes if pinned else 0.0, 0.0 if pinned else T.head_bytes)
            yield from m.use("h2d", self._stage(kind, "h2d"), t, who)
        yield from m.use("gpu", self._stage(kind, "target_head"), target_head_s(self.P, T, head_tokens), who)
        m.free("gpu", act)

    def _layers_alone(self, kind: str, steps: Chain, nslots: int):
        """The layers of a pass that runs alone (Machine.alone: no other process holds, waits
        for or will take a resource, and no layer sets off a copy of its own): the loader's
        copies into the ring and each layer's chain, timed as the processes of the other path
        (_load_layers and the chains) would time them, then one timeout to the last layer's
        end, with the same stage and busy times. test_simulator checks the two agree."""
        m, env = self.m, self.env
        disk_stage, h2d_stage = self._stage(kind, "disk_read"), self._stage(kind, "h2d")
        loader = compute = env.now  # when the loader may go on; when the last layer's compute ended
        holders: deque[float] = deque()  # when each loaded layer in the ring gives its slot back
        for cost in self._layer_copies():
            if cost is None:  # resident: ready when the loader gets to it
                ready = loader
            else:
                disk_s, h2d_s = cost
                if len(holders) == nslots:  # the ring is full: wait for its oldest layer's compute
                    loader = max(loader, holders.popleft())
                if disk_s > 0:
                    loader += disk_s
                    m.account("disk", disk_stage, disk_s)
                if h2d_s > 0:
                    loader += h2d_s
                    m.account("h2d", h2d_stage, h2d_s)
                ready = loader
            compute = max(compute, ready)
            m.account_chain(steps)
            compute += steps.total_s
            if cost is not None:
                holders.append(compute)
        if compute > env.now:
            yield env.timeout(compute - env.now)

    def _layer_copies(self) -> list[tuple[float, float] | None]:
        """Each layer's (disk read s, H2D s) the ring copies ahead in a pass, None where nothing
        of it streams (a layer whole, every expert, unless its experts are routed:
        memory.streamed_chunks). A layer's copies depend on it only through where its FFN
        lives: each home is costed once a pass."""
        costs: dict[str, tuple[float, float] | None] = {}
        out = []
        for layer in range(self.T.layers):
            ffn_home = self.pl.ffn_home(layer)
            if ffn_home not in costs:
                costs[ffn_home] = self._copy_costs(streamed_chunks(self.T, self.pl, layer))
            out.append(costs[ffn_home])
        return out

    def _load_layers(self, who: str, kind: str, slots: Unit, loaded: list):
        """Copy each streamed layer into a free ring slot, as far ahead as the ring allows."""
        for layer, cost in enumerate(self._layer_copies()):
            if cost is None:
                loaded[layer].succeed(False)
                continue
            disk_s, h2d_s = cost
            wait = slots.acquire()
            if wait is not None:
                yield wait
            if disk_s:
                yield from self.m.use("disk", self._stage(kind, "disk_read"), disk_s, who)
            yield from self.m.use("h2d", self._stage(kind, "h2d"), h2d_s, who)
            loaded[layer].succeed(True)

    def _copy_costs(self, chunks: list[tuple[str, str, float]]) -> tuple[float, float] | None:
        """(disk read s, H2D s) of one streamed layer, or None if nothing of it streams."""
        if not chunks:
            return None
        disk = sum(n for _, home, n in chunks if home == "disk")
        # disk reads land in pinned staging buffers, so they cross PCIe at the pinned rate
        pinned = sum(n for _, home, n in chunks if home in ("cpu_pinned", "disk"))
        total = sum(n for *_, n in chunks)
        return disk_read_time_s(self.P, disk), weights_h2d_s(self.P, pinned, total - pinned)

    def _layer_costs(self, g: Group) -> LayerCosts:
        return target_layer_costs(self.P, self.T, g.rows, g.q_len, g.ctx, self.sch.attention_device, g.prefill)

    def _copies_overlap(self) -> bool:
        """A layer's K/V copy to the host runs beside its compute (else the layer waits for it)."""
        return self.sch.policy != "sequential" and copies_overlap_compute(self.P)

    def _layer_steps(self, kind: str, c: LayerCosts) -> list[tuple[str | None, str, float]]:
        """_layer's steps (resource, or None for a critical-path delay; stage; seconds), in its
        order, for Machine.chain: a K/V copy it sets off and does not wait for is "async:d2h"."""
        st = self._stage
        if c.attention_on_cpu:
            att = [(None, st(kind, "target_attention"), c.act_d2h), ("cpu", st(kind, "target_attention"), c.attention),
                   (None, st(kind, "target_attention"), c.act_h2d)]
        else:
            att = [("gpu", st(kind, "target_attention"), c.attention)]
        copy = [("async:d2h", st(kind, "kv_d2h"), c.kv_d2h)] if c.kv_d2h else []
        return [("gpu", st(kind, "target_proj"), c.proj), *att, *copy, ("gpu", st(kind, "target_ffn"), c.ffn),
                ("gpu", st(kind, "target_host"), c.host)]

    def _routed_copies(self, groups: list[Group]) -> list[list[tuple[float, float] | None]]:
        """Routed streaming: per layer and group, the (disk read s, H2D s) of the experts the
        group's router adds to those the pass's earlier groups brought; [] when experts stream
        with their layer."""
        if not routed(self.T, self.pl):
            return []
        out, before = [[] for _ in range(self.T.layers)], 0.0
        per_expert = self.T.layer_bytes.expert
        for g in groups:
            by_home: dict[str, tuple] = {}  # a layer's copy depends on it only through its FFN's home
            for layer in range(self.T.layers):
                home = self.pl.ffn_home(layer)
                if home not in by_home:
                    chunks = routed_expert_chunks(self.T, self.pl, layer, before, g.tokens)
                    by_home[home] = (sum(n for *_, n in chunks) / per_expert, self._copy_costs(chunks))
                experts, cost = by_home[home]
                self.routed_experts += experts
                out[layer].append(cost)
            before += g.tokens
        return out

    def _layer(self, who: str, kind: str, c: LayerCosts, experts: tuple[float, float] | None = None):
        """One group's work in one layer; `experts`: the routed experts' copy before its FFN."""
        m, st = self.m, self._stage
        yield from m.use("gpu", st(kind, "target_proj"), c.proj, who)
        if c.attention_on_cpu:
            yield from m.delay(st(kind, "target_attention"), c.act_d2h, who)
            yield from m.use("cpu", st(kind, "target_attention"), c.attention, who)
            yield from m.delay(st(kind, "target_attention"), c.act_h2d, who)
        else:
            yield from m.use("gpu", st(kind, "target_attention"), c.attention, who)
        if c.kv_d2h:
            copy = m.use("d2h", st(kind, "kv_d2h"), c.kv_d2h, who)
            if not self._copies_overlap():  # nothing overlaps
                yield from copy
            else:
                self.env.process(copy)
        if experts is not None:
            disk_s, h2d_s = experts
            if disk_s:
                yield from m.use("disk", st(kind, "disk_read"), disk_s, who)
            yield from m.use("h2d", st(kind, "h2d"), h2d_s, who)
        yield from m.use("gpu", st(kind, "target_ffn"), c.ffn, who)
        # the host's issuing beyond what the layer's device work hid: the device waits for it
        yield from m.use("gpu", st(kind, "target_host"), c.host, who)

    @staticmethod
    def _stage(kind: str, name: str) -> str:
        return f"prefill.{name}" if kind == "prefill" else name

    # ---- the draft ---------------------------------------------------------------------------------------
    def draft_phase(self, work: DraftWork, who: str, alone: bool = False):
        """The draft's work for `work`, in micro-batches of draft_batch rows: the rows it proposes
        for (each read first where the draft does not hold it), then the prompts it only reads.
        With the draft KV on the host, the next micro-batch's KV is swapped in while the current
        one drafts (double buffering). `alone`: no other process computes meanwhile, so a
        micro-batch's gamma steps may run as one use of the GPU (CHAIN_UNCONTENDED)."""
        size = self.sch.draft_batch
        for propose in (True, False):
            rows = work.take(work.propose == propose)
            if len(rows):
                yield from self._draft_micro_batches(rows, [slice(i, i + size) for i in range(0, len(rows), size)],
                                                     propose, who, alone)

    def _draft_micro_batches(self, rows: DraftWork, mbs: list[slice], propose: bool, who: str, alone: bool = False):
        P, D, sch, m, env = self.P, self.D, self.sch, self.m, self.env
        swap = self.pl.draft_kv == "cpu"
        stage = "draft" if propose else "prefill.draft"
        cached_all, context_all = rows.cached, rows.context

        def swap_in(mb):
            nbytes = float(cached_all[mb].sum()) * D.kv_bytes_per_token
            yield from m.use("h2d", "draft_kv_h2d", h2d_time_s(P, nbytes), who)

        pending = env.process(swap_in(mbs[0])) if swap and propose else None
        for i, mb in enumerate(mbs):
            if pending is not None:
                yield pending
                pending = env.process(swap_in(mbs[i + 1])) if i + 1 < len(mbs) else None
            cached, context = cached_all[mb], context_all[mb]
            n = len(cached)
            reading = context > cached
            read = int((context - cached)[reading].sum())
            if read:  # new rows' prompts (or every context, recomputed), padded to the longest
                longest = int((context - cached)[reading].max())
                ctx = (float(cached[reading].sum()) + read / 2) / int(reading.sum())
                yield from m.use("gpu", stage, draft_step_s(P, D, int(reading.sum()), longest, ctx), who)
            if propose:
                step = draft_step_s(P, D, n, 1, float(context.sum()) / n + 2)  # context: the row's length
                if alone and CHAIN_UNCONTENDED and m.spans is None:
                    yield from m.use("gpu", "draft", sch.gamma * step, who)
                else:
                    for _ in range(sch.gamma):
                        yield from m.use("gpu", "draft", step, who)
            if swap:  # write back the new entries; nothing waits for it
                # the positions read, and the round's gamma + 1 (it re-reads its last two tokens)
                positions = read + (n * (sch.gamma + 1) if propose else 0)
                env.process(m.use("d2h", "draft_kv_d2h", d2h_time_s(P, positions * D.kv_bytes_per_token), who))

    def move_rows(self, tokens: float, who: str):
        """specoffload's tail merge: the moved rows' target and draft KV (`tokens` positions in
        all) copied within host or GPU memory."""
        homes = [(tokens * self.T.kv_bytes_per_token, self.sch.attention_device == "gpu")]
        if self.pl.draft_kv != "recompute":
            homes.append((tokens * self.D.kv_bytes_per_token, self.pl.draft_kv == "gpu"))
        for nbytes, on_gpu in homes:
            yield from self.m.use("gpu" if on_gpu else "cpu", "merge_rows", memcpy_s(self.P, nbytes, on_gpu), who)
