"""Machinery shared by the black-box methods (BBT, CraFT, BlackVIP): subspace prompts, CMA-ES, queries within the
box's limits, the black-box classifier.

Imports only the black-box API: never a backbone, open_clip or transformers (import-linter contract).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from vlmtune.blackbox.api import BlackBoxVLM, ImageRefs, PredictRequest
from vlmtune.methods.api import Classifier

with warnings.catch_warnings():  # pycma warns at import when matplotlib is absent (its plots only; not used here)
    warnings.filterwarnings("ignore", message="Could not import matplotlib", category=UserWarning)
    import cma


@dataclass(frozen=True)
class SubspacePrompt:
    """p = p0 + A z (Eq. 1): A is a fixed random (n_ctx * d_tok, d0) map; the box adds A z to p0 ("add" mode)."""

    a: np.ndarray  # (n_ctx * d_tok, d0)
    n_ctx: int
    d_tok: int

    @classmethod
    def sample(cls, n_ctx: int, d_tok: int, d0: int, std: float, rng: np.random.Generator) -> SubspacePrompt:
        return cls(rng.normal(0.0, std, size=(n_ctx * d_tok, d0)).astype(np.float32), n_ctx, d_tok)

    def contexts(self, z: np.ndarray) -> np.ndarray:
        """Subspace points (C, d0) -> prompt offsets (C, n_ctx, d_tok)."""
        return (np.asarray(z, dtype=np.float32) @ self.a.T).reshape(-1, self.n_ctx, self.d_tok)


@dataclass(frozen=True)
class PromptSpace:
    """What CMA-ES searches: the text subspace (Eq. 1) and, for "+ vp" (CraFT App. B), a visual subspace.

    One CMA-ES runs over the concatenation [z_text; z_vis] (as in Yu et al. 2023, whose visual prompts CraFT's
    App. B adopts); visual prompt tokens are A_v z_vis (there is no initial visual prompt to add them to).
    """

    text: SubspacePrompt
    visual: SubspacePrompt | None = None

    @property
    def dim(self) -> int:
        return self.text.a.shape[1] + (self.visual.a.shape[1] if self.visual is not None else 0)

    def split(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Points (C, dim) -> text offsets (C, n_ctx, d_tok) and visual tokens (C, n_v, d_vis) or None."""
        z = np.atleast_2d(np.asarray(z, dtype=np.float32))
        d = self.text.a.shape[1]
        return self.text.contexts(z[:, :d]), self.visual.contexts(z[:, d:]) if self.visual is not None else None


def make_cma(d0: int, sigma0: float, popsize: int, bounds: float | None, seed: int) -> cma.CMAEvolutionStrategy:
    """pycma's CMA-ES (Eq. 2) from m = 0, drawing from its own seeded generator (no global RNG)."""
    rng = np.random.default_rng(seed)
    opts: dict[str, Any] = {
        "popsize": popsize,
        "seed": np.nan,  # do not touch numpy's global RNG
        "randn": lambda lam, n: rng.standard_normal((lam, n)),
        "verbose": -9,
    }
    if bounds is not None:
        opts["bounds"] = [-bounds, bounds]
    return cma.CMAEvolutionStrategy(np.zeros(d0), sigma0, opts)


@dataclass(frozen=True)
class ScorePart:
    """One request's reply: the scores (c, n, K) of candidates ``candidates`` on images ``images``."""

    candidates: slice
    images: slice
    scores: torch.Tensor


def _candidates(*arrays: np.ndarray | None) -> int:
    """C, the candidates of a request's per-candidate arrays (1 when it has none)."""
    return next((len(a) for a in arrays if a is not None), 1)


def score_parts(
    box: BlackBoxVLM,
    ids: Sequence[str],
    classnames: Sequence[str],
    template: str,
    contexts: np.ndarray | None = None,
    visual_contexts: np.ndarray | None = None,
    pixel_prompts: np.ndarray | None = None,
) -> Iterator[ScorePart]:
    """Scores of C candidates (contexts (C, n_ctx, W), visual tokens (C, n_v, W_v), pixel prompts (C, N, 3, S, S))
    on N images, in requests within the box's advertised limits: images split so that one candidate fits a
    request, then candidates. A reply is used before the next request is sent, so a caller that reduces each part
    never holds (C, N, K) at once (CraFT at K = 1,000: 40 x 16,000 x 1,000 scores would be 2.6 GB). Each request
    charges its candidates: C queries per image part."""
    lim = box.info().service_limits
    k, n, c = len(classnames), len(ids), _candidates(contexts, visual_contexts, pixel_prompts)
    pixels = int(np.prod(pixel_prompts.shape[2:])) if pixel_prompts is not None else 0
    reencoded = visual_contexts is not None
    step = max(1, min(n, lim.images_per_request(k, pixels, reencoded)))
    for i in range(0, n, step):
        images = slice(i, min(i + step, n))
        per = max(1, min(c, lim.candidates_per_request(images.stop - i, k, pixels, reencoded)))
        for j in range(0, c, per):
            cut = slice(j, min(j + per, c))
            request = PredictRequest(
                list(ids[images]),
                list(classnames),
                template,
                contexts[cut] if contexts is not None else None,
                visual_contexts=visual_contexts[cut] if visual_contexts is not None else None,
                pixel_prompts=pixel_prompts[cut, images] if pixel_prompts is not None else None,
            )
            yield ScorePart(cut, images, torch.as_tensor(box.predict(request), dtype=torch.float32))


def image_parts(box: BlackBoxVLM, n: int, classes: int, visual: bool = False) -> int:
    """Requests one candidate's scores on ``n`` images take (each charges the candidate once)."""
    step = max(1, box.info().service_limits.images_per_request(classes, reencoded=visual))
    return -(-n // step)


def _gather(c: int, n: int, k: int, parts: Iterator[ScorePart]) -> torch.Tensor:
    out = torch.empty(c, n, k)  # (C, N, K), filled part by part
    for part in parts:
        out[part.candidates, part.images] = part.scores
    return out


def query_scores(
    box: BlackBoxVLM,
    refs: ImageRefs,
    classnames: Sequence[str],
    template: str,
    contexts: np.ndarray | None,
    visual_contexts: np.ndarray | None = None,
) -> torch.Tensor:
    """Scores (C, N, K) from the box as a float tensor (C queries per image part: ``score_parts``)."""
    parts = score_parts(box, refs.ids, classnames, template, contexts, visual_contexts)
    return _gather(_candidates(contexts, visual_contexts), len(refs), len(classnames), parts)


PIXEL_CHUNK = 256  # images a client prompts per pass when it scores a split with pixel prompts (BlackVIP)


def query_pixel_scores(
    box: BlackBoxVLM, ids: Sequence[str], classnames: Sequence[str], template: str, prompts: np.ndarray
) -> torch.Tensor:
    """Scores (C, N, K) for per-image pixel prompts (C, N, 3, S, S) (``score_parts``)."""
    parts = score_parts(box, ids, classnames, template, pixel_prompts=prompts)
    return _gather(prompts.shape[0], prompts.shape[1], len(classnames), parts)


class BlackBoxClassifier(Classifier):
    """A learned prompt offset (added to the template context by the box), optional visual prompt tokens, and an
    optional refinement head.

    The head is held at float16 precision (values rounded, computed in float32) so that the saved artifact, stored
    as float16, predicts exactly what was evaluated and stays under 1 MB for K <= 100 with the paper's head.
    """

    context: torch.Tensor  # buffers (n_ctx, d_tok) and (n_v, d_vis) or empty
    visual_context: torch.Tensor

    storage_dtype = torch.float16

    def __init__(
        self,
        classnames: Sequence[str],
        template: str,
        context: torch.Tensor | None,
        head: nn.Module | None = None,
        head_meta: dict[str, Any] | None = None,
        visual_context: torch.Tensor | None = None,
    ) -> None:
        super().__init__(classnames)
        self.template = template
        ctx = context.half().float() if context is not None else torch.zeros(0)
        self.register_buffer("context", ctx)  # (n_ctx, d_tok), float16 precision like the head
        vctx = visual_context.half().float() if visual_context is not None else torch.zeros(0)
        self.register_buffer("visual_context", vctx)  # (n_v, d_vis) or empty
        self.head = head
        self.head_meta = head_meta or {}
        if head is not None:
            with torch.no_grad():
                for p in head.parameters():
                    p.copy_(p.half().float())

    def refine(self, scores: torch.Tensor) -> torch.Tensor:
        """Black-box scores (N, K) -> final logits (N, K)."""
        return self.head(scores) if self.head is not None else scores

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        raise TypeError("a black-box adapter predicts through the black box: use predict_blackbox(box, refs)")

    @property
    def uses_visual_prompts(self) -> bool:
        return bool(self.visual_context.numel())

    def box_options(self) -> dict[str, Any]:
        """What a box must accept to serve this adapter (``LocalBlackBox`` keyword arguments)."""
        return {"visual_prompts": self.uses_visual_prompts}

    @property
    def encoder_spec(self) -> str | None:
        """The backbone spec of a client-side image encoder the adapter computes prompts with (BlackVIP), or None."""
        return None

    @property
    def encoder_bound(self) -> bool:
        """Whether the encoder ``encoder_spec`` names is attached (always, for adapters without one)."""
        return True

    def bind_encoder(self, encoder: Any) -> None:
        """Attach the client-side encoder named by ``encoder_spec`` (loaded by the caller; methods load no model)."""

    def predict_blackbox(self, box: BlackBoxVLM, refs: ImageRefs) -> torch.Tensor:
        ctx = self.context.numpy()[None] if self.context.numel() else None
        vctx = self.visual_context.numpy()[None] if self.uses_visual_prompts else None
        with torch.no_grad():
            return self.refine(query_scores(box, refs, self.classnames, self.template, ctx, vctx)[0])

    def extra_meta(self) -> dict[str, Any]:
        return {"template": self.template, "head": self.head_meta}

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> BlackBoxClassifier:
        from vlmtune.methods.blackbox.refine import RefinementHead

        head_meta = meta.get("head") or {}
        head = RefinementHead(**head_meta) if head_meta else None
        tensors = {"visual_context": torch.zeros(0), **tensors}  # adapters saved before visual prompts existed
        vctx = tensors["visual_context"] if tensors["visual_context"].numel() else None
        clf = cls(meta["classnames"], meta["template"], tensors["context"], head, head_meta, vctx)
        clf.load_state_dict(tensors)
        return clf
