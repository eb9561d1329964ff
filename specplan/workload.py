"""Workload: what the user wants generated, and how well the draft predicts the target."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from .cost import max_acceptance_spread
from .errors import InputError, require
from .fileio import read_json

SAMPLING_MODES = ("greedy", "sampling")
MIN_TEMPERATURE = 1e-3  # a sampling temperature is at least this (0 means greedy where allowed): smaller ones overflow logits / T


@dataclass(frozen=True)
class Workload:
    prompt_lens: tuple[int, ...]  # one entry, or one per prompt (cycled over num_prompts)
    gen_len: int
    num_prompts: int
    # Probability that the target accepts a drafted token: one rate for every position,
    # or a per-position table a_1..a_n (conditional on all earlier ones being accepted).
    acceptance: float | tuple[float, ...] = 0.7
    sampling: str = "greedy"
    temperature: float = 1.0
    seed: int = 0
    # How much acceptance differs between rows (prompts): the standard deviation of each
    # row's own rate around the mean rate, rows drawn from a Beta distribution
    # (cost.row_acceptance_factors). 0: every row alike, only chance makes rows ragged.
    acceptance_spread: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.acceptance_spread, int) and not isinstance(self.acceptance_spread, bool):
            object.__setattr__(self, "acceptance_spread", float(self.acceptance_spread))
        self.validate("workload")

    @classmethod
    def make(cls, prompt_len: int | list[int] = 512, gen_len: int = 128, num_prompts: int = 512,
             acceptance: float | list[float] = 0.7, sampling: str = "greedy", temperature: float = 1.0,
             seed: int = 0, source: str = "workload", acceptance_spread: float = 0.0) -> "Workload":
        lens = tuple(prompt_len) if isinstance(prompt_len, (list, tuple)) else (prompt_len,)
        acc = tuple(_rate(a) for a in acceptance) if isinstance(acceptance, (list, tuple)) else _rate(acceptance)
        try:
            return cls(lens, gen_len, num_prompts, acc, sampling, temperature, seed, _rate(acceptance_spread))
        except InputError as e:  # re-attribute to where the values came from
            raise InputError(source, e.field, e.problem, e.expected) from None

    @classmethod
    def from_dict(cls, d: Any, source: str) -> "Workload":
        if not isinstance(d, dict):
            raise InputError(source, "workload", "is not an object", "a JSON object")
        known = {"prompt_len", "prompt_lens", "gen_len", "num_prompts", "acceptance", "acceptance_spread", "sampling",
                 "temperature", "seed"}
        unknown = set(d) - known
        require(not unknown, source, ", ".join(sorted(unknown)), "unknown field", ", ".join(sorted(known)))
        require(not {"prompt_len", "prompt_lens"} <= set(d), source, "prompt_lens",
                "is given beside prompt_len, and one would be ignored", "one of prompt_len and prompt_lens")
        prompt = d.get("prompt_lens", d.get("prompt_len", 512))
        return cls.make(prompt, d.get("gen_len", 128), d.get("num_prompts", 512), d.get("acceptance", 0.7),
                        d.get("sampling", "greedy"), d.get("temperature", 1.0), d.get("seed", 0), source=source,
                        acceptance_spread=d.get("acceptance_spread", 0.0))

    def check_positions(self, source: str, *models, extra_tokens: int = 0) -> None:
        """Refuse a workload whose longest row (prompt + gen_len, plus `extra_tokens` of a
        verification window) passes a model's maximum positions."""
        check_row_positions(source, "prompt_len", self.max_prompt_len, self.gen_len, extra_tokens, *models)

    @classmethod
    def from_file(cls, path: str) -> "Workload":
        return cls.from_dict(read_json(path), path)

    def validate(self, source: str) -> None:
        require(len(self.prompt_lens) > 0, source, "prompt_len", "is empty", "a positive integer or a list of them")
        for n in self.prompt_lens:
            require(isinstance(n, int) and not isinstance(n, bool) and n > 0, source, "prompt_len",
                    f"got {n!r}", "positive integers")
        for key in ("gen_len", "num_prompts"):
            v = getattr(self, key)
            require(isinstance(v, int) and not isinstance(v, bool) and v > 0, source, key, f"got {v!r}", "a positive integer")
        rates = self.acceptance if isinstance(self.acceptance, tuple) else (self.acceptance,)
        require(len(rates) > 0, source, "acceptance", "is empty", "a rate in [0, 1] or a list of them")
        for a in rates:
            require(isinstance(a, float) and 0.0 <= a <= 1.0, source, "acceptance", f"got {a!r}", "a rate in [0, 1]")
        s = self.acceptance_spread
        require(isinstance(s, float) and s >= 0.0, source, "acceptance_spread", f"got {s!r}", "a number >= 0")
        if s > 0:
            m = self.mean_acceptance
            require(0.0 < m < 1.0 and s * s < m * (1.0 - m), source, "acceptance_spread",
                    f"got {s!r} with mean acceptance {m:.3g}",
                    f"0, or below sqrt(mean (1 - mean)) = {(m * (1 - m)) ** 0.5:.3g} (the largest spread of a rate)")
        require(self.sampling in SAMPLING_MODES, source, "sampling", f"got {self.sampling!r}", " or ".join(SAMPLING_MODES))
        require(self.temperature >= MIN_TEMPERATURE, source, "temperature", f"got {self.temperature!r}",
                f"a number >= {MIN_TEMPERATURE}")
        require(isinstance(self.seed, int) and not isinstance(self.seed, bool) and 0 <= self.seed < 2 ** 63, source,
                "seed", f"got {self.seed!r}", "an integer >= 0")

    @property
    def mean_acceptance(self) -> float:
        """The mean of the per-position rates (the rate itself when there is one)."""
        rates = self.acceptance if isinstance(self.acceptance, tuple) else (self.acceptance,)
        return sum(rates) / len(rates)

    @property
    def mean_prompt_len(self) -> float:
        return sum(self.prompt_lens) / len(self.prompt_lens)

    @property
    def max_prompt_len(self) -> int:
        return max(self.prompt_lens)

    @property
    def max_seq_len(self) -> int:
        return self.max_prompt_len + self.gen_len

    def prompt_len_of(self, i: int) -> int:
        return self.prompt_lens[i % len(self.prompt_lens)]

    def at_acceptance(self, acceptance: float, spread: float | None = None) -> "Workload":
        """This workload at another (single) acceptance rate, with its spread, or `spread`, cut
        to what a rate that high or low allows (none at 0 or 1)."""
        a = float(min(max(acceptance, 0.0), 1.0))
        s = self.acceptance_spread if spread is None else float(spread)
        return replace(self, acceptance=a, acceptance_spread=min(s, max_acceptance_spread(a)))

    def acceptance_rates(self, gamma: int) -> tuple[float, ...]:
        """Per-position acceptance a_1..a_gamma (the last table entry repeats past its end)."""
        if isinstance(self.acceptance, float):
            return (self.acceptance,) * gamma
        t = self.acceptance
        return tuple(t[min(i, len(t) - 1)] for i in range(gamma))

    def to_dict(self) -> dict[str, Any]:
        d = {"prompt_lens": list(self.prompt_lens), "gen_len": self.gen_len, "num_prompts": self.num_prompts,
             "acceptance": list(self.acceptance) if isinstance(self.acceptance, tuple) else self.acceptance,
             "sampling": self.sampling, "temperature": self.temperature, "seed": self.seed}
        if self.acceptance_spread:  # absent when 0, so plans made before the field keep their hash
            d["acceptance_spread"] = self.acceptance_spread
        return d


def _rate(a: Any) -> Any:
    return float(a) if isinstance(a, (int, float)) and not isinstance(a, bool) else a


def check_row_positions(source: str, where: str, prompt_tokens: int, gen_len: int, gamma: int, *models) -> None:
    """The one rule for a row's length: its prompt + gen_len, plus gamma (the verification
    window writes that far past the last kept token), must fit each model's positions
    (max_position_embeddings). `where` names the row (a field, a prompt's index, an id)."""
    need = prompt_tokens + gen_len + gamma
    for m in models:
        if m is not None and need > m.max_positions:
            room = m.max_positions - gen_len - gamma
            if room < 1:  # gen_len alone is too long: no prompt length fits, so gen_len is at fault
                where = "gen_len" if where == "prompt_len" else where
            raise InputError(source, where, f"{prompt_tokens} prompt tokens + gen_len {gen_len}"
                             + (f" + gamma {gamma}" if gamma else "")
                             + f" = {need} exceed {m.name}'s max_position_embeddings {m.max_positions}",
                             f"prompts of at most {room} tokens" if room >= 1 else
                             f"a gen_len of at most {m.max_positions - gamma - 1} (a prompt needs a token)")
