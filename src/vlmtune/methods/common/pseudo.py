"""Pseudo-labelling pieces shared by the label-free methods (UPL, IFPL, GRIP, CPL; CoFT builds on them).

Written once here: zero-shot pseudo-labels (one template or an ensemble), the two top-K-per-class rules (UPL's
"the K most confident images predicted as c" and Menghini et al.'s fill-to-K leaderboards), the iterative
re-labelling schedules of IFPL / GRIP, a random train / validation split of pseudo-labels, and the labelled shots of
the semi-supervised regime merged with the pseudo-labels. All functions are pure: tensors in, tensors out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vlmtune.backbones.base import FeatureEncoder
from vlmtune.features.extract import FeatureSet
from vlmtune.methods.common.text import class_text_weights


@dataclass(frozen=True)
class PseudoLabels:
    """A pseudo-labelled subset of the unlabelled images.

    Attributes:
        index: (M,) positions in ``Task.unlabeled``.
        labels: (M,) hard pseudo-labels.
        targets: (M, K) soft targets (candidate-set methods such as CPL), or None.
    """

    index: torch.Tensor
    labels: torch.Tensor
    targets: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.index.shape[0])

    def select(self, rows: torch.Tensor) -> PseudoLabels:
        targets = self.targets[rows] if self.targets is not None else None
        return PseudoLabels(self.index[rows], self.labels[rows], targets)


@torch.no_grad()
def zero_shot_logits(
    encoder: FeatureEncoder, classnames: Sequence[str], templates: Sequence[str], features: torch.Tensor
) -> torch.Tensor:
    """Eq. (1) of CoFT / UPL: s * cos(f_x, g_c) with g_c from one template or the mean of several -> (N, K)."""
    weights = class_text_weights(encoder, classnames, templates)  # (K, D)
    return encoder.logit_scale * features.float().cpu() @ weights.T


def top_k_per_class(scores: torch.Tensor, k: int) -> PseudoLabels:
    """UPL's rule: each image takes its argmax class; per class keep the ``k`` images predicted as it with the
    highest score (classes predicted fewer than ``k`` times keep what they have). ``scores`` (N, K): logits
    (UPL ranks by the raw max logit) or probabilities."""
    conf, pred = scores.max(dim=1)  # (N,), (N,)
    keep = []
    for c in range(scores.shape[1]):
        members = (pred == c).nonzero().flatten()
        keep.append(members[conf[members].argsort(descending=True, stable=True)[:k]])
    index = torch.cat(keep) if keep else torch.empty(0, dtype=torch.long)
    return PseudoLabels(index, pred[index])


def fill_top_k(probs: torch.Tensor, k: int, allowed: torch.Tensor | None = None) -> PseudoLabels:
    """Menghini et al.'s fill-to-K rule: every class keeps a leaderboard of its ``k`` most probable images; an image
    that misses the leaderboard of its best class moves on to its next most probable class, until every class holds
    ``k`` images (or the images run out). Each image ends in at most one class.

    Solved as deferred acceptance: unassigned images propose to their next class; each class keeps the ``k`` best
    of its holders and proposers by that class's probability. ``probs`` (N, K) -> at most K * k pseudo-labels.
    ``allowed`` (N, K) bool limits each image to its candidate classes (CPL's pools).
    """
    n, classes = probs.shape
    ranked = probs if allowed is None else probs.masked_fill(~allowed, float("-inf"))
    order = ranked.argsort(dim=1, descending=True, stable=True)  # (N, K): each image's class preferences
    limit = torch.full((n,), classes) if allowed is None else allowed.sum(dim=1)  # preferences it may use
    rank = torch.zeros(n, dtype=torch.long)  # next preference to propose to
    owner = torch.full((n,), -1, dtype=torch.long)  # class holding the image, -1 = none
    while True:  # every round advances each free image's preference: at most N * K proposals in all
        free = ((owner < 0) & (rank < limit)).nonzero().flatten()
        if len(free) == 0:
            break
        target = order[free, rank[free]]  # (F,)
        rank[free] += 1
        for c in target.unique().tolist():
            pool = torch.cat([(owner == c).nonzero().flatten(), free[target == c]])
            best = pool[probs[pool, c].argsort(descending=True, stable=True)[:k]]
            owner[pool] = -1
            owner[best] = c
    index = (owner >= 0).nonzero().flatten()
    index = index[owner[index].argsort(stable=True)]  # class-major
    return PseudoLabels(index, owner[index])


def grip_count(n: int, classes: int, iteration: int, iterations: int) -> int:
    """GRIP's pseudo-labels per class in ``iteration`` (0-based): int((t + 1) * N / iterations / C), at most N / C."""
    return max(1, min(n // classes, int((iteration + 1) * n / iterations / classes)))


def split_validation(
    labels: PseudoLabels, fraction: float, generator: torch.Generator
) -> tuple[PseudoLabels, PseudoLabels]:
    """A random ``fraction`` of the pseudo-labels as a validation set (IFPL / GRIP: 20%) -> (train, val)."""
    perm = torch.randperm(len(labels), generator=generator)
    n_val = round(len(labels) * fraction) if len(labels) >= 10 else 0
    return labels.select(perm[n_val:].sort().values), labels.select(perm[:n_val].sort().values)


def training_set(
    unlabeled_features: torch.Tensor, pseudo: PseudoLabels, labelled: FeatureSet | None, num_classes: int
) -> tuple[FeatureSet, torch.Tensor | None]:
    """The pseudo-labelled images, plus the labelled shots of the semi-supervised regime (true labels), and their
    soft targets (N, K) when the pseudo-labels have them (the labelled shots as one-hot rows), else None."""
    feats, labels, targets = unlabeled_features[pseudo.index], pseudo.labels, pseudo.targets
    if labelled is None or len(labelled) == 0:
        return FeatureSet(feats, labels), targets
    data = FeatureSet(torch.cat([feats, labelled.features.to(feats)]), torch.cat([labels, labelled.labels]))
    if targets is not None:
        targets = torch.cat([targets, torch.nn.functional.one_hot(labelled.labels, num_classes).to(targets)])
    return data, targets


def candidate_sets(probs: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """CPL's candidate pseudo-label sets (N, K) bool: the intersection of

    - intra-instance: tau = the alpha-quantile of the max probability over U; each image takes its classes in
      order of probability until their cumulative sum exceeds tau (the crossing class included, the top one always);
    - inter-instance: per class c, the images whose p_c is at least the beta-quantile of column c.
    """
    tau = float(torch.quantile(probs.max(dim=1).values, alpha))
    sorted_p, order = probs.sort(dim=1, descending=True)
    before = sorted_p.cumsum(dim=1) - sorted_p  # mass of the classes ranked above
    intra_sorted = before <= tau  # up to and including the class whose cumsum crosses tau
    intra_sorted[:, 0] = True
    intra = torch.zeros_like(intra_sorted).scatter(1, order, intra_sorted)
    inter = probs >= torch.quantile(probs, beta, dim=0, keepdim=True)  # (N, K)
    return intra & inter


def candidate_targets(probs: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Soft targets: the probabilities restricted to the candidates, renormalised (rows without candidates: 0)."""
    masked = probs * candidates
    return masked / masked.sum(dim=1, keepdim=True).clamp_min(1e-12)
