"""IFPL (Menghini et al., NeurIPS 2023): 16 pseudo-labels per class every iteration (see ``fpl``)."""

from __future__ import annotations

from vlmtune.methods.labelfree.fpl import FixedPseudoLabelling
from vlmtune.methods.registry import register_method


@register_method("ifpl")
class IFPL(FixedPseudoLabelling):
    """IFPL: iterative fixed pseudo-labelling, 16 per class filled to K, the prompt re-initialised each round."""

    summary = "IFPL: iterative top-16 (filled-to-K) pseudo-labels, a new CoOp (or visual) prompt each iteration"
