"""ReCLIP's pseudo-labelling (Hu et al., WACV 2024, Sec. 3.2): a projection that removes redundant text directions,
then label propagation from the class text embeddings over a k-nearest-neighbour graph of the images.

Pure functions (tensors in, tensors out). The graph is sparse: each point keeps its k most similar points (found in
row chunks, never an N x N matrix), so 50,000 images fit in memory; the diffusion (I - alpha W_n) F = Y is solved
per class by scipy's conjugate gradients, as the reference code does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import sparse
from scipy.sparse import linalg

CHUNK = 2048  # rows of the similarity matrix computed at once


def default_cut(num_classes: int) -> int:
    """The reference's cut_dim: 768, or 250 for more than 500 classes."""
    return 250 if num_classes > 500 else 768


def projection(class_weights: torch.Tensor, cut: int) -> torch.Tensor:
    """P = U[:, 1:cut] U[:, 1:cut]^T from the SVD of the class text matrix (D, K) = ``class_weights`` (K, D)^T: the
    span of the class embeddings without its first (class-agnostic) direction -> (D, D)."""
    u, _, _ = torch.linalg.svd(class_weights.float().T, full_matrices=False)  # (D, min(D, K))
    kept = u[:, 1:cut]
    return kept @ kept.T


def knn_graph(points: torch.Tensor, k: int) -> sparse.csr_matrix:
    """W = (A_k + A_k^T) / 2 with A = (cos + 1) / 2 restricted to each point's k nearest other points; ``points``
    (M, D) normalised."""
    m = points.shape[0]
    k = min(k, m - 1)
    rows, cols, vals = [], [], []
    for start in range(0, m, CHUNK):
        block = (points[start : start + CHUNK] @ points.T + 1) / 2  # (C, M)
        idx = torch.arange(start, min(start + CHUNK, m))
        block[torch.arange(len(idx)), idx] = 0  # no self-loops
        top = block.topk(k, dim=1)
        rows.append(idx[:, None].expand(-1, k).reshape(-1))
        cols.append(top.indices.reshape(-1))
        vals.append(top.values.reshape(-1))
    a = sparse.csr_matrix(
        (torch.cat(vals).double().numpy(), (torch.cat(rows).numpy(), torch.cat(cols).numpy())), shape=(m, m)
    )
    return ((a + a.T) / 2).tocsr()


def diffuse(w: sparse.csr_matrix, seeds: np.ndarray, alpha: float, iterations: int) -> np.ndarray:
    """Solve (I - alpha D^-1/2 W D^-1/2) F = Y by conjugate gradients (``iterations`` at most per column); ``seeds``
    Y (M, K) -> F (M, K)."""
    degree = np.asarray(w.sum(axis=1)).ravel()
    inv_sqrt = sparse.diags(1.0 / np.sqrt(np.maximum(degree, 1e-12)))
    system = sparse.identity(w.shape[0], format="csr") - alpha * (inv_sqrt @ w @ inv_sqrt)
    out = np.zeros_like(seeds, dtype=np.float64)
    for c in range(seeds.shape[1]):
        out[:, c], _ = linalg.cg(system, seeds[:, c], rtol=1e-6, maxiter=iterations)
    return out


@dataclass(frozen=True)
class Propagated:
    """Label propagation over [K class nodes; N images].

    Attributes:
        labels: (N,) the images' pseudo-labels (argmax of the diffused class scores).
        confidence: (N,) 1 - entropy / log K of the row-normalised scores (the reference's confidence).
        centroids: (K, D) normalised mean of the unprojected points (class nodes included) labelled c: ReCLIP-V's
            classifier; a class that no point took keeps its class embedding.
    """

    labels: torch.Tensor
    confidence: torch.Tensor
    centroids: torch.Tensor


def propagate(
    class_weights: torch.Tensor,
    features: torch.Tensor,
    proj: torch.Tensor,
    neighbors: int = 20,
    alpha: float = 0.99,
    iterations: int = 20,
) -> Propagated:
    """ReCLIP's label propagation: class embeddings (K, D) seed their own node; image features (N, D); both projected
    by ``proj`` (D, D) and normalised before the graph is built."""
    k = class_weights.shape[0]
    points = torch.cat([class_weights.float(), features.float()])  # (K + N, D)
    projected = F.normalize(points @ proj.float(), dim=-1)
    seeds = np.zeros((points.shape[0], k))
    seeds[np.arange(k), np.arange(k)] = 1.0  # Y: class c's own node
    scores = torch.from_numpy(diffuse(knn_graph(projected, neighbors), seeds, alpha, iterations)).float()  # (K+N, K)
    labels = scores.argmax(1)
    p = scores.clamp_min(1e-12) / scores.clamp_min(1e-12).sum(1, keepdim=True)
    confidence = 1 - (-(p * p.log()).sum(1)) / float(np.log(k))
    sums = torch.zeros(k, points.shape[1]).index_add_(0, labels, F.normalize(points, dim=-1))
    counts = torch.bincount(labels, minlength=k)
    centroids = torch.where(counts[:, None] > 0, F.normalize(sums, dim=-1), F.normalize(class_weights.float(), dim=-1))
    return Propagated(labels[k:], confidence[k:], centroids)
