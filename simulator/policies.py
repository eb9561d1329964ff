"""The four schedules as SimPy scenarios on one simulated machine.

Scenario (specoffload). Two batches of rows, A and B. The target model's weights live in
host memory; for every pass the loader copies them layer by layer over PCIe into a ring
of `prefetch_depth + 1` GPU buffers, running ahead of the layer that computes. A target
layer projects Q/K/V on the GPU, sends them to the CPU, where attention runs against the
CPU-resident KV cache, brings the result back, and runs the experts on the GPU. While
batch A is verified that way, the draft model, resident on the GPU, drafts gamma tokens
for each row of batch B. Both want the GPU: their kernels queue on one GPU resource, so
a round costs max(T_target, T_draft) only when they do not collide, and up to
T_draft + T_target_gpu when they do. Then A and B swap.

flexgen: no draft; every step streams each layer once and computes it for each of the
block's micro-batches in turn (as specrun does; they do not overlap each other).
sequential: no draft, no overlap: copy a layer, compute it, copy the next; each batch
takes its own pass over the weights.
spec-serial: speculative decoding on one batch: draft, then verify, then draft again.

Prefill is simulated for every policy: prompts in chunks of `prefill_chunk` rows, each
chunk one streamed pass with attention on the GPU and its KV copied to the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import simpy

from specplan.cost import (
    LayerCosts,
    activation_bytes,
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
from specplan.memory import streamed_chunks

from .machine import Machine


@dataclass
class Rows:
    """One batch of sequences and how far each has got."""

    name: str
    prompt: np.ndarray  # tokens per row
    generated: np.ndarray  # tokens generated per row (float in expected-value mode)
    gen_len: int
    acceptance_factor: np.ndarray | None = None  # each row's acceptance over the mean (None: all 1)

    @property
    def active(self) -> np.ndarray:
        return np.flatnonzero(self.generated < self.gen_len - 1e-9)

    def context(self, idx: np.ndarray) -> np.ndarray:
        return self.prompt[idx] + self.generated[idx]


@dataclass(frozen=True)
class Group:
    """Rows computed together in one layer: how many, new tokens each, mean context."""

    rows: int
    q_len: float
    ctx: float

    @property
    def tokens(self) -> float:
        return self.rows * self.q_len


class Scenario:
    def __init__(self, machine: Machine, cfg, rng: np.random.Generator):
        self.m, self.env, self.cfg, self.rng = machine, machine.env, cfg, rng
        self.T, self.D, self.P = cfg.target, cfg.draft, cfg.profile
        self.sch, self.pl, self.wl = cfg.schedule, cfg.placement, cfg.workload
        self.verify_rounds = 0
        self.row_rounds = 0  # sum over verifications of the rows verified
        self.gained_tokens = 0.0  # tokens those rows gained (capped at gen_len)
        self.drawn_tokens = 0.0  # the same before the cap (its mean estimates E)
        self.prefill_done_s = 0.0

    # ---- one pass of the target over all its layers ----------------------------------------
    def target_pass(self, who: str, groups: list[Group], kind: str, concurrent: bool = True):
        env, m, T, sch = self.env, self.m, self.T, self.sch
        tokens = sum(g.tokens for g in groups)
        nslots = sch.prefetch_depth + 1
        slots = simpy.Container(env, capacity=nslots, init=nslots)
        loaded = [env.event() for _ in range(T.layers)]
        env.process(self._load_layers(who, kind, tokens, slots, loaded))
        wl = self.cfg.workload
        if kind == "prefill":  # the runtime pads a chunk's prompts to the longest
            act = activation_bytes(T, sum(g.rows for g in groups), wl.max_prompt_len, wl.max_prompt_len)
        else:
            act = activation_bytes(T, sum(g.rows for g in groups), max(g.q_len for g in groups), wl.max_seq_len + sch.gamma)
        m.allocate("gpu", act, f"{kind} activations")
        costs = [self._layer_costs(g, kind) for g in groups]
        for layer in range(T.layers):
            yield loaded[layer]
            if len(costs) == 1 or not concurrent:
                for c in costs:
                    yield from self._layer(who, kind, c)
            else:
                yield env.all_of([env.process(self._layer(who, kind, c)) for c in costs])
            if loaded[layer].value:
                slots.put(1)
        head_tokens = sum(g.rows for g in groups) if kind == "prefill" else tokens
        if self.pl.lm_head != "gpu":
            pinned = self.pl.lm_head == "cpu_pinned"
            t = weights_h2d_s(self.P, T.head_bytes if pinned else 0.0, 0.0 if pinned else T.head_bytes)
            yield from m.use("h2d", self._stage(kind, "h2d"), t, who)
        yield from m.use("gpu", self._stage(kind, "target_head"), target_head_s(self.P, T, head_tokens), who)
        m.free("gpu", act)

    def _load_layers(self, who: str, kind: str, tokens: float, slots: simpy.Container, loaded: list):
        """Copy each streamed layer into a free ring slot, as far ahead as the ring allows."""
        # a layer's copies depend on it only through where its FFN lives: cost them once per pass
        costs: dict[str, tuple[float, float] | None] = {}
        for layer in range(self.T.layers):
            ffn_home = self.pl.ffn_home(layer)
            if ffn_home not in costs:
                costs[ffn_home] = self._copy_costs(streamed_chunks(self.T, self.pl, layer, tokens))
            cost = costs[ffn_home]
            if cost is None:
                loaded[layer].succeed(False)
                continue
            disk_s, h2d_s = cost
            yield slots.get(1)
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

    def _layer_costs(self, g: Group, kind: str) -> LayerCosts:
        return target_layer_costs(self.P, self.T, g.rows, g.q_len, g.ctx, self.sch.attention_device, kind == "prefill")

    def _layer(self, who: str, kind: str, c: LayerCosts):
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
            if self.sch.policy == "sequential":  # nothing overlaps, the copy included
                yield from copy
            else:
                self.env.process(copy)
        yield from m.use("gpu", st(kind, "target_ffn"), c.ffn, who)

    @staticmethod
    def _stage(kind: str, name: str) -> str:
        return f"prefill.{name}" if kind == "prefill" else name

    # ---- prefill ------------------------------------------------------------------------------
    def prefill(self, batches: list[Rows]):
        chunk = self.sch.prefill_chunk
        drafts = []  # the resident draft prefills each chunk on the side; it need not wait
        for rows in batches:
            for start in range(0, len(rows.prompt), chunk):
                p = rows.prompt[start:start + chunk]
                g = Group(len(p), float(p.mean()), float(p.mean()) / 2)
                if self.sch.speculative:
                    t = draft_step_s(self.P, self.D, g.rows, g.q_len, g.ctx)
                    drafts.append(self.env.process(self.m.use("gpu", "prefill.draft", t, f"{rows.name}.prefill")))
                yield from self.target_pass(f"{rows.name}.prefill", [g], "prefill")
            rows.generated[:] = 1  # the prefill's last logits give each row its first token
        yield self.env.all_of(drafts)
        self.prefill_done_s = self.env.now

    # ---- speculative rounds -------------------------------------------------------------------
    def draft_phase(self, rows: Rows):
        """gamma draft steps for each micro-batch of `rows`. With the draft KV on the host, the
        next micro-batch's KV is swapped in while the current one drafts (double buffering)."""
        idx = rows.active
        P, D, sch, m, env = self.P, self.D, self.sch, self.m, self.env
        mbs = [idx[i:i + sch.draft_batch] for i in range(0, len(idx), sch.draft_batch)]
        swap = self.pl.draft_kv == "cpu"

        def swap_in(mb):
            nbytes = float(rows.context(mb).sum()) * D.kv_bytes_per_token
            yield from m.use("h2d", "draft_kv_h2d", h2d_time_s(P, nbytes), rows.name)

        pending = env.process(swap_in(mbs[0])) if swap and mbs else None
        for i, mb in enumerate(mbs):
            if pending is not None:
                yield pending
                pending = env.process(swap_in(mbs[i + 1])) if i + 1 < len(mbs) else None
            step = draft_step_s(P, D, len(mb), 1, float(rows.context(mb).mean()))
            for _ in range(sch.gamma):
                yield from m.use("gpu", "draft", step, rows.name)
            if swap:  # write back the new entries; nothing waits for it
                # the round's gamma + 1 positions (the draft re-reads its last two tokens each round)
                nbytes = len(mb) * (sch.gamma + 1) * D.kv_bytes_per_token
                env.process(m.use("d2h", "draft_kv_d2h", d2h_time_s(P, nbytes), rows.name))

    def verify(self, rows: Rows):
        idx = rows.active
        if len(idx) == 0:
            return
        q = self.sch.gamma + 1
        g = Group(len(idx), q, float(rows.context(idx).mean()))
        yield from self.target_pass(rows.name, [g], "verify")
        drawn = self._accepted(rows, idx)
        gained = np.minimum(drawn, rows.gen_len - rows.generated[idx])
        rows.generated[idx] += gained
        self._count_round(len(idx), float(gained.sum()), float(drawn.sum()))

    def _count_round(self, rows: int, gained: float, drawn: float) -> None:
        self.verify_rounds += 1
        self.row_rounds += rows
        self.gained_tokens += gained
        self.drawn_tokens += drawn

    def _accepted(self, rows: Rows, idx: np.ndarray) -> np.ndarray:
        """Tokens rows `idx` gain from one verification: the accepted prefix plus the target's
        token. Expected mode: every row the mean (no spread, no tail)."""
        n = len(idx)
        rates = np.asarray(self.wl.acceptance_rates(self.sch.gamma))
        if self.cfg.mode == "expected":
            return np.full(n, expected_accepted_tokens_table(rates))
        if rows.acceptance_factor is not None:  # rows differ (the workload has a spread)
            rates = np.minimum(rates[None, :] * rows.acceptance_factor[idx, None], 1.0)
        ok = self.rng.random((n, self.sch.gamma)) < rates
        return np.cumprod(ok, axis=1).sum(axis=1) + 1.0

    def merge_tails(self, a: Rows, b: Rows):
        """specoffload's tail, as the runtime does it: once b's live rows fit in a's finished
        slots they move there (their target and draft KV copied within host or GPU memory),
        and one pass verifies all that is left. Returns whether it merged."""
        live_b, free_a = b.active, np.flatnonzero(a.generated >= a.gen_len - 1e-9)
        if len(live_b) == 0 or len(a.active) == 0 or len(live_b) > len(free_a):
            return False
        dst = free_a[:len(live_b)]
        for arr_a, arr_b in ((a.prompt, b.prompt), (a.generated, b.generated)) + (
                ((a.acceptance_factor, b.acceptance_factor),) if a.acceptance_factor is not None else ()):
            arr_a[dst], arr_b[live_b] = arr_b[live_b], arr_a[dst].copy()
        tokens = float((a.prompt[dst] + a.generated[dst]).sum())
        for nbytes, on_gpu in ((tokens * self.T.kv_bytes_per_token, self.sch.attention_device == "gpu"),
                               (tokens * self.D.kv_bytes_per_token, self.pl.draft_kv == "gpu")):
            yield from self.m.use("gpu" if on_gpu else "cpu", "merge_rows", memcpy_s(self.P, nbytes, on_gpu), a.name)
        return True

    # ---- policies --------------------------------------------------------------------------------
    def specoffload(self, batches: list[Rows]):
        yield from self.prefill(batches)
        x, y = batches if len(batches) == 2 else (batches[0], Rows("empty", np.zeros(0, int), np.zeros(0), 0))
        a, b = x, y
        yield from self.draft_phase(x)
        while len(x.active) or len(y.active):
            if (yield from self.merge_tails(a, b)):  # the pending draft is dropped: rows moved
                while len(a.active):
                    yield from self.draft_phase(a)
                    yield from self.verify(a)
                return
            procs = []
            if len(x.active):
                procs.append(self.env.process(self.verify(x)))
            if len(y.active):
                procs.append(self.env.process(self.draft_phase(y)))
            yield self.env.all_of(procs)
            x, y = y, x

    def spec_serial(self, batches: list[Rows]):
        yield from self.prefill(batches)
        for rows in batches:
            while len(rows.active):
                yield from self.draft_phase(rows)
                yield from self.verify(rows)

    def plain_decode(self, batches: list[Rows], one_pass: bool):
        """One token per row per step. flexgen (`one_pass`): each streamed layer serves every
        micro-batch, computed one after another as the runtime does; sequential: each batch
        takes its own pass over the weights."""
        yield from self.prefill(batches)
        while any(len(b.active) for b in batches):
            live = [(b, b.active) for b in batches if len(b.active)]
            groups = [Group(len(i), 1.0, float(b.context(i).mean())) for b, i in live]
            if one_pass:
                yield from self.target_pass("block", groups, "decode", concurrent=False)
            else:
                for (b, _), g in zip(live, groups):
                    yield from self.target_pass(b.name, [g], "decode")
            for b, i in live:
                b.generated[i] += 1
            n = sum(len(i) for _, i in live)
            self._count_round(n, n, n)

    def run(self, batches: list[Rows]):
        policy = self.sch.policy
        if policy == "specoffload":
            return self.specoffload(batches)
        if policy == "spec-serial":
            return self.spec_serial(batches)
        return self.plain_decode(batches, one_pass=policy == "flexgen")
