"""Splits that cannot leak: near-duplicates and one patient's images stay together.

BUSI holds near-duplicate images (the same lesion cropped differently, with and
without calipers), so a random image-level split puts copies of one lesion on both
sides and flatters the model. Records are therefore grouped twice over: by their own
``group`` key (patient, study) and by a perceptual hash, the two merged by
union-find; whole groups are then assigned to train or test (or folds), stratified by
class. Split before augmenting: augmented copies never exist at split time.

Perceptual hash: the 8 x 8 lowest frequencies of the 2-D DCT of the image shrunk to
32 x 32, each bit = coefficient above the median of the 63 AC ones (the classic
pHash). Two images are near-duplicates when their hashes differ in at most
:data:`MAX_HAMMING` of 64 bits. 8 was chosen by measurement on the synthetic
phantom (900 images of 300 patients, 96 px): brightened, gamma-changed, noisy,
re-encoded (JPEG q60) or rescaled copies stay within 4 bits of the original, copies
re-cropped by up to 2 % per side within 6 (3 % crops reach 12: beyond reach), small
burned-in annotations within about 10; unrelated images are 28 bits apart at the
median and 15 of 404,000 pairs (0.004 %) fall within 8 - harmless false merges
that only coarsen the groups. The shared layered anatomy makes ultrasound hashes
closer than photographs' usual ~32 bits, so the usual threshold of 10 would merge
~4x more unrelated pairs.
"""

from __future__ import annotations

from dataclasses import replace
from functools import cache

import numpy as np
from PIL import Image

from service.datasets.records import CLASSES, Record

MAX_HAMMING = 8
_HASH_SIDE, _LOW = 32, 8


@cache
def _dct_matrix(n: int) -> np.ndarray:
    """Orthonormal DCT-II matrix: ``D @ x`` is the DCT of column vector ``x``."""
    k = np.arange(n)[:, None]
    matrix = np.cos(np.pi * (2 * np.arange(n)[None, :] + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    matrix[0] /= np.sqrt(2.0)
    return matrix


def perceptual_hash(image: np.ndarray) -> int:
    """64-bit pHash of a uint8 grayscale image (robust to scale, gain and mild noise)."""
    small = np.asarray(Image.fromarray(image).resize((_HASH_SIDE, _HASH_SIDE), Image.Resampling.BOX), dtype=np.float64)
    dct = _dct_matrix(_HASH_SIDE)
    low = (dct @ small @ dct.T)[:_LOW, :_LOW].ravel()
    bits = low > np.median(low[1:])
    return int(np.packbits(bits).view(">u8")[0])


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


class _UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, i: int, j: int) -> None:
        ri, rj = self.find(i), self.find(j)
        if ri != rj:
            self.parent[max(ri, rj)] = min(ri, rj)


def near_duplicate_groups(records: list[Record], max_distance: int = MAX_HAMMING) -> list[str]:
    """The split group of every record: records sharing a ``group`` key or whose
    pHashes are within ``max_distance`` bits (transitively) get one key, the
    smallest member key, so the result is stable whatever the record order."""
    if not 0 <= max_distance <= 64:
        raise ValueError(f"max_distance must be 0..64 bits, got {max_distance}")
    n = len(records)
    sets = _UnionFind(n)
    first_of: dict[str, int] = {}
    for i, record in enumerate(records):
        sets.union(first_of.setdefault(record.group, i), i)
    hashes = np.array([perceptual_hash(r.image) for r in records], dtype=np.uint64)
    for start in range(0, n, 1024):  # pairwise Hamming distances, a block of rows at a time
        block = np.bitwise_count(hashes[start : start + 1024, None] ^ hashes[None, :])
        for i, j in np.argwhere(block <= max_distance):
            if start + i < j:
                sets.union(int(start + i), int(j))
    key_of: dict[int, str] = {}
    for i, record in enumerate(records):
        root = sets.find(i)
        key_of[root] = min(key_of.get(root, record.group), record.group)
    return [key_of[sets.find(i)] for i in range(n)]


def with_near_duplicate_groups(records: list[Record], max_distance: int = MAX_HAMMING) -> list[Record]:
    """The records with their ``group`` replaced by :func:`near_duplicate_groups`."""
    groups = near_duplicate_groups(records, max_distance)
    return [replace(r, group=g) for r, g in zip(records, groups, strict=True)]


def _group_table(records: list[Record], max_distance: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Member indices of each group and its per-class image counts (G x C)."""
    members: dict[str, list[int]] = {}
    for i, key in enumerate(near_duplicate_groups(records, max_distance)):
        members.setdefault(key, []).append(i)
    indices = [np.array(m) for m in members.values()]
    counts = np.zeros((len(indices), len(CLASSES)), np.int64)
    for g, idx in enumerate(indices):
        np.add.at(counts[g], [records[i].label for i in idx], 1)
    return indices, counts


def _assign(counts: np.ndarray, targets: np.ndarray, seed: int) -> np.ndarray:
    """Greedy stratified assignment of groups to bins with target shares.

    Groups go largest first (random order among equals, so the seed matters) to the
    bin whose per-class shortfall against its target, weighted by the group's class
    mix, is largest; classes are weighed equally whatever their size."""
    totals = np.maximum(counts.sum(axis=0), 1)
    order = np.random.default_rng(seed).permutation(len(counts))
    order = order[np.argsort(-counts[order].sum(axis=1), kind="stable")]
    filled = np.zeros((len(targets), counts.shape[1]))
    assignment = np.empty(len(counts), np.int64)
    for g in order:
        shortfall = (targets[:, None] * totals - filled) / totals
        best = int(np.argmax(shortfall @ counts[g]))
        assignment[g] = best
        filled[best] += counts[g]
    return assignment


def _check_groups(records: list[Record], n_groups: int, needed: int, what: str) -> None:
    if not records:
        raise ValueError("cannot split an empty list of records")
    if n_groups < needed:
        raise ValueError(
            f"{what} needs at least {needed} independent groups, the records form "
            f"{n_groups} (near-duplicates and shared patients are merged)"
        )


def stratified_split(
    records: list[Record], test_fraction: float = 0.2, seed: int = 0, max_distance: int = MAX_HAMMING
) -> tuple[np.ndarray, np.ndarray]:
    """Stratified group split: (train indices, test indices), each sorted.

    About ``test_fraction`` of every class is in test; no group (patient, study or
    near-duplicate cluster) is on both sides."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be between 0 and 1, got {test_fraction}")
    indices, counts = _group_table(records, max_distance)
    _check_groups(records, len(indices), 2, "a train/test split")
    side = _assign(counts, np.array([1.0 - test_fraction, test_fraction]), seed)
    if side.min() == side.max():
        side[np.argmin(counts.sum(axis=1))] = 1 - side[0]  # never leave one side empty
    train = np.sort(np.concatenate([indices[g] for g in np.flatnonzero(side == 0)]))
    test = np.sort(np.concatenate([indices[g] for g in np.flatnonzero(side == 1)]))
    return train, test


def stratified_group_kfold(
    records: list[Record], k: int = 5, seed: int = 0, max_distance: int = MAX_HAMMING
) -> list[tuple[np.ndarray, np.ndarray]]:
    """``k`` (train, test) index pairs: every record is tested exactly once, each
    fold's class mix is close to the whole's, and no group spans train and test."""
    if k < 2:
        raise ValueError(f"k-fold needs k >= 2, got {k}")
    indices, counts = _group_table(records, max_distance)
    _check_groups(records, len(indices), k, f"{k}-fold cross-validation")
    fold = _assign(counts, np.full(k, 1.0 / k), seed)
    folds = []
    for f in range(k):
        test_groups = np.flatnonzero(fold == f)
        if test_groups.size == 0:
            raise ValueError(f"fold {f} of {k} got no group; use fewer folds")
        test = np.sort(np.concatenate([indices[g] for g in test_groups]))
        train = np.sort(np.concatenate([indices[g] for g in np.flatnonzero(fold != f)]))
        folds.append((train, test))
    return folds
