"""The prediction refinement head of CraFT (Eq. 3): Y_O = Y_I + R(Y_I)."""

from __future__ import annotations

import torch
from torch import nn


class RefinementHead(nn.Module):
    """R: an MLP on the K black-box scores, added back to them when ``residual`` (Eq. 3)."""

    def __init__(self, k: int, hidden: int, layers: int, residual: bool = True) -> None:
        super().__init__()
        dims = [k] + [hidden] * (layers - 1) + [k]
        mods: list[nn.Module] = []
        for i in range(layers):
            mods.append(nn.Linear(dims[i], dims[i + 1]))
            if i < layers - 1:
                mods.append(nn.ReLU())
        self.net = nn.Sequential(*mods)
        self.residual = residual

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        r = self.net(scores)  # (N, K) residual R(Y_I)
        return scores + r if self.residual else r  # Eq. (3)
