"""Per-row sampling: each row's distribution (temperature, top-k, top-p) and its own random stream.

A batch mixes rows that sample differently (a dataset row may set its own temperature,
top_p, top_k and seed), so every parameter is a per-row tensor, and temperature 0 is greedy:
that row's distribution is the one-hot of the argmax. Speculative verification with
one-hot p and q accepts a drafted token exactly when it is the target's argmax and
otherwise emits the argmax, so greedy and sampled rows share one verifier.

Random numbers are counter based: the uniform for a draw is a hash of (the row's key, the
position the token lands at, which draw). A row's tokens then depend on its seed and its
prompt only, not on which slot or batch it ran in, which rows ran beside it, or whether the
job was resumed. Within one row every (position, draw) pair is used at most once to decide
what is emitted: a speculative round at length L decides positions L..L+n from the draws
at those positions, and the next round starts at L+n+1, so rejected proposals never leave
a used number behind for a later round (the draws past the rejection were never looked at).

Tokens are drawn by inverse CDF in float64: the first token whose cumulative mass exceeds
u times the total, so a token of probability 0 is never drawn.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from specplan.workload import MIN_TEMPERATURE  # noqa: F401 (re-exported: a temperature is 0 or at least this)

MASK32 = 0xFFFFFFFF
MAX_SEED = 2 ** 63  # seeds are in [0, MAX_SEED): every one keys its own stream
# which draw at a position: the draft's proposal, the accept test of that proposal, and the
# target's token (the first token, a decode token, a correction or the bonus)
DRAFT, ACCEPT, TOKEN = 1, 2, 3


def _mul32(x, c: int):
    """(x * c) mod 2^32 for 32-bit x (an int or an int64 tensor) without int64 overflow."""
    return ((x & 0xFFFF) * c + (((x >> 16) * (c & 0xFFFF)) << 16)) & MASK32


def mix32(x):
    """A 32-bit integer hash with good avalanche (Wellons' "lowbias32" constants); ints or
    int64 tensors holding values in [0, 2^32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def row_key(seed: int, index: int | None = None) -> int:
    """A row's stream key (63 bits: two 32-bit hashes, the high one cut to 31): from its own
    `seed` alone (index None: the same seed gives the same stream wherever the row is), or
    from a job-wide seed and the row's index in the input."""
    lo, hi = seed & MASK32, (seed >> 32) & MASK32
    if index is not None:
        lo, hi = lo ^ mix32((index & MASK32) ^ 0x68E31DA4), hi ^ mix32(((index >> 32) & MASK32) ^ 0x3C6EF372)
    a, b = mix32(lo ^ mix32(hi)), mix32(hi ^ mix32(lo ^ 0x9E3779B9))
    return (a & 0x7FFFFFFF) << 32 | b


def uniform(keys: torch.Tensor, positions: torch.Tensor, draw: int) -> torch.Tensor:
    """Uniforms in [0, 1) (float64, 53 bits), one per entry of positions [B] or [B, n], for
    rows with keys [B] (int64, row_key): two 32-bit hashes of (a half of the key, position,
    draw), so a draw has 53 bits of its own rather than one 32-bit state stretched; each
    hash sees the whole key, so rows whose keys share a half still draw unrelated numbers."""
    k = keys.reshape(keys.shape + (1,) * (positions.dim() - keys.dim()))
    k_hi, k_lo = k >> 32, k & MASK32
    c = (positions.long() * 4 + draw) & MASK32
    hi = mix32(mix32(k_hi ^ mix32(c)) ^ k_lo) >> 5  # 27 bits
    lo = mix32(mix32(k_lo ^ mix32(c ^ 0x5BD1E995)) ^ k_hi) >> 6  # 26 bits
    return (hi * 67108864 + lo).double() / 9007199254740992.0  # / 2^53


def draw(p: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One token per row of p [..., V] by inverse CDF at u [...]."""
    cdf = p.double().cumsum(-1)
    total = cdf[..., -1]
    v = torch.minimum(u.to(cdf.device) * total, torch.nextafter(total, torch.zeros_like(total)))
    # in range even if p were all zero or NaN (sampling refuses the temperatures that could
    # make it so: MIN_TEMPERATURE)
    return torch.searchsorted(cdf, v[..., None], right=True).squeeze(-1).clamp_max(p.shape[-1] - 1)


def _per_row(v, x: torch.Tensor, dtype) -> torch.Tensor:
    """A number or a per-row tensor [B], shaped to broadcast against x [B, ..., V]."""
    t = torch.as_tensor(v, dtype=dtype, device=x.device)
    return t.reshape(t.shape + (1,) * (x.dim() - t.dim()))


def probs(logits: torch.Tensor, temperature, top_p=1.0, top_k=0) -> torch.Tensor:
    """Each row's sampling distribution over the last dim of logits [B, ..., V]: softmax at its
    temperature over the tokens its top-k (ties at the k-th kept) and then its top-p (the
    smallest set of most likely tokens whose mass reaches top_p; never empty) keep. A row at
    temperature 0 gets the one-hot of its argmax. Parameters are numbers or tensors [B]."""
    temp = _per_row(temperature, logits, torch.float32)
    greedy = temp == 0
    x = logits.float() / torch.where(greedy, torch.ones_like(temp), temp)
    V = x.shape[-1]
    k = torch.as_tensor(top_k)
    tp = torch.as_tensor(top_p)
    if ((k > 0) & (k < V)).any() or (tp < 1).any():
        sorted_x, order = x.sort(dim=-1, descending=True)
        kk = _per_row(k, x, torch.long)
        kth = sorted_x.gather(-1, (kk - 1).clamp(0, V - 1).expand(sorted_x.shape[:-1] + (1,)))
        sorted_x = sorted_x.masked_fill((kk > 0) & (sorted_x < kth), float("-inf"))
        p = F.softmax(sorted_x, dim=-1)
        tpr = _per_row(tp, x, torch.float32)
        # the mass before a token already reaches top_p; only for rows that ask for top-p (a
        # float32 cumsum reaches 1 before the tail, so top_p = 1 must mean no cut at all)
        drop = ((p.cumsum(-1) - p) >= tpr) & (tpr < 1)
        drop[..., 0] = False  # the most likely token always stays
        drop = drop | torch.isinf(sorted_x)
        x = x.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    p = F.softmax(x, dim=-1)
    if greedy.any():
        p = torch.where(greedy, F.one_hot(logits.argmax(-1), V).to(p.dtype), p)
    return p


@dataclass(frozen=True)
class RowSampling:
    """How one row samples: temperature (0: greedy), top_p in (0, 1], top_k (0: all), and the
    key of its random stream (row_key)."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    key: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class SamplingParams:
    """A run's sampling, for rows that do not set their own: temperature (0: greedy), top_p,
    top_k, and the seed that, with each row's index, keys the rows' streams."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0

    def row(self, index: int, temperature: float | None = None, top_p: float | None = None,
            top_k: int | None = None, seed: int | None = None) -> RowSampling:
        """Row `index`'s sampling: its own fields where given, else these. A row's own seed
        keys its stream by itself; otherwise the stream comes from this seed and the index."""
        return RowSampling(self.temperature if temperature is None else temperature,
                           self.top_p if top_p is None else top_p,
                           self.top_k if top_k is None else top_k,
                           row_key(seed) if seed is not None else row_key(self.seed, index))


class RowTable:
    """The rows of one generate call as tensors indexed by request (CPU), for gathering the
    sampling of the rows a step computes."""

    def __init__(self, rows: list[RowSampling]):
        self.temperature = torch.tensor([r.temperature for r in rows], dtype=torch.float32)
        self.top_p = torch.tensor([r.top_p for r in rows], dtype=torch.float32)
        self.top_k = torch.tensor([r.top_k for r in rows], dtype=torch.long)
        self.key = torch.tensor([r.key for r in rows], dtype=torch.long)
        self.greedy = bool((self.temperature == 0).all())

    def all_greedy(self, requests: torch.Tensor) -> bool:
        return self.greedy or bool((self.temperature[requests] == 0).all())

    def probs(self, logits: torch.Tensor, requests: torch.Tensor) -> torch.Tensor:
        """The distributions of rows `requests` [B] over logits [B, ..., V]."""
        return probs(logits, self.temperature[requests], self.top_p[requests], self.top_k[requests])

    def uniform(self, requests: torch.Tensor, positions: torch.Tensor, which: int) -> torch.Tensor:
        return uniform(self.key[requests], positions, which)

    def choose(self, logits: torch.Tensor, requests: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The target's token for rows `requests` from logits [B, V], landing at positions [B]."""
        if self.all_greedy(requests):
            return logits.argmax(-1)
        return draw(self.probs(logits, requests), self.uniform(requests, positions, TOKEN))
