"""GRIP (Menghini et al., NeurIPS 2023): pseudo-label sets that grow to all of U (see ``fpl``)."""

from __future__ import annotations

from vlmtune.methods.common.pseudo import grip_count
from vlmtune.methods.labelfree.fpl import FixedPseudoLabelling
from vlmtune.methods.registry import register_method


@register_method("grip")
class GRIP(FixedPseudoLabelling):
    """GRIP: like IFPL with a pseudo-label set that grows each iteration to the whole unlabelled set."""

    summary = "GRIP: iterative, growing pseudo-label sets (to all of U), a new CoOp (or visual) prompt each time"

    def per_class(self, n: int, classes: int, round: int, rounds: int) -> int:
        return grip_count(n, classes, round, rounds)
