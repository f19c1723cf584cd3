"""BBT: black-box tuning (Sun et al., ICML 2022) applied to a VLM, as the CraFT papers' baseline.

CMA-ES over z in a random subspace, prompt p = p0 + A z (CraFT Eq. 1-2), fitness = cross-entropy of the
black box's outputs; the returned prompt is the search distribution's mean E_z[p0 + A z]. Same hyper-parameters
as CraFT ("we set its hyper-parameters the same as CraFT"); it runs CraFT's trainer with the head switched off.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, ClassVar

import torch

from vlmtune.blackbox.api import BlackBoxVLM
from vlmtune.methods.api import Task
from vlmtune.methods.blackbox.base import BlackBoxClassifier
from vlmtune.methods.blackbox.craft import (
    CRAFT_PRESETS,
    BBTConfig,
    BlackBoxMethod,
    CollaborativeTrainer,
    CraftConfig,
    trainer_run,
)
from vlmtune.methods.options import filter_preset
from vlmtune.methods.registry import register_method


@register_method("bbt")
class BBT(BlackBoxMethod):
    """Black-box tuning: CMA-ES over a random subspace of the prompt context, cross-entropy fitness."""

    config_cls = BBTConfig
    classifier = BlackBoxClassifier
    presets: ClassVar[dict[str, dict[str, Any]]] = {  # CraFT's, minus the head options (CARROT is CraFT's head)
        **{name: filter_preset(p, BBTConfig) for name, p in CRAFT_PRESETS.items() if name != "carrot"},
        # paper 001 Table 9's "Yu et al. 2023": BBT over text and visual prompts (5 tokens, a 100-d visual subspace)
        "yu2023": {"visual_prompt": True},
    }
    summary = "BBT: CMA-ES over a random subspace of the prompt context (black box)"

    def fit(self, handle: BlackBoxVLM, task: Task, *, generator: torch.Generator) -> BlackBoxClassifier:
        cfg = CraftConfig(**asdict(self.config), use_head=False)
        return trainer_run(CollaborativeTrainer(cfg, handle, task, generator, BlackBoxClassifier), self)
