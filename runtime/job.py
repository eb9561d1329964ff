"""The dataset job: specrun --prompts DATA --output OUT.jsonl [--resume].

Rows are read and checked first (runtime.jobio), the output is opened (or resumed) before
any weight is read, and each row's result is appended the moment the engine finishes it:
id, text, token ids, finish reason (eos / stop / length), prompt and generated token counts,
and the drafted tokens it kept per verification. The measured-vs-predicted report is written
at the end as for any specrun.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

from specplan.errors import InputError
from specplan.fileio import sha256_of

from .jobio import Dataset, JobRow, job_identity
from .sampling import SamplingParams


def stop_at(text: str, stops: tuple[str, ...]) -> int | None:
    """Where the first stop string starts in text, or None."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def check_rows(rows: Mapping[int, JobRow] | Sequence[JobRow], todo: Sequence[int], source: str, has_tokenizer: bool,
               gen_len: int, base: SamplingParams) -> None:
    """Refuse (InputError, naming the row) what no run of these rows could honour: stop strings
    without a tokenizer, a max_tokens past the plan's gen_len, top-p / top-k on greedy rows."""
    if not has_tokenizer and any(rows[i].stop for i in todo):
        raise InputError(source, "stop", "needs a tokenizer to find stop strings, and the target has none",
                         "--target a model directory with a tokenizer")
    for i in todo:
        r = rows[i]
        if r.max_tokens is not None and r.max_tokens > gen_len:
            raise InputError(source, f"id {r.id!r}: max_tokens",
                             f"{r.max_tokens} is more than the plan's gen_len {gen_len} (each row's KV is sized by it)",
                             f"at most {gen_len}, or a plan made with --gen-len {r.max_tokens}")
    greedy = True
    for i in todo:
        fields = dict(rows[i].sampling)
        row_greedy = base.row(i, **fields).greedy
        greedy &= row_greedy
        # a row's own top_p / top_k on a greedy row would be ignored: refused (the command
        # line's filters do not apply to a row that sets temperature 0 itself)
        own = [k for k in ("top_p", "top_k") if k in fields and fields[k] != {"top_p": 1.0, "top_k": 0}[k]]
        if own and row_greedy:
            raise InputError(source, f"id {rows[i].id!r}: {own[0]}", "filters sampling, and this row is greedy (temperature 0)",
                             "a temperature > 0 on the row or --temperature")
    if (base.top_p < 1 or base.top_k > 0) and greedy:
        raise InputError("argument", "--top-p" if base.top_p < 1 else "--top-k",
                         "filters sampling, and every row of this job is greedy", "--temperature T (> 0) with it")


class Job:
    """The per-row callbacks of one dataset job (or of one shard of it), given to run_plan.
    `rows` maps a row's place in the input to the row (a list, or a dict holding a shard's
    rows only); `todo` are the places of the rows to run, in the order they run: a row's
    place keys its random stream, so a row samples the same wherever it runs."""

    def __init__(self, rows: Mapping[int, JobRow] | Sequence[JobRow], todo: list[int], source: str, writer, tokenizer,
                 gen_len: int, steps=None, now: Callable[[], float] = time.perf_counter,
                 base: SamplingParams | None = None):
        self.rows, self.todo, self.writer, self.tok = rows, todo, writer, tokenizer
        self.gen_len, self.steps, self.now = gen_len, steps, now
        self.engine = None
        self.done_rows = self.tokens = 0
        self.t0 = now()
        check_rows(rows, todo, source, tokenizer is not None, gen_len, base or SamplingParams())
        self.limits = [self.rows[i].max_tokens or gen_len for i in todo]
        # each row's own sampling fields, and its index in the input (which, with the job's seed,
        # keys the stream of a row that sets no seed: the same whether or not the job resumed)
        self.sampling = [{"index": i, **dict(self.rows[i].sampling)} for i in todo]
        self.prompts = [list(self.rows[i].ids) for i in todo]
        # a stop string spans at most as many tokens as it has bytes (a token is at least one
        # byte); each check decodes from that far before the tokens not yet checked
        self._back = {k: max(len(x.encode()) for x in self.rows[i].stop) for k, i in enumerate(todo) if self.rows[i].stop}
        self._checked: dict[int, int] = {}

    @property
    def stops(self) -> Callable[[int, list[int]], bool] | None:
        """The engine's stop check, or None when no row has a stop string (then the engine
        checks nothing per row and pass)."""
        return self.stop if self._back else None

    def _decode(self, tokens: list[int]) -> str:
        return self.tok.decode(tokens, skip_special_tokens=False)  # a stop may be a special token's text

    def stop(self, request: int, tokens: list[int]) -> bool:
        back = self._back.get(request)
        if back is None:
            return False
        start = max(0, self._checked.get(request, 0) - back)
        self._checked[request] = len(tokens)
        return stop_at(self._decode(tokens[start:]), self.rows[self.todo[request]].stop) is not None

    def _cut(self, tokens: list[int], stops: tuple[str, ...]) -> tuple[list[int], str]:
        """The shortest prefix of tokens whose text holds a stop string, and that text up to it."""
        for k in range(1, len(tokens) + 1):
            text = self._decode(tokens[:k])
            at = stop_at(text, stops)
            if at is not None:
                return tokens[:k], text[:at]
        return tokens, self.tok.decode(tokens, skip_special_tokens=True)

    def finish(self, request: int, tokens: list[int], reason: str) -> None:
        row = self.rows[self.todo[request]]
        text = None
        if self.tok is not None:
            if reason == "stop":  # tokens drafted past the stop in the same pass are dropped too
                tokens, text = self._cut(tokens, row.stop)
            else:
                text = self.tok.decode(tokens, skip_special_tokens=True)
        rounds = self.engine.row_rounds[request] if self.engine is not None else 0
        accepted = self.engine.row_accepted[request] if self.engine is not None else 0
        self.writer.write({"id": row.id, "text": text, "token_ids": tokens, "finish_reason": reason,
                           "prompt_tokens": len(row.ids), "generated_tokens": len(tokens),
                           "accepted_per_verification": accepted / rounds if rounds else None})
        self.done_rows += 1
        self.tokens += len(tokens)
        if self.steps is not None:
            dt = max(self.now() - self.t0, 1e-9)
            acc = ""
            if self.engine is not None and self.engine.gamma:
                r, a = sum(self.engine.row_rounds), sum(self.engine.row_accepted)
                acc = f", {1 + a / r:.2f} tokens a verification" if r else ""
            self.steps.say(f"{self.done_rows}/{len(self.todo)} rows, {self.tokens / dt:.1f} tok/s{acc}")
            self.steps.advance()


def _where(name: str | None) -> str | None:
    return None if name is None else str(Path(name).resolve()) if Path(name).exists() else str(name)


def identity_of(plan_path: Path, target: str, draft: str | None, dataset: Dataset, settings: dict) -> dict:
    """The job's identity: the plan's content, the models (directories resolved), the input's
    content, and every setting that changes what a row generates (`settings`)."""
    from specplan.fileio import read_json

    return job_identity(sha256_of(read_json(plan_path)), _where(target), _where(draft), dataset, settings)


def identity_of_job(target: str, draft: str | None, dataset: Dataset, settings: dict) -> dict:
    """A batch job's identity: as identity_of, without a plan (each machine has its own, and
    a row's tokens do not depend on which plan ran it)."""
    return job_identity(None, _where(target), _where(draft), dataset, settings)
