"""Engine: prefill, draft, verify and decode under the four schedules the planner names.

Rows. A wave of up to schedule.rows prompts is in flight at once; its rows are split into
batches (contiguous row ranges of the KV caches). A row's state is its token sequence
(prompt, then generated tokens) and its length L. The target's cache holds positions
0..L-2 (every token but the last); the draft's cache is rewound to L-2 each round, so it
re-reads the last two tokens and never needs to know how many of its own tokens survived.

A speculative round for a batch:
    propose: the draft feeds seq[L-2:L], then gamma - 1 of its own tokens, one step each,
             and returns x_1..x_gamma (and q, its distributions, when sampling);
    verify:  one target pass over [seq[L-1], x_1..x_gamma] at positions L-1..L+gamma-1,
             then speculative.verify_* decides n and the next token; the row grows by n + 1
             (cut at gen_len and after EOS) and its target cache length becomes L + n.
Finished rows stay in their batch (the batch shape is what streams the weights) but no
longer grow; a batch with no unfinished row is skipped.

Schedules:
    specoffload  two batches; the draft of one runs on a thread (its own CUDA stream) while
                 the target verifies the other with its weights streaming, then they swap.
    spec-serial  draft, then verify, one batch after another.
    flexgen      no draft; each step is one pass over the weights that computes every
                 micro-batch at a layer before moving to the next layer.
    sequential   no draft; each batch gets its own pass per step, no prefetch.
Prompts are prefilled in chunks of schedule.prefill_chunk rows, one target pass per chunk.

With placement.draft_kv == "cpu" the draft's KV lives on the host and micro-batch i of a
propose drafts in GPU swap buffer i % 2 while micro-batch i + 1 is copied into the other;
only the positions a round wrote are copied back, and nobody waits for that (draftkv.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass

import torch

from specplan.plan import Placement, Schedule

from .attention import cuda_sdpa_kernels
from .checkpoint import Checkpoint
from .draftkv import DraftKVSwap
from .kvcache import KVCache
from .model import Model, Step
from .speculative import probs, sample, verify_greedy, verify_sampling
from .stats import Stats
from .weights import RESIDENT, WeightStore


def split(s: slice, size: int) -> list[slice]:
    return [slice(i, min(i + size, s.stop)) for i in range(s.start, s.stop, size)]


@dataclass
class Rows:
    """The sequences of one wave, on the CPU."""

    seq: torch.Tensor  # [R, max prompt + gen_len]: prompt, then generated tokens
    length: torch.Tensor  # [R] tokens in seq
    prompt_len: torch.Tensor  # [R]
    done: torch.Tensor  # [R] bool
    rounds: torch.Tensor  # [R] verifications each row took part in (speculative policies)
    accepted: torch.Tensor  # [R] drafted tokens each row had accepted
    prompt: torch.Tensor  # [R] which prompt of the wave each row (cache slot) holds

    @classmethod
    def start(cls, prompts: list[list[int]], gen_len: int) -> "Rows":
        lens = torch.tensor([len(p) for p in prompts])
        seq = torch.zeros(len(prompts), int(lens.max()) + gen_len, dtype=torch.long)
        for r, p in enumerate(prompts):
            seq[r, :len(p)] = torch.tensor(p)
        zeros = torch.zeros(len(prompts), dtype=torch.long)
        return cls(seq, lens.clone(), lens, torch.zeros(len(prompts), dtype=torch.bool), zeros, zeros.clone(),
                   torch.arange(len(prompts)))

    def swap(self, i: int, j: int) -> None:
        """Exchange what rows i and j hold (the caches are the caller's)."""
        for t in (self.seq, self.length, self.prompt_len, self.done, self.rounds, self.accepted, self.prompt):
            t[[i, j]] = t[[j, i]]

    def last(self, b: slice, k: int) -> torch.Tensor:
        """The last k tokens of each row of batch b, [B, k]."""
        idx = self.length[b][:, None] - k + torch.arange(k)
        return self.seq[b].gather(1, idx)

    def active(self, b: slice) -> bool:
        return not bool(self.done[b].all())

    def live_span(self, b: slice) -> slice:
        """The rows of b from its first unfinished one to its last: what a pass computes, so
        rows that finished at either end cost nothing (those between still ride along)."""
        live = torch.nonzero(~self.done[b]).flatten()
        if len(live) == 0:
            return slice(b.start, b.start)
        return slice(b.start + int(live[0]), b.start + int(live[-1]) + 1)

    def outputs(self) -> list[list[int]]:
        """Generated tokens per prompt, in prompt order (rows may have moved between slots)."""
        out: list[list[int]] = [[] for _ in range(len(self.seq))]
        for r in range(len(self.seq)):
            out[int(self.prompt[r])] = self.seq[r, self.prompt_len[r]:self.length[r]].tolist()
        return out


class Engine:
    def __init__(self, schedule: Schedule, placement: Placement, target: Checkpoint, draft: Checkpoint | None,
                 device: torch.device, *, rows: int, max_prompt_len: int, gen_len: int, sampling: str = "greedy",
                 temperature: float = 1.0, seed: int = 0, eos: list[int] | None = None, stats: Stats | None = None):
        self.schedule, self.placement, self.device = schedule, placement, device
        self.cuda = device.type == "cuda"
        self._kernels = ExitStack()  # process-wide kernel choices held for the engine's life
        if self.cuda:
            self._kernels.enter_context(cuda_sdpa_kernels())
        self.gen_len, self.greedy, self.temperature, self.seed = gen_len, sampling == "greedy", temperature, seed
        self.eos = torch.tensor(eos) if eos else None
        self.stats = stats or Stats(device)
        self.rows_cap = rows
        self.gamma = schedule.gamma if schedule.speculative else 0
        max_len = max_prompt_len + gen_len + self.gamma  # a finished row still writes gamma + 1 positions

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
            if placement.draft_kv == "cpu":
                # two buffers of a micro-batch each: one drafts while the next is copied in
                self.draft_swap = DraftKVSwap(d.layers, rows, min(schedule.draft_batch, rows), max_len, d.kv_heads,
                                              d.head_dim, draft.dtype, device, self.stats)
                dcache = self.draft_swap.buffers[0]
            else:
                dcache = KVCache(d.layers, rows, max_len, d.kv_heads, d.head_dim, draft.dtype, device)
            self.draft = Model(d, WeightStore(draft, RESIDENT, device, 0), dcache, device, None, "draft")
        self.draft_stream = torch.cuda.Stream(device) if self.cuda and self.draft is not None else None
        self._gens: dict[tuple[str, int], torch.Generator] = {}
        self._progress: Callable[[int], None] | None = None

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

    def _gen(self, role: str, b: slice) -> torch.Generator | None:
        if self.greedy:
            return None
        key = (role, b.start)
        if key not in self._gens:
            offset = {"first": 0, "draft": 1, "target": 2}[role]
            self._gens[key] = torch.Generator(self.device).manual_seed(self.seed * 1_000_003 + 3 * b.start + offset)
        return self._gens[key]

    def _choose(self, logits: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
        return logits.argmax(-1) if self.greedy else sample(probs(logits, self.temperature), gen)

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.current_stream(self.device).synchronize()

    def _append(self, rows: Rows, b: slice, cand: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        """Append the first count[r] tokens of cand[r] to each unfinished row of batch b, cut at
        gen_len and after an EOS; returns how many each row kept."""
        L, P = rows.length[b], rows.prompt_len[b]
        m = cand.shape[1]
        j = torch.arange(m)
        k = torch.minimum(count, self.gen_len - (L - P)).masked_fill(rows.done[b], 0)
        eos_hit = torch.zeros_like(rows.done[b])
        if self.eos is not None:
            hit = torch.isin(cand, self.eos) & (j < k[:, None])
            eos_hit = hit.any(1)
            k = torch.where(eos_hit, hit.int().argmax(1) + 1, k)
        keep = j < k[:, None]
        r = torch.arange(len(k))[:, None].expand(-1, m)
        rows.seq[b][r[keep], (L[:, None] + j)[keep]] = cand[keep]
        rows.length[b] += k
        rows.done[b] |= eos_hit | (rows.length[b] - P >= self.gen_len)
        self.target.cache.lengths[b] = rows.length[b] - 1
        if self._progress is not None:
            self._progress(int(k.sum()))
        return k

    # ---- the three verbs ----------------------------------------------------------------------------
    def prefill(self, rows: Rows) -> None:
        """Prompts through the target (chunks of prefill_chunk rows) and the draft; samples each row's first token."""
        t0 = time.perf_counter()
        self.stats.prefix = "prefill."
        every = slice(0, len(rows.seq))
        cache = self.target.cache
        for c in split(every, self.schedule.prefill_chunk):
            P = rows.prompt_len[c]
            cache.lengths[c] = 0
            logits = self.target.forward([Step(c, rows.seq[c, :int(P.max())], pick=P - 1)])[0]
            first = self._choose(logits, self._gen("first", c)).cpu()
            self._append(rows, c, first[:, None], torch.ones_like(P))
        if self.draft is not None:
            with self._draft_context(), self.stats.region("draft"):
                for i, c in enumerate(split(every, self.schedule.draft_batch)):
                    P = rows.prompt_len[c]
                    crow = self._draft_rows(i, c, fresh=True)
                    self.draft.cache.lengths[crow] = 0
                    self.draft.forward([Step(crow, rows.seq[c, :int(P.max())])], logits=False)
                    self.draft.cache.lengths[crow] = P
                    self._draft_store(rows, i, c, crow, torch.zeros_like(P))
            if self.cuda:
                self.draft_stream.synchronize()
        self._sync()
        self.stats.prefix = ""
        self.stats.add("prefill", time.perf_counter() - t0)

    def propose(self, rows: Rows, b: slice) -> tuple[torch.Tensor, torch.Tensor | None, slice]:
        """gamma draft tokens [B', gamma] (CPU) for the live span of batch b, their distributions q
        when sampling, and that span (the rows the verification will compute)."""
        xs, qs = [], []
        gen_key = b  # sampling streams stay per batch, whatever the span
        b = rows.live_span(b)
        mbs = split(b, self.schedule.draft_batch)
        with self._draft_context(), self.stats.region("draft"):
            if self.draft_swap is not None:
                self.draft_swap.begin()
                self._draft_load(rows, 0, mbs[0])
            for i, c in enumerate(mbs):
                if self.draft_swap is not None and i + 1 < len(mbs):
                    self._draft_load(rows, i + 1, mbs[i + 1])  # copied in while micro-batch i drafts
                crow = self._draft_rows(i, c)
                cache = self.draft.cache
                start = rows.length[c] - 2
                cache.lengths[crow] = start
                tokens = rows.last(c, 2)
                x, q = [], []
                for _ in range(self.gamma):
                    pick = torch.full((tokens.shape[0],), tokens.shape[1] - 1)
                    logits = self.draft.forward([Step(crow, tokens, pick)])[0]
                    cache.lengths[crow] += tokens.shape[1]
                    if self.greedy:
                        t = logits.argmax(-1)
                    else:
                        q.append(probs(logits, self.temperature))
                        t = sample(q[-1], self._gen("draft", gen_key))
                    x.append(t)
                    tokens = t[:, None]
                self._draft_store(rows, i, c, crow, start)  # the positions this round wrote; nobody waits
                xs.append(torch.stack(x, 1))
                qs.append(torch.stack(q, 1) if q else None)
            x = torch.cat(xs).cpu()
            q = None if self.greedy else torch.cat(qs)
        if self.cuda:
            self.draft_stream.synchronize()  # this thread waits; the target's stream does not
        return x, q, b

    def verify(self, rows: Rows, batch: slice, proposal: tuple[torch.Tensor, torch.Tensor | None, slice]) -> None:
        """One target pass over the last token and the gamma drafted ones of the proposal's rows
        (batch's live span when it was drafted); keep the accepted prefix."""
        x, q, b = proposal
        tokens = torch.cat([rows.last(b, 1), x], 1)
        logits = self.target.forward([Step(b, tokens)])[0]  # [B, gamma + 1, V]
        self._sync()
        with self.stats.wall("verify"):
            xd = x.to(self.device)
            if self.greedy:
                n, nxt = verify_greedy(xd, logits)
            else:
                if self.cuda:
                    q.record_stream(torch.cuda.current_stream(self.device))  # made on the draft stream
                n, nxt = verify_sampling(xd, q, probs(logits, self.temperature), self._gen("target", batch))
            n, nxt = n.cpu(), nxt.cpu()
            cand = torch.cat([x, torch.zeros_like(x[:, :1])], 1)
            cand[torch.arange(len(n)), n] = nxt
            active = ~rows.done[b]
            rows.rounds[b] += active.long()
            rows.accepted[b] += n * active
            kept = self._append(rows, b, cand, n + 1)
            self.stats.count("passes", 1)
            self.stats.count("rounds", int(active.sum()))
            self.stats.count("drafted", self.gamma * int(active.sum()))
            self.stats.count("accepted", int(n[active].sum()))
            self.stats.count("appended", int(kept.sum()))

    def decode(self, rows: Rows, batches: list[slice]) -> None:
        """One non-speculative token for every live row of `batches` (each batch's live span), all
        in one pass over the weights."""
        spans = [rows.live_span(b) for b in batches]
        steps = [Step(s, rows.last(s, 1)) for s in spans]
        logits = self.target.forward(steps)
        self._sync()
        with self.stats.wall("verify"):
            self.stats.count("passes", 1)
            for full, b, lg in zip(batches, spans, logits):
                t = self._choose(lg[:, -1], self._gen("target", full)).cpu()
                active = ~rows.done[b]
                kept = self._append(rows, b, t[:, None], torch.ones_like(t))
                self.stats.count("rounds", int(active.sum()))
                self.stats.count("appended", int(kept.sum()))

    # ---- draft KV placement ---------------------------------------------------------------------------
    def _draft_context(self):
        return torch.cuda.stream(self.draft_stream) if self.draft_stream is not None else nullcontext()

    # With the draft KV on the host, micro-batch i of a propose (or of the draft's prefill) uses
    # swap buffer i % 2; see draftkv.py for the copies and their ordering.
    def _draft_load(self, rows: Rows, i: int, c: slice) -> None:
        """Queue the copy of what rows c's draft KV holds, positions [0, L - 2), into buffer i % 2
        (unfinished rows only: a finished row's draft tokens are discarded)."""
        ends = (rows.length[c] - 2).masked_fill(rows.done[c], 0)
        self.draft_swap.load(i % 2, list(range(c.start, c.stop)), ends.tolist())

    def _draft_rows(self, i: int, c: slice, fresh: bool = False) -> slice:
        """Cache rows the draft uses for rows c: the same rows of its GPU cache, or the rows of
        swap buffer i % 2 once its load (`fresh`: its last write-back) is done."""
        if self.draft_swap is None:
            return c
        self.draft.cache = self.draft_swap.acquire(i % 2, fresh)
        return slice(0, c.stop - c.start)

    def _draft_store(self, rows: Rows, i: int, c: slice, crow: slice, start: torch.Tensor) -> None:
        """Queue the write-back of the positions the draft just wrote for rows c, [start, new length)."""
        if self.draft_swap is None:
            return
        end = self.draft.cache.lengths[crow]
        spans = [(a, b if not done else a) for a, b, done in zip(start.tolist(), end.tolist(), rows.done[c].tolist())]
        self.draft_swap.store(i % 2, list(range(c.start, c.stop)), spans)

    # ---- schedules --------------------------------------------------------------------------------------
    def batches(self, n_rows: int) -> list[slice]:
        per = min(self.schedule.target_batch, -(-n_rows // self.schedule.num_batches))
        return split(slice(0, n_rows), per)

    def generate(self, prompts: list[list[int]], progress: Callable[[int], None] | None = None) -> list[list[int]]:
        """Generated token ids per prompt (prompt excluded), in waves of schedule.rows prompts."""
        self._progress = progress
        run = {"specoffload": self._run_specoffload, "spec-serial": self._run_spec_serial,
               "flexgen": self._run_flexgen, "sequential": self._run_sequential}[self.schedule.policy]
        out: list[list[int]] = []
        self.row_rounds, self.row_accepted = [], []  # per prompt, for the acceptance spread
        for w in range(0, len(prompts), self.rows_cap):
            rows = Rows.start(prompts[w:w + self.rows_cap], self.gen_len)
            self.prefill(rows)
            run(rows, self.batches(len(rows.seq)))
            out += rows.outputs()
            order = torch.argsort(rows.prompt)
            self.row_rounds += rows.rounds[order].tolist()
            self.row_accepted += rows.accepted[order].tolist()
        self._sync()
        return out

    def warmup(self, prompts: list[list[int]]) -> None:
        """The first wave's prefill and one decode round, at the run's shapes, for the caller
        not to time: kernel loading and library handles are paid here (generate resets every
        cache a wave uses, so the run that follows is unchanged)."""
        saved = self.gen_len
        self.gen_len = 2  # prefill gives the first token, one round the second
        try:
            self.generate(prompts[:self.rows_cap])
        finally:
            self.gen_len = saved
            self._gens.clear()  # sampling starts from the seeds again
            for model in (self.target, self.draft):
                if model is not None:
                    model.store.reset()  # units the warm-up prefetched would not be copied (or counted) again

    def _merge_tails(self, rows: Rows, a: slice, b: slice) -> bool:
        """Once batch b's live rows fit in batch a's finished slots, move them there (rows,
        target KV, draft KV), so one pass verifies all that is left instead of two."""
        live_b = torch.nonzero(~rows.done[b]).flatten() + b.start
        free_a = torch.nonzero(rows.done[a]).flatten() + a.start
        if len(live_b) == 0 or not rows.active(a) or len(live_b) > len(free_a):
            return False
        if self.draft_swap is not None:
            self.draft_swap.synchronize()  # no copy of the host store in flight
        self._sync()
        for src, dst in zip(live_b.tolist(), free_a.tolist()):
            end = int(rows.length[src])  # the caches hold at most the row's tokens so far
            rows.swap(src, dst)
            self.target.cache.copy_row_(src, dst, end)
            if self.draft_swap is not None:
                self.draft_swap.host.copy_row_(src, dst, end)
            elif self.draft is not None:
                self.draft.cache.copy_row_(src, dst, end)
        self._sync()  # the copies ran on this stream; the draft's stream must see them done
        self.stats.count("merged_rows", len(live_b))
        return True

    def _run_specoffload(self, rows: Rows, batches: list[slice]) -> None:
        if len(batches) < 2:
            return self._run_spec_serial(rows, batches)
        a, b = batches
        drafts = {0: self.propose(rows, a)} if rows.active(a) else {}
        turn = [0, 1]
        with ThreadPoolExecutor(1, thread_name_prefix="draft") as pool:
            while rows.active(a) or rows.active(b):
                if self._merge_tails(rows, a, b):  # the pending proposal is dropped: rows moved
                    return self._run_spec_serial(rows, [a])
                cur, nxt = turn
                job = pool.submit(self.propose, rows, batches[nxt]) if rows.active(batches[nxt]) else None
                if rows.active(batches[cur]):
                    self.verify(rows, batches[cur], drafts.pop(cur))
                if job is not None:
                    drafts[nxt] = job.result()
                turn.reverse()

    def _run_spec_serial(self, rows: Rows, batches: list[slice]) -> None:
        while any(rows.active(b) for b in batches):
            for b in batches:
                if rows.active(b):
                    self.verify(rows, b, self.propose(rows, b))

    def _run_flexgen(self, rows: Rows, batches: list[slice]) -> None:
        while live := [b for b in batches if rows.active(b)]:
            self.decode(rows, live)

    def _run_sequential(self, rows: Rows, batches: list[slice]) -> None:
        while any(rows.active(b) for b in batches):
            for b in batches:
                if rows.active(b):
                    self.decode(rows, [b])

    def close(self) -> None:
        if self.draft_swap is not None:
            self.draft_swap.synchronize()
        self.target.store.close()
        self._kernels.close()
