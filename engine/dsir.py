"""DSIR: data selection with importance resampling on hashed n-gram features.

A text's features are the counts of its hashed n-grams: `words = re.findall(r"\\w+|[^\\w\\s]+",
text.lower())` (nltk's WordPunctTokenizer, Python's Unicode `\\w`), and for k = 1..n every k-gram
`" ".join(words[i:i+k])` adds 1 to bucket `int(sha256(gram).hexdigest(), 16) % num_buckets`.
With `p_raw` and `p_target` the normalised summed counts over the pool and over the targets,

    log_diff = log(p_target + 1e-8) - log(p_raw + 1e-8)
    log w(x) = log_diff . counts(x)                      (not normalised by length: the reference)
    length(x) = (sum(counts(x)) + n(n-1)/2) // n         (the word count, for n = 2)

and rows with length < min_example_length are never selected. Resampling draws `budget` rows
without replacement with probability proportional to w: Gumbel top-k, the `budget` largest of
`log w + G` with G ~ Gumbel(0, 1); here G is drawn from (seed, the row's string id), so the same
rows are chosen for any partitioning of the pool. `top_k` takes the largest log w. Ranks are by
the key, ties by id.

The buckets are exact (sha256, as the reference): `Featurizer` keeps a token -> bucket memo and
counts with numpy, which changes no bucket (tested against the reference's `get_ngram_counts`).

References
----------
Xie, Santurkar, Ma, Liang. "Data Selection for Language Models via Importance Resampling".
NeurIPS 2023. Reference code: PyPI `data-selection==1.0.3`, `HashedNgramDSIR`.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from itertools import chain, repeat
from operator import methodcaller

import numpy as np
import pandas as pd

from raysift.engine.ids import hash_uniform

# nltk's WordPunctTokenizer: RegexpTokenizer(r"\w+|[^\w\s]+") compiled with these flags
TOKEN = re.compile(r"\w+|[^\w\s]+", re.UNICODE | re.MULTILINE | re.DOTALL)
SMOOTHING = 1e-8  # the reference's constant inside both logs


@dataclass
class Features:
    """Hashed n-gram features of a batch of texts, sparse: gram j of the batch falls in
    `buckets[j]` and belongs to text `text[j]`. `grams[i]` = text i's number of grams (the sum
    of its count vector)."""

    buckets: np.ndarray  # (G,) int64
    text: np.ndarray  # (G,) int64
    grams: np.ndarray  # (n_texts,) int64
    ngrams: int

    @property
    def n(self) -> int:
        return len(self.grams)

    def lengths(self) -> np.ndarray:
        """The reference's per-example length, (grams + n(n-1)/2) // n."""
        return (self.grams + self.ngrams * (self.ngrams - 1) // 2) // self.ngrams

    def counts(self, num_buckets: int) -> np.ndarray:
        """The summed count vector of the batch, (num_buckets,) int64."""
        return np.bincount(self.buckets, minlength=num_buckets).astype(np.int64)

    def dense(self, num_buckets: int) -> np.ndarray:
        """Per-text count vectors, (n_texts, num_buckets) int64 (for tests and small batches)."""
        out = np.zeros((self.n, num_buckets), dtype=np.int64)
        np.add.at(out, (self.text, self.buckets), 1)
        return out

    def log_weights(self, log_diff: np.ndarray) -> np.ndarray:
        """log w = log_diff . counts per text; `log_diff` (num_buckets,) or (K, num_buckets) for K
        target sets -> (n_texts,) or (n_texts, K) float64."""
        rows = [np.bincount(self.text, weights=ld[self.buckets], minlength=self.n)
                for ld in np.atleast_2d(log_diff)]  # fmt: skip
        return np.stack(rows, axis=1) if np.ndim(log_diff) == 2 else rows[0]

    def select(self, keep: np.ndarray) -> Features:
        """The features of the texts where `keep` is true (renumbered)."""
        keep = np.asarray(keep, bool)
        new_index = np.cumsum(keep) - 1
        mask = keep[self.text]
        return Features(self.buckets[mask], new_index[self.text[mask]], self.grams[keep],
                        self.ngrams)  # fmt: skip


class Featurizer:
    """Hashed n-gram counts, exactly the reference's buckets, with a memo.

    Words get small integer ids (a dict); a k-gram's id is looked up from the pair (id of its
    (k-1)-gram prefix, id of its last word), so after the first sighting a gram costs a dict
    lookup instead of a sha256 of its string. The vocabulary is Zipfian: on real text most grams
    are seen before. The memo is dropped when it holds more than `memo_limit` grams (between
    batches: it only changes speed, never a bucket).
    """

    def __init__(self, ngrams: int = 2, num_buckets: int = 10000, memo_limit: int = 4_000_000):
        if ngrams < 1:
            raise ValueError(f"ngrams must be >= 1, got {ngrams}")
        if num_buckets < 1:
            raise ValueError(f"num_buckets must be >= 1, got {num_buckets}")
        self.ngrams = ngrams
        self.num_buckets = num_buckets
        self.memo_limit = memo_limit
        self._reset()

    def _reset(self) -> None:
        self.word_id: dict[str, int] = {}
        self.gram_id: list[dict[int, int]] = [{} for _ in range(self.ngrams)]  # level k-1: k-grams
        self.bucket = [_Column() for _ in range(self.ngrams)]  # level k-1: k-gram id -> bucket

    def memo_size(self) -> int:
        return sum(b.size for b in self.bucket)

    def __call__(self, texts: list[str]) -> Features:
        if self.memo_size() > self.memo_limit:
            self._reset()
        words_of = [TOKEN.findall(t.lower()) for t in texts]
        lengths = np.fromiter(map(len, words_of), np.int64, len(words_of))
        words = list(chain.from_iterable(words_of))
        wid = self._word_ids(words)
        text = np.repeat(np.arange(len(texts), dtype=np.int64), lengths)
        end = np.cumsum(lengths)[text]  # per word: where its text ends
        at = np.arange(len(words), dtype=np.int64)  # where the current level's grams start
        gid = wid
        buckets = [self.bucket[0].values[wid]]
        texts_of = [text]
        for k in range(2, self.ngrams + 1):
            # a k-gram starts where k words remain in its text; its prefix is the (k-1)-gram there
            keep = at + k <= end[at]
            at, gid = at[keep], self._gram_ids(k, gid[keep], wid[at[keep] + k - 1], at[keep], words)
            buckets.append(self.bucket[k - 1].values[gid])
            texts_of.append(text[at])
        grams = sum(np.maximum(lengths - k + 1, 0) for k in range(1, self.ngrams + 1))
        return Features(np.concatenate(buckets), np.concatenate(texts_of),
                        np.asarray(grams, np.int64), self.ngrams)  # fmt: skip

    def _word_ids(self, words: list[str]) -> np.ndarray:
        # the batch's distinct words by a hash table in C; only those go through the dict
        codes, distinct = pd.factorize(np.array(words, dtype=object))
        distinct = distinct.tolist()
        ids = self.word_id
        new = [w for w in distinct if w not in ids]
        if new:
            first = self.bucket[0].extend(_buckets(new, self.num_buckets))
            ids.update(zip(new, range(first, first + len(new)), strict=True))
        return np.fromiter(map(ids.__getitem__, distinct), np.int64, len(distinct))[codes]

    def _gram_ids(
        self, k: int, prefix: np.ndarray, last: np.ndarray, at: np.ndarray, words: list[str]
    ) -> np.ndarray:
        """Ids of the k-grams starting at word positions `at` (prefix id, last word id)."""
        if not len(at):
            return np.zeros(0, np.int64)
        keys = (prefix << 32) | last  # word and gram ids stay below 2**31 (the memo is bounded)
        inverse, unique = pd.factorize(keys)  # distinct keys in first-seen order, hashed in C
        memo = self.gram_id[k - 1]
        ids = np.fromiter(map(memo.get, unique.tolist(), repeat(-1)), np.int64, len(unique))
        missing = np.flatnonzero(ids == -1)
        if len(missing):
            first = np.full(len(unique), len(inverse), np.int64)
            np.minimum.at(first, inverse, np.arange(len(inverse)))  # where each key first occurs
            grams = [" ".join(words[p : p + k]) for p in at[first[missing]].tolist()]
            start = self.bucket[k - 1].extend(_buckets(grams, self.num_buckets))
            ids[missing] = np.arange(start, start + len(missing))
            memo.update(zip(unique[missing].tolist(), ids[missing].tolist(), strict=True))
        return ids[inverse]


def _buckets(grams: list[str], num_buckets: int) -> np.ndarray:
    """The reference's `hash_buckets` of many grams, `int(sha256(utf-8 gram)) % num_buckets`, the
    hot path of a cold memo: the digests are made by C-level maps, and the 256-bit integer mod
    num_buckets is Horner's rule over the digest's 32-bit words."""
    digests = map(methodcaller("digest"), map(hashlib.sha256, map(str.encode, grams)))
    words = np.frombuffer(b"".join(digests), ">u4").reshape(len(grams), 8)
    value = np.zeros(len(grams), np.int64)
    for word in words.T:  # exact: value < num_buckets <= 2**24, so value * 2**32 + word < 2**63
        value = (value * (1 << 32) + word.astype(np.int64)) % num_buckets
    return value


class _Column:
    """A growable int64 array (amortised appends; `values` is a view of the filled part)."""

    def __init__(self) -> None:
        self._data = np.zeros(1024, np.int64)
        self.size = 0

    def extend(self, values: np.ndarray) -> int:
        """Append `values`; returns the index of the first."""
        start, end = self.size, self.size + len(values)
        if end > len(self._data):
            grown = np.zeros(max(end, 2 * len(self._data)), np.int64)
            grown[:start] = self._data[:start]
            self._data = grown
        self._data[start:end] = values
        self.size = end
        return start

    @property
    def values(self) -> np.ndarray:
        return self._data[: self.size]


def log_diff(raw_counts: np.ndarray, target_counts: np.ndarray) -> np.ndarray:
    """log(p_target + 1e-8) - log(p_raw + 1e-8), the counts normalised to sum 1 (float64);
    `target_counts` may be (K, num_buckets) for K target sets. Candidates first, then targets,
    as every engine entry point."""
    raw = np.asarray(raw_counts)
    target = np.atleast_2d(np.asarray(target_counts))
    p_raw = raw / raw.sum()
    p_target = target / target.sum(axis=1, keepdims=True)
    out = np.log(p_target + SMOOTHING) - np.log(p_raw + SMOOTHING)
    return out if np.ndim(target_counts) == 2 else out[0]


def gumbel(ids: np.ndarray, seed: int, target: int = 0) -> np.ndarray:
    """G ~ Gumbel(0, 1) per row from (seed, target set, id): -log(-log u), u = H(seed, id)."""
    u = np.asarray(hash_uniform([f"dsir{target}:{i}" for i in ids], seed), np.float64)
    with np.errstate(divide="ignore"):
        return -np.log(-np.log(u))


def split_budget(budget: int, proportions: np.ndarray) -> list[int]:
    """The reference's per-target budgets: int(budget * p) each, the remainder to the last."""
    share = [int(budget * p) for p in proportions]
    share[-1] += budget - sum(share)
    return share
