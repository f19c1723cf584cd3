"""CoOp: context optimisation (Zhou et al., IJCV 2022; TMM paper Eq. 2).

p_i = v_1; ...; v_n; e_i with learnable context vectors v (unified or class-specific), the class token at the
end / middle / front; P(y = i | x) = softmax_i(s * cos(f_x, G(p_i))). CoOp's schedule: SGD lr 0.002, momentum 0.9,
weight decay 5e-4, batch 32, one constant warm-up epoch at 1e-5, cosine decay, epochs by shots (50 / 100 / 200).
Trained on cached image features (frozen image tower; no augmentation: see docs/fidelity.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlmtune.backbones.base import Backbone, Capability
from vlmtune.methods._prompt import Schedule, coop_epochs
from vlmtune.methods._prompt_clf import PromptClassifier, fit_prompt_classifier
from vlmtune.methods.base import Method, Task, register_method


@dataclass(frozen=True)
class CoOpConfig:
    n_ctx: int = 16  # CoOp's few-shot default (4 with ctx_init "a photo of a")
    ctx_init: str | None = None  # e.g. "a photo of a" (then n_ctx must equal its token count)
    csc: bool = False  # class-specific context
    position: str = "end"  # class token position: end / middle / front
    lr: float = 0.002
    epochs: int | None = None  # None = by shots (50 / 100 / 200)
    batch_size: int = 32


class CoOpClassifier(PromptClassifier):
    pass


def schedule_for(cfg: CoOpConfig | object, task: Task, default_epochs: int | None = None) -> Schedule:
    train = task.train
    shots = max(1, len(train) // max(1, task.num_classes)) if train is not None else 1
    epochs = getattr(cfg, "epochs", None) or default_epochs or coop_epochs(shots)
    return Schedule(lr=cfg.lr, epochs=epochs, batch_size=cfg.batch_size)  # type: ignore[attr-defined]


@register_method("coop")
class CoOp(Method):
    """CoOp: learnable prompt context through the frozen text tower."""

    capability = Capability.WHITE_BOX
    config_cls = CoOpConfig
    classifier = CoOpClassifier
    supports_new_classes = True  # unified context; class-specific context cannot (raises)
    summary = "CoOp: learnable context vectors (unified or class-specific), SGD + cosine"

    def fit(self, handle: Backbone, task: Task, *, generator: torch.Generator) -> CoOpClassifier:
        cfg = self.config
        settings = {"n_ctx": cfg.n_ctx, "position": cfg.position, "csc": cfg.csc}
        clf = fit_prompt_classifier(
            CoOpClassifier, handle, task, settings, cfg.ctx_init, schedule_for(cfg, task), generator
        )
        assert isinstance(clf, CoOpClassifier)
        return clf
