"""Engine: the torch executor of the step scheduler's passes (specplan.scheduler).

The scheduler decides every pass: which rows compute how many new tokens (a prompt chunk,
gamma + 1 verify positions, or one decode token), which rows the draft proposes for and
whether that runs before the target's pass or beside it, which prompts enter freed slots and
which rows move. This file runs what it is told and hands back what came of it (tokens each
row kept, EOS); the schedule itself is written nowhere here.

Slots. The KV caches have one row per slot. A slot's state is its token sequence (prompt,
then generated tokens) and its length L. The target's cache holds positions 0..L-2 (every
token but the last); the draft's cache holds [0, L - 2) between rounds, so each round
re-reads the last two tokens and never needs to know how many of its own tokens survived.

One pass: the target walks its layers once, and at each layer computes every run of
consecutive slots that do the same thing (verify, decode, or the same prompt chunk), so a
prompt chunk rides on the weights the decode rows stream anyway; a chunk writes its KV
wherever the target's KV lives.

A speculative round for a row:
    propose: the draft reads what it does not hold of the row (a new row's prompt, or its
             whole context when the draft keeps no KV), feeds seq[L-2:L], then gamma - 1 of
             its own tokens, one step each, and keeps x_1..x_gamma (and q, when sampling);
    verify:  the target computes [seq[L-1], x_1..x_gamma] at positions L-1..L+gamma-1, then
             speculative.verify_* decides n and the next token; the row grows by n + 1 (cut
             at gen_len and after EOS) and its target cache length becomes L + n.
specoffload's draft runs on a thread (its own CUDA stream) beside the target's pass.

Where the draft's KV lives (placement.draft_kv):
    gpu        a cache with a row per slot;
    cpu        on the host; micro-batch i of a propose drafts in GPU swap buffer i % 2 while
               micro-batch i + 1 is copied into the other; only the positions a round wrote
               are copied back, and nobody waits for that (draftkv.py);
    recompute  no KV kept: one GPU buffer of draft_batch rows, refilled from each row's
               context every round.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass

import torch

from specplan.plan import Placement, Schedule
from specplan.scheduler import DraftRow, Outcome, Pass, Request, SchedulerConfig, StepScheduler

from .attention import cuda_sdpa_kernels
from .checkpoint import Checkpoint
from .draftkv import DraftKVSwap
from .kvcache import KVCache
from .model import Model, Step
from .sampling import ACCEPT, DRAFT, TOKEN, RowSampling, RowTable, SamplingParams, draw
from .speculative import verify_greedy, verify_sampling
from .stats import Stats
from .weights import RESIDENT, WeightStore


def runs(slots: list[int]) -> list[slice]:
    """Slots, in their order, as maximal slices of ascending consecutive ones."""
    out: list[slice] = []
    for s in slots:
        if out and out[-1].stop == s:
            out[-1] = slice(out[-1].start, s + 1)
        else:
            out.append(slice(s, s + 1))
    return out


@dataclass
class Slots:
    """The sequences in the KV caches' rows, on the CPU."""

    seq: torch.Tensor  # [S, max prompt + gen_len]: prompt, then generated tokens
    length: torch.Tensor  # [S] tokens in seq
    prompt_len: torch.Tensor  # [S]
    done: torch.Tensor  # [S] bool
    rounds: torch.Tensor  # [S] verifications the row took part in (speculative policies)
    accepted: torch.Tensor  # [S] drafted tokens the row had accepted
    request: torch.Tensor  # [S] which prompt the slot holds (-1: none)
    limit: torch.Tensor  # [S] tokens the row may generate (its max_tokens, at most the plan's gen_len)

    @classmethod
    def empty(cls, n: int, width: int) -> "Slots":
        z = torch.zeros(n, dtype=torch.long)
        return cls(torch.zeros(n, width, dtype=torch.long), z.clone(), z.clone(), torch.ones(n, dtype=torch.bool),
                   z.clone(), z.clone(), torch.full((n,), -1, dtype=torch.long), z.clone())

    def fill(self, slot: int, request: int, prompt: list[int], limit: int) -> None:
        self.seq[slot, :len(prompt)] = torch.tensor(prompt)
        self.length[slot] = self.prompt_len[slot] = len(prompt)
        self.done[slot] = False
        self.rounds[slot] = self.accepted[slot] = 0
        self.request[slot] = request
        self.limit[slot] = limit

    def move(self, src: int, dst: int) -> None:
        """Slot dst takes what slot src holds; src is left empty (the caches are the caller's)."""
        for t in (self.seq, self.length, self.prompt_len, self.done, self.rounds, self.accepted, self.request,
                  self.limit):
            t[dst] = t[src]
        self.request[src], self.done[src] = -1, True

    def last(self, idx: torch.Tensor, k: int) -> torch.Tensor:
        """The last k tokens of rows idx, [B, k]."""
        pos = self.length[idx][:, None] - k + torch.arange(k)
        return self.seq[idx].gather(1, pos)

    def generated(self, slot: int) -> list[int]:
        return self.seq[slot, self.prompt_len[slot]:self.length[slot]].tolist()


class Engine:
    def __init__(self, schedule: Schedule, placement: Placement, target: Checkpoint, draft: Checkpoint | None,
                 device: torch.device, *, rows: int, max_prompt_len: int, gen_len: int,
                 sampling: SamplingParams | None = None, eos: list[int] | None = None, stats: Stats | None = None):
        self.schedule, self.placement, self.device = schedule, placement, device
        self.cuda = device.type == "cuda"
        self._kernels = ExitStack()  # process-wide kernel choices held for the engine's life
        if self.cuda:
            self._kernels.enter_context(cuda_sdpa_kernels())
        self.gen_len = gen_len
        self.sampling = sampling or SamplingParams()  # for rows a generate call gives no sampling of their own
        self.table = RowTable([])  # the sampling of the current generate call's rows
        self.eos = torch.tensor(eos) if eos else None
        self.stats = stats or Stats(device)
        self.gamma = schedule.gamma if schedule.speculative else 0
        self.max_prompt_len = max_prompt_len
        self.max_len = max_len = max_prompt_len + gen_len + self.gamma  # verify writes gamma + 1 positions
        self.slots_n = rows = self._config(rows).slots

        spec = target.spec
        attn_device = device if schedule.attention_device == "gpu" else torch.device("cpu")
        store = WeightStore(target, placement, device, schedule.prefetch_depth, self.stats)
        cache = KVCache(spec.layers, rows, max_len, spec.kv_heads, spec.head_dim, target.dtype, attn_device,
                        pin=self.cuda and attn_device.type == "cpu")
        self.target = Model(spec, store, cache, device, self.stats, "target")

        self.draft: Model | None = None
        self.draft_swap: DraftKVSwap | None = None  # the draft's KV when placement.draft_kv == "cpu"
        if schedule.speculative:
            if draft is None:
                raise ValueError(f"policy {schedule.policy} needs a draft model")
            d = draft.spec
            mb = min(schedule.draft_batch, rows)
            if placement.draft_kv == "cpu":
                # two buffers of a micro-batch each: one drafts while the next is copied in
                self.draft_swap = DraftKVSwap(d.layers, rows, mb, max_len, d.kv_heads, d.head_dim, draft.dtype,
                                              device, self.stats)
                dcache = self.draft_swap.buffers[0]
            else:
                n = mb if placement.draft_kv == "recompute" else rows
                dcache = KVCache(d.layers, n, max_len, d.kv_heads, d.head_dim, draft.dtype, device)
            self.draft = Model(d, WeightStore(draft, RESIDENT, device, 0), dcache, device, None, "draft")
            self.proposal = torch.zeros(rows, max(self.gamma, 1), dtype=torch.long)  # x per slot, awaiting verification
            self.proposal_q: torch.Tensor | None = None  # q per slot, when sampling (made on first use)
        self.draft_stream = torch.cuda.Stream(device) if self.cuda and self.draft is not None else None
        self._progress: Callable[[int], None] | None = None
        self._stop: Callable[[int, list[int]], bool] | None = None
        self._stopped: set[int] = set()
        self._limits: list[int] | None = None
        self.passes: list[Pass] = []  # what ran, for the report and the agreement test
        self.outcomes: list[Outcome] = []
        self.pass_counts: dict = {}

    def _config(self, prompts: int) -> SchedulerConfig:
        return SchedulerConfig.from_schedule(self.schedule, self.gen_len, prompts, self.placement.draft_kv,
                                             self.max_prompt_len + self.gen_len)

    # ---- bookkeeping ------------------------------------------------------------------------------
    def device_parts(self) -> dict[str, int]:
        """Bytes this engine placed on the compute device, by part, named as
        `specplan.memory.plan_memory` names its GPU components where they correspond one to one
        (the target's weights and stream slots are one part here)."""
        parts = {"target weights and stream buffers": self.target.store.bytes["gpu"]}
        if self.schedule.attention_device == "gpu":
            parts["target KV cache"] = self.target.cache.nbytes
        if self.draft is not None:
            parts["draft weights"] = self.draft.store.bytes["gpu"]
            if self.draft_swap is not None:
                parts["draft KV swap buffers"] = self.draft_swap.device_bytes
            elif self.placement.draft_kv == "recompute":
                parts["draft KV recompute buffer"] = self.draft.cache.nbytes
            else:
                parts["draft KV cache"] = self.draft.cache.nbytes
        return parts

    def device_bytes(self) -> int:
        """Bytes this engine placed on the compute device: weights, stream slots, device KV caches."""
        return sum(self.device_parts().values())

    def host_bytes(self) -> dict[str, int]:
        b = dict(self.target.store.bytes)
        b.pop("gpu")
        if self.schedule.attention_device == "cpu":
            b["kv_cache"] = self.target.cache.nbytes
        if self.draft_swap is not None:
            b["draft_kv_cache"] = self.draft_swap.host.nbytes
        return b

    @staticmethod
    def _requests(slots: Slots, idx: torch.Tensor) -> torch.Tensor:
        """The requests slots idx hold (a slot already emptied counts as request 0: whatever it
        computes is not kept)."""
        return slots.request[idx].clamp_min(0)

    def _choose(self, logits: torch.Tensor, slots: Slots, idx: torch.Tensor) -> torch.Tensor:
        """The target's next token for rows idx from logits [B, V]: each row's own sampling,
        its draw keyed by the position the token lands at."""
        return self.table.choose(logits, self._requests(slots, idx), slots.length[idx])

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.current_stream(self.device).synchronize()

    def _append(self, slots: Slots, idx: torch.Tensor, cand: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        """Append the first count[r] tokens of cand[r] to each unfinished row idx[r], cut at gen_len
        and after an EOS; returns how many each row kept."""
        L, P = slots.length[idx], slots.prompt_len[idx]
        m = cand.shape[1]
        j = torch.arange(m)
        limit = slots.limit[idx]
        k = torch.minimum(count, limit - (L - P)).masked_fill(slots.done[idx], 0)
        eos_hit = torch.zeros_like(slots.done[idx])
        if self.eos is not None:
            hit = torch.isin(cand, self.eos) & (j < k[:, None])
            eos_hit = hit.any(1)
            k = torch.where(eos_hit, hit.int().argmax(1) + 1, k)
        keep = j < k[:, None]
        r = idx[:, None].expand(-1, m)
        slots.seq[r[keep], (L[:, None] + j)[keep]] = cand[keep]
        slots.length[idx] = L + k
        slots.done[idx] = slots.done[idx] | eos_hit | (L + k - P >= limit)
        self.target.cache.lengths[idx] = L + k - 1
        if self._progress is not None:
            self._progress(int(k.sum()))
        return k

    def _reason(self, req: int, tokens: list[int]) -> str:
        if req in self._stopped:
            return "stop"
        if self.eos is not None and tokens and tokens[-1] in self.eos.tolist():
            return "eos"
        return "length"

    # ---- the job ----------------------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], progress: Callable[[int], None] | None = None, *,
                 limits: list[int] | None = None, stop: Callable[[int, list[int]], bool] | None = None,
                 on_finish: Callable[[int, list[int], str], None] | None = None,
                 keep_outputs: bool = True, sampling: list[RowSampling] | None = None) -> list[list[int] | None]:
        """Generated token ids per prompt (prompt excluded), in prompt order: the scheduler's
        passes, run one after another until every prompt has finished. `limits` caps each
        row's tokens (at most gen_len); `stop(request, tokens)` ends a row when it returns
        True; `on_finish(request, tokens, reason)` hears each row as it finishes (reason:
        eos, stop or length). Without `keep_outputs` (a dataset job, whose rows go to disk as
        they finish) the list holds None and only `row_tokens` counts are kept. `sampling` gives
        each prompt its own (default: the engine's, each row's stream keyed by its index)."""
        self._progress, self._stop, self._stopped = progress, stop, set()
        self.table = RowTable(sampling if sampling is not None else [self.sampling.row(i) for i in range(len(prompts))])
        assert len(self.table.key) == len(prompts)
        self._limits = [min(n, self.gen_len) for n in limits] if limits is not None else None
        sched = StepScheduler(self._config(len(prompts)), [Request(i, len(p)) for i, p in enumerate(prompts)])
        assert sched.config.slots <= self.slots_n
        slots = Slots.empty(self.slots_n, self.max_prompt_len + self.gen_len)
        self.target.cache.lengths.zero_()
        out: list[list[int] | None] = [None] * len(prompts)
        self.finished_outputs = out  # filled as rows finish: what an interrupted run has to show
        self.row_tokens: list[int | None] = [None] * len(prompts)  # tokens each finished row generated
        self.row_rounds, self.row_accepted = [0] * len(prompts), [0] * len(prompts)  # for the acceptance spread
        self.passes, self.outcomes = [], []
        with ThreadPoolExecutor(1, thread_name_prefix="draft") as pool:
            while (p := sched.next_pass()) is not None:
                outcome = self.run_pass(p, slots, prompts, pool)
                sched.complete(p, outcome)
                self.passes.append(p)
                self.outcomes.append(outcome)
                for w in p.rows:  # rows that finished give their output now; the slot may refill next pass
                    s = w.slot
                    if slots.done[s] and slots.request[s] >= 0:
                        req = int(slots.request[s])
                        tokens = slots.generated(s)
                        self.row_tokens[req] = len(tokens)
                        out[req] = tokens if keep_outputs else None
                        self.row_rounds[req], self.row_accepted[req] = int(slots.rounds[s]), int(slots.accepted[s])
                        if on_finish is not None:
                            on_finish(req, tokens, self._reason(req, tokens))
                        slots.request[s] = -1
        self._sync()
        self.pass_counts = sched.counts.to_dict()
        return out

    def run_pass(self, p: Pass, slots: Slots, prompts: list[list[int]], pool: ThreadPoolExecutor) -> Outcome:
        only_prefill = not p.decode_rows
        t0 = time.perf_counter()
        self.stats.prefix = "prefill." if only_prefill else ""
        for src, dst, _ in p.moves:
            self._move(slots, src, dst)
        if p.moves:
            self.stats.count("merged_rows", len(p.moves))
        for slot, req in p.admitted:
            slots.fill(slot, req, prompts[req], self._limits[req] if self._limits is not None else self.gen_len)
            self.target.cache.lengths[slot] = 0
        if p.draft_first:
            self.propose(slots, p.draft_first)
        job = pool.submit(self.propose, slots, p.draft_beside) if p.draft_beside else None
        try:
            outcome = self.target_pass(p, slots)
        finally:
            if job is not None:
                job.result()
        self.stats.prefix = ""
        if only_prefill:
            self.stats.add("prefill", time.perf_counter() - t0)
        return outcome

    # ---- the target's pass ------------------------------------------------------------------------------------
    def target_pass(self, p: Pass, slots: Slots) -> Outcome:
        """One walk over the target's layers for every row of the pass; keep what it produced."""
        cache = self.target.cache
        steps: list[Step] = []
        parts = p.runs()  # one step each
        for kind, sl, w in parts:
            idx = torch.arange(sl.start, sl.stop)
            if kind == "verify":
                steps.append(Step(sl, torch.cat([slots.last(idx, 1), self.proposal[idx, :self.gamma]], 1)))
            elif kind == "decode":
                steps.append(Step(sl, slots.last(idx, 1)))
            else:
                cache.lengths[sl] = w.start
                steps.append(Step(sl, slots.seq[sl, w.start:w.start + w.tokens],
                                  torch.full((sl.stop - sl.start,), w.tokens - 1)))
        logits = self.target.forward(steps)
        self._sync()
        gained: dict[int, float] = {}
        with self.stats.wall("verify"):
            if any(k != "prefill" for k, _, _ in parts):
                self.stats.count("passes", 1)
            verify = [(sl, lg) for (k, sl, _), lg in zip(parts, logits) if k == "verify"]
            if verify:
                self._verify(slots, verify, gained)
            for (kind, sl, w), lg in zip(parts, logits):
                idx = torch.arange(sl.start, sl.stop)
                if kind == "decode":
                    t = self._choose(lg[:, -1], slots, idx).cpu()
                    active = ~slots.done[idx]
                    kept = self._append(slots, idx, t[:, None], torch.ones_like(t))
                    self.stats.count("rounds", int(active.sum()))
                    self.stats.count("appended", int(kept.sum()))
                    gained.update(zip(idx.tolist(), kept.tolist()))
                elif kind == "prefill":
                    cache.lengths[sl] = w.start + w.tokens
                    if w.last:  # the prompt is in: its last logits give the row's first token
                        first = self._choose(lg, slots, idx).cpu()
                        kept = self._append(slots, idx, first[:, None], torch.ones_like(first))
                        gained.update(zip(idx.tolist(), kept.tolist()))
        if self._stop is not None:  # a stop string ends its row here, as an EOS would
            eos_ids = self.eos.tolist() if self.eos is not None else []
            for s in gained:
                if slots.request[s] < 0 or (bool(slots.done[s]) and int(slots.seq[s, slots.length[s] - 1]) in eos_ids):
                    continue  # ended at EOS: that is its reason
                if self._stop(int(slots.request[s]), slots.generated(s)):  # even on its last allowed token
                    slots.done[s] = True
                    self._stopped.add(int(slots.request[s]))
        # rows that ended before the plan's gen_len (EOS, a stop string, their own max_tokens):
        # the scheduler frees their slots now
        eos = frozenset(s for s in gained if bool(slots.done[s]) and
                        int(slots.length[s] - slots.prompt_len[s]) < self.gen_len)
        return Outcome(gained, eos)

    def _verify(self, slots: Slots, parts: list[tuple[slice, torch.Tensor]], gained: dict) -> None:
        """Keep the accepted prefix of every verified row's proposal, and the target's next token."""
        idx = torch.cat([torch.arange(sl.start, sl.stop) for sl, _ in parts])
        logits = torch.cat([lg for _, lg in parts]) if len(parts) > 1 else parts[0][1]  # [B, gamma + 1, V]
        x = self.proposal[idx, :self.gamma]
        xd = x.to(self.device)
        req = self._requests(slots, idx)
        if self.table.all_greedy(req):
            n, nxt = verify_greedy(xd, logits)
        else:  # greedy rows among them verify with one-hot p and q, which is greedy verification
            q = self.proposal_q[idx.to(self.device)]
            at = slots.length[idx][:, None] + torch.arange(self.gamma + 1)  # where each position's token lands
            n, nxt = verify_sampling(xd, q, self.table.probs(logits, req), self.table.uniform(req, at[:, :-1], ACCEPT),
                                     self.table.uniform(req, at, TOKEN))
        n, nxt = n.cpu(), nxt.cpu()
        cand = torch.cat([x, torch.zeros_like(x[:, :1])], 1)
        cand[torch.arange(len(n)), n] = nxt
        active = ~slots.done[idx]
        slots.rounds[idx] += active.long()
        slots.accepted[idx] += n * active
        kept = self._append(slots, idx, cand, n + 1)
        self.stats.count("rounds", int(active.sum()))
        self.stats.count("drafted", self.gamma * int(active.sum()))
        self.stats.count("accepted", int(n[active].sum()))
        self.stats.count("appended", int(kept.sum()))
        gained.update(zip(idx.tolist(), kept.tolist()))

    # ---- the draft ----------------------------------------------------------------------------------------------
    def propose(self, slots: Slots, work: tuple[DraftRow, ...]) -> None:
        """The draft's work: for the rows it proposes for, gamma tokens each (kept per slot for
        their verification), in micro-batches of draft_batch rows; then the prompts it only reads."""
        size = self.schedule.draft_batch
        with self._draft_context(), self.stats.region("draft"):
            for rows in ([d for d in work if d.propose], [d for d in work if not d.propose]):
                mbs = [rows[i:i + size] for i in range(0, len(rows), size)]
                if not mbs:
                    continue
                load = self.draft_swap is not None and rows[0].propose  # prompts to read have nothing to load
                if load:
                    self.draft_swap.begin()
                    self._draft_load(0, mbs[0])
                for i, mb in enumerate(mbs):
                    if load and i + 1 < len(mbs):
                        self._draft_load(i + 1, mbs[i + 1])  # copied in while micro-batch i drafts
                    self._draft_micro_batch(slots, i, mb)
        if self.cuda:
            self.draft_stream.synchronize()  # this thread waits; the target's stream does not

    def _draft_micro_batch(self, slots: Slots, i: int, mb: list[DraftRow]) -> None:
        idx = torch.tensor([d.slot for d in mb])
        crows = self._draft_rows(i, [d.slot for d in mb], fresh=not mb[0].propose)
        cache = self.draft.cache
        ctx = torch.tensor([d.context for d in mb])
        start = torch.tensor([d.cached for d in mb])
        reads = [(k, d) for k, d in enumerate(mb) if d.context > d.cached]
        if reads:
            # the positions the draft does not hold (from 0: a new row, or a recomputed context),
            # padded to the longest; what lands past a row's context is masked, then overwritten
            width = max(d.context for _, d in reads)
            steps = []
            for crow, part in crows:
                sel = [k for k in range(part.start, part.stop) if mb[k].context > mb[k].cached]
                if sel:
                    cache.lengths[crow] = 0
                    steps.append(Step(crow, slots.seq[idx[part], :width]))
            self.draft.forward(steps, logits=False)
        for crow, part in crows:
            cache.lengths[crow] = ctx[part]
        if mb[0].propose:
            x, q = self._draft_steps(slots, idx, crows)
            self.proposal[idx, :self.gamma] = x
            if q is not None:
                if self.proposal_q is None:
                    self.proposal_q = torch.zeros(self.slots_n, self.gamma, q.shape[-1], device=q.device)
                self.proposal_q[idx.to(q.device)] = q
        self._draft_store(i, mb, start)

    def _draft_steps(self, slots: Slots, idx: torch.Tensor, crows):
        """gamma draft steps from each row's last two tokens: x [B, gamma] (CPU), q [B, gamma, V] or None."""
        cache = self.draft.cache
        tokens = slots.last(idx, 2)
        req, at = self._requests(slots, idx), slots.length[idx]
        xs, qs = [], []
        for i in range(self.gamma):
            pick = torch.full((tokens.shape[0],), tokens.shape[1] - 1)
            steps = [Step(crow, tokens[part], pick[part]) for crow, part in crows]
            logits = torch.cat(self.draft.forward(steps))
            for crow, _ in crows:
                cache.lengths[crow] += tokens.shape[1]
            if self.table.greedy:
                t = logits.argmax(-1)
            else:  # q for every row (one-hot for a greedy one): a verification may mix them
                qs.append(self.table.probs(logits, req))
                t = draw(qs[-1], self.table.uniform(req, at + i, DRAFT))
            xs.append(t)
            tokens = t[:, None]  # stays where the draft computed it: no host sync between steps
        return torch.stack(xs, 1).cpu(), (torch.stack(qs, 1) if qs else None)

    def _move(self, slots: Slots, src: int, dst: int) -> None:
        """The tail merge: slot dst takes slot src's row, its target KV and its draft KV."""
        if self.draft_swap is not None:
            self.draft_swap.synchronize()  # no copy of the host store in flight
        self._sync()
        end = int(slots.length[src])  # the caches hold at most the row's tokens so far
        slots.move(src, dst)
        self.target.cache.copy_row_(src, dst, end)
        if self.draft_swap is not None:
            self.draft_swap.host.copy_row_(src, dst, end)
        elif self.draft is not None and self.placement.draft_kv == "gpu":
            self.draft.cache.copy_row_(src, dst, end)
        self._sync()  # the copies ran on this stream; the draft's stream must see them done

    # ---- draft KV placement ---------------------------------------------------------------------------
    def _draft_context(self):
        return torch.cuda.stream(self.draft_stream) if self.draft_stream is not None else nullcontext()

    # With the draft KV on the host, micro-batch i of a propose uses swap buffer i % 2; see
    # draftkv.py for the copies and their ordering.
    def _draft_load(self, i: int, mb: list[DraftRow]) -> None:
        """Queue the copy of the positions the draft holds of each row of mb into buffer i % 2."""
        self.draft_swap.load(i % 2, [d.slot for d in mb], [d.cached for d in mb])

    def _draft_rows(self, i: int, mb_slots: list[int], fresh: bool = False) -> list[tuple[slice, slice]]:
        """Where the draft computes micro-batch i's rows: (cache rows, positions within the
        micro-batch) per run. The slots' own rows of the GPU cache, else rows 0.. of a buffer
        (swap buffer i % 2 once its load, or with nothing to load (`fresh`) its last
        write-back, is done; or the recompute buffer)."""
        n = len(mb_slots)
        if self.draft_swap is not None:
            self.draft.cache = self.draft_swap.acquire(i % 2, fresh)
            return [(slice(0, n), slice(0, n))]
        if self.placement.draft_kv == "recompute":
            return [(slice(0, n), slice(0, n))]
        out, k = [], 0
        for sl in runs(mb_slots):
            m = sl.stop - sl.start
            out.append((sl, slice(k, k + m)))
            k += m
        return out

    def _draft_store(self, i: int, mb: list[DraftRow], start: torch.Tensor) -> None:
        """Queue the write-back of the positions the draft just wrote for the rows of mb, [start, new length)."""
        if self.draft_swap is None:
            return
        end = self.draft.cache.lengths[:len(mb)]
        self.draft_swap.store(i % 2, [d.slot for d in mb], list(zip(start.tolist(), end.tolist())))

    def warmup(self, prompts: list[list[int]]) -> None:
        """The first rows' prefill and one decode round, at the run's shapes, for the caller not
        to time: kernel loading and library handles are paid here (generate resets every cache
        it uses, so the run that follows is unchanged)."""
        saved = self.gen_len
        self.gen_len = 2  # prefill gives the first token, one round the second
        try:
            self.generate(prompts[:self.slots_n])
        finally:
            self.gen_len = saved
            for model in (self.target, self.draft):
                if model is not None:
                    model.store.reset()  # units the warm-up prefetched would not be copied (or counted) again

    def close(self) -> None:
        if self.draft_swap is not None:
            self.draft_swap.synchronize()
        self.target.store.close()
        self._kernels.close()
