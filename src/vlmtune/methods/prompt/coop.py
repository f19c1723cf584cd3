"""CoOp: context optimisation (Zhou et al., IJCV 2022; TMM paper Eq. 2).

p_i = v_1; ...; v_n; e_i with learnable context vectors v (unified or class-specific), the class token at the
end / middle / front; P(y = i | x) = softmax_i(s * cos(f_x, G(p_i))). CoOp's schedule: SGD lr 0.002, momentum 0.9,
weight decay 5e-4, batch 32, one constant warm-up epoch at 1e-5, cosine decay, epochs by shots (50 / 100 / 200).
Trained on cached image features (frozen image tower; no augmentation: see docs/fidelity.md).
"""

from __future__ import annotations

from typing import Any

from vlmtune.methods.common.prompt import TOKEN_SCALE_DOC, Position
from vlmtune.methods.common.prompt_classifier import PromptClassifier, PromptMethod
from vlmtune.methods.options import method_config, option
from vlmtune.methods.registry import register_method


@method_config
class CoOpConfig:
    n_ctx: int = option(16, "context vectors (CoOp's few-shot default; 4 with ctx_init 'a photo of a')", ge=1)
    ctx_init: str | None = option(None, "initial words, e.g. 'a photo of a' (n_ctx must equal their token count)")
    csc: bool = option(False, "class-specific context")
    position: Position = option("end", "class token position")
    lr: float = option(0.002, "SGD learning rate at batch 32 (CLIP's token-embedding scale)", gt=0)
    epochs: int | None = option(None, "epochs; none = by shots (50 / 100 / 200)", ge=1)
    batch_size: int = option(32, "images per step", ge=1)
    scale_lr: bool = option(True, "batch_size != 32: lr x batch_size / 32 (linear scaling rule)")
    token_scale: float | None = option(None, TOKEN_SCALE_DOC, gt=0)


@register_method("coop")
class CoOp(PromptMethod):
    """CoOp: learnable prompt context through the frozen text tower."""

    config_cls = CoOpConfig
    paper_batch = 32
    classifier = PromptClassifier
    supports_new_classes = True  # unified context; class-specific context cannot (raises)
    summary = "CoOp: learnable context vectors (unified or class-specific), SGD + cosine"

    def extra_settings(self) -> dict[str, Any]:
        return {"csc": self.config.csc}
