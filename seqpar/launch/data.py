"""Training data: the long-tail length generator and the batch sources of seqpar-train.

``long_tail_lengths`` draws document lengths (in tokens) shaped like Wikipedia articles, the long-tail
mix the heterogeneity-adaptive planner is built for (FlexSP, arXiv 2412.01523, Fig. 1). The published
token-length statistics it is matched to (``WIKIPEDIA_TOKEN_STATS``) are: median ~350, mean ~1,000,
p90 ~2.1K, p99 ~11K, p99.9 ~37K, 1.6% of the documents above 8K tokens carrying ~27% of all tokens.

Model: with probability ``TAIL_FRACTION`` a Pareto tail above ``TAIL_START`` tokens (``P(X > x) =
(x / 8192) ** -alpha``), otherwise a lognormal body truncated below ``TAIL_START``. Its analytic
statistics (the parameters below were fitted by a grid search against the targets): median 347, mean
1,023, p90 2.14K, p99 10.6K, p99.9 36.7K, 1.6% above 8K carrying 27.9% of the tokens; every one within
4.1% of its target. A single Pareto piece cannot hit both p99 = 11K and p99.9 = 37K exactly; alpha = 1.85
splits the difference. With alpha < 2 the variance is infinite, so sample means converge slowly (a few
percent at a million samples).
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Sequence

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = ["WIKIPEDIA_TOKEN_STATS", "SyntheticTokens", "TokenFile", "long_tail_lengths", "make_source", "replica_batch",
           "replica_indices", "step_lengths"]

WIKIPEDIA_TOKEN_STATS = {
    "median": 350.0,
    "mean": 1000.0,
    "p90": 2100.0,
    "p99": 11000.0,
    "p99.9": 37000.0,
    "fraction_above_8k": 0.016,
    "token_share_above_8k": 0.27,
}

TAIL_START = 8192
TAIL_FRACTION = 0.016
TAIL_ALPHA = 1.85
BODY_MEDIAN = 345.0  # of the untruncated lognormal
BODY_SIGMA = 1.40


def long_tail_lengths(n: int, *, seed: int, max_len: int | None = None, min_len: int = 1) -> np.ndarray:
    """``n`` document lengths in tokens (int64), reproducible from ``seed``.

    Args:
        n: how many lengths.
        seed: seed of ``numpy.random.default_rng``; the same seed gives the same lengths.
        max_len: clip longer documents to this (a context window); None keeps the unbounded tail.
        min_len: clip shorter documents up to this.

    Raises:
        ValueError: ``n`` not a positive integer, ``min_len`` < 1, or ``max_len`` < ``min_len``.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if isinstance(min_len, bool) or not isinstance(min_len, (int, np.integer)) or min_len < 1:
        raise ValueError(f"min_len must be an integer >= 1, got {min_len!r}")
    if max_len is not None and (not isinstance(max_len, (int, np.integer)) or max_len < min_len):
        raise ValueError(f"max_len must be None or an integer >= min_len={min_len}, got {max_len!r}")
    rng = np.random.default_rng(seed)
    in_tail = rng.random(n) < TAIL_FRACTION
    lengths = np.empty(n, dtype=np.float64)
    n_tail = int(in_tail.sum())
    # Pareto by inversion; 1 - U lies in (0, 1], so the power never divides by zero
    lengths[in_tail] = TAIL_START * (1.0 - rng.random(n_tail)) ** (-1.0 / TAIL_ALPHA)
    lengths[~in_tail] = _truncated_lognormal(rng, n - n_tail)
    out = np.maximum(np.floor(lengths), min_len)
    if max_len is not None:
        out = np.minimum(out, max_len)
    return out.astype(np.int64)


def _truncated_lognormal(rng: np.random.Generator, n: int) -> np.ndarray:
    """Lognormal body below ``TAIL_START``; redraws the ~1% that land in the tail's range."""
    mu = math.log(BODY_MEDIAN)
    out = rng.lognormal(mu, BODY_SIGMA, n)
    bad = out >= TAIL_START
    while bad.any():
        out[bad] = rng.lognormal(mu, BODY_SIGMA, int(bad.sum()))
        bad = out >= TAIL_START
    return out


# ---------------------------------------------------------------------------------------------------
# Training batches (seqpar-train)
# ---------------------------------------------------------------------------------------------------

SYNTHETIC_KINDS = ("fixed", "uniform", "longtail", "bimodal")


def step_lengths(kind: str, tokens_per_step: int, max_len: int, rng: np.random.Generator) -> list[int]:
    """Sequence lengths of one global batch holding at most ``tokens_per_step`` tokens (at least one sequence).

    ``bimodal``: one sequence of ``max_len`` tokens, then short ones (uniform in 16..``max_len // 16``): a batch for
    which no single SP degree is right (the long one wants several ranks, the short ones one each)."""
    if kind == "fixed":
        return [max_len] * max(1, tokens_per_step // max_len)
    lengths, total = [], 0
    while True:
        if kind == "bimodal":
            low = min(16, max_len)
            n = max_len if not lengths else int(rng.integers(low, max(low, max_len // 16) + 1))
        elif kind == "uniform":
            n = int(rng.integers(min(16, max_len), max_len + 1))
        else:
            n = int(long_tail_lengths(1, seed=int(rng.integers(2**31)), max_len=max_len, min_len=min(16, max_len))[0])
        if lengths and total + n > tokens_per_step:
            return lengths
        lengths.append(min(n, tokens_per_step))
        total += lengths[-1]


class SyntheticTokens:
    """Learnable synthetic text: each token follows its predecessor by a fixed affine rule 85% of the time and is
    random otherwise, so a small model's loss visibly falls. Batch i depends only on (seed, i): resuming at a step
    reproduces the same batches."""

    def __init__(self, kind: str, *, vocab: int, tokens_per_step: int, max_len: int, seed: int) -> None:
        if kind not in SYNTHETIC_KINDS:
            raise ValueError(f"kind: unknown synthetic data {kind!r}; use one of {SYNTHETIC_KINDS}")
        self.kind, self.vocab, self.tokens_per_step = kind, vocab, tokens_per_step
        self.max_len, self.seed = max_len, seed
        self.step = 0

    def next_batch(self) -> list["torch.Tensor"]:
        import torch

        rng = np.random.default_rng([self.seed, self.step])
        self.step += 1
        batch = []
        for n in step_lengths(self.kind, self.tokens_per_step, self.max_len, rng):
            tokens = np.empty(n, dtype=np.int64)
            tokens[0] = rng.integers(self.vocab)
            noise = rng.random(n) >= 0.85
            random_tokens = rng.integers(self.vocab, size=n)
            for i in range(1, n):
                tokens[i] = random_tokens[i] if noise[i] else (5 * tokens[i - 1] + 3) % self.vocab
            batch.append(torch.from_numpy(tokens))
        return batch

    def upcoming_lengths(self) -> list[int]:
        """The sequence lengths of the batch ``next_batch`` returns next (without drawing it): for planning ahead."""
        rng = np.random.default_rng([self.seed, self.step])
        return step_lengths(self.kind, self.tokens_per_step, self.max_len, rng)

    def state(self) -> dict:
        return {"step": self.step}

    def load_state(self, state: dict) -> None:
        self.step = int(state["step"])


class TokenFile:
    """Token ids from a ``.npy`` array or a flat headerless ``.bin`` (nanoGPT style: ``dtype`` must be given), cut
    into long-tail-length documents in order, wrapping at the end. The read position is the state.

    The whole file is checked when opened (every rank does it before any collective): integer ids, all in
    ``[0, vocab)``, at least ``tokens_per_step`` of them.

    Raises:
        ValueError: unknown suffix; a ``.bin`` without ``dtype`` or whose size does not divide by it; a ``dtype``
            that contradicts a ``.npy``; non-integer values; an id < 0 or >= ``vocab``; too few tokens.
    """

    def __init__(self, path: str, *, vocab: int, tokens_per_step: int, max_len: int, seed: int,
                 dtype: str | None = None) -> None:
        want = _integer_dtype(dtype) if dtype is not None else None
        if path.endswith(".npy"):
            self.tokens = np.load(path, mmap_mode="r").reshape(-1)
            if want is not None and self.tokens.dtype != want:
                raise ValueError(f"--data-dtype: {path!r} is a .npy of {self.tokens.dtype}, not {want}; a .npy "
                                 "records its dtype, so drop --data-dtype")
        elif path.endswith(".bin"):
            if want is None:
                raise ValueError(f"--data-dtype: {path!r} is a headerless .bin; say how its ids are stored "
                                 "(uint16 for nanoGPT-style files, or uint32 / int32 / int64)")
            size = os.path.getsize(path)
            if size % want.itemsize:
                raise ValueError(f"data: {path!r} has {size} bytes, not a multiple of {want} ({want.itemsize} bytes); "
                                 "check --data-dtype")
            self.tokens = np.memmap(path, dtype=want, mode="r") if size else np.zeros(0, dtype=want)
        else:
            raise ValueError(f"data: {path!r} must end in .npy or .bin")
        if not np.issubdtype(self.tokens.dtype, np.integer):
            raise ValueError(f"data: {path!r} holds {self.tokens.dtype} values; token ids must be integers "
                             "(convert the file, e.g. array.astype(np.int32))")
        needed = max(2, tokens_per_step)
        if self.tokens.size < needed:
            raise ValueError(f"data: {path!r} holds {self.tokens.size} tokens, fewer than one step's "
                             f"{needed} (--tokens-per-step); lower --tokens-per-step or use more data")
        low, high = int(self.tokens.min()), int(self.tokens.max())
        if low < 0:
            where = int(np.argmax(np.asarray(self.tokens) < 0))
            raise ValueError(f"data: {path!r} has a negative token id ({low}, first at index {where}); "
                             f"ids must lie in [0, {vocab})")
        if high >= vocab:
            raise ValueError(f"data: {path!r} has token id {high} >= the model's vocab {vocab}")
        self.tokens_per_step, self.max_len, self.seed = tokens_per_step, min(max_len, self.tokens.size), seed
        self.position, self.step = 0, 0

    def next_batch(self) -> list["torch.Tensor"]:
        import torch

        rng = np.random.default_rng([self.seed, self.step])
        self.step += 1
        batch = []
        for n in step_lengths("longtail", self.tokens_per_step, self.max_len, rng):
            idx = (self.position + np.arange(n)) % self.tokens.size
            self.position = int((self.position + n) % self.tokens.size)
            batch.append(torch.from_numpy(np.asarray(self.tokens[idx], dtype=np.int64)))
        return batch

    def upcoming_lengths(self) -> list[int]:
        """The sequence lengths of the batch ``next_batch`` returns next (without drawing it): for planning ahead."""
        rng = np.random.default_rng([self.seed, self.step])
        return step_lengths("longtail", self.tokens_per_step, self.max_len, rng)

    def state(self) -> dict:
        return {"position": self.position, "step": self.step}

    def load_state(self, state: dict) -> None:
        self.position, self.step = int(state["position"]), int(state["step"])


def _integer_dtype(name: str) -> np.dtype:
    try:
        dtype = np.dtype(name)
    except TypeError:
        dtype = None
    if dtype is None or not np.issubdtype(dtype, np.integer):
        raise ValueError(f"--data-dtype: {name!r} is not an integer dtype; use uint16, uint32, int32 or int64")
    return dtype


def make_source(data: str, *, vocab: int, tokens_per_step: int, max_len: int, seed: int, dtype: str | None = None):
    """A batch source for ``--data``: a synthetic kind or a token file path (``dtype``: a ``.bin`` file's ids).

    Raises:
        ValueError: see ``TokenFile``; ``dtype`` given for synthetic data.
    """
    if data in SYNTHETIC_KINDS:
        if dtype is not None:
            raise ValueError(f"--data-dtype: only for .bin token files, not synthetic data {data!r}")
        return SyntheticTokens(data, vocab=vocab, tokens_per_step=tokens_per_step, max_len=max_len, seed=seed)
    return TokenFile(data, vocab=vocab, tokens_per_step=tokens_per_step, max_len=max_len, seed=seed, dtype=dtype)


def replica_batch(batch: list["torch.Tensor"], *, replica: int, replicas: int) -> list["torch.Tensor"]:
    """Data-parallel replica ``replica``'s part of a step's global ``batch`` (``seqpar-train --dp``).

    Every replica splits the same global batch the same way, so each gets its own sequences, deterministically,
    and the step's data (and its global token-mean loss) is the same whatever ``--dp`` is: a run resumes on
    another mesh with the same data position. Sequences go longest first to the replica with the fewest tokens
    so far (ties: the lowest replica), which balances tokens; within a replica they keep the step's order.

    Raises:
        ValueError: the step has fewer sequences than replicas (one would have nothing to train on).
    """
    return [batch[i] for i in replica_indices([int(t.numel()) for t in batch], replica=replica, replicas=replicas)]


def replica_indices(lengths: Sequence[int], *, replica: int, replicas: int) -> list[int]:
    """The positions, in the step's order, of the sequences ``replica_batch`` gives ``replica``, from the step's
    sequence ``lengths`` alone (so a coming step's part is known before its tokens: a replica plans it ahead).

    Raises:
        ValueError: fewer sequences than replicas, as ``replica_batch``.
    """
    if len(lengths) < replicas:
        raise ValueError(f"--dp: the step has {len(lengths)} sequences for {replicas} data-parallel replicas; raise "
                         "--tokens-per-step, lower --max-len (more, shorter sequences per step) or lower --dp")
    tokens, owner = [0] * replicas, [0] * len(lengths)
    for i in sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i)):
        owner[i] = min(range(replicas), key=lambda r: (tokens[r], r))
        tokens[owner[i]] += int(lengths[i])
    return [i for i, r in enumerate(owner) if r == replica]
