"""TMM: task-oriented multi-modal mutual learning (paper 002): class-aware text prompts + text-guided features.

CTP (Eq. 4-6): each class's prompt p_i queries the image's patch features f_x (B, P, .):
    A^t = p f_x^T (K x P per image), f_x^t = softmax(A^t) f_x (softmax over patches), p^a = p + f_x^t,
with p_i the mean token embedding of class i's prompt [v_1..v_n; e_i] and f_x^t added to every context vector
(as CoCoOp's residual), so each image gets K class-aware prompts; g^a_i = G(p^a_i).
TFT (Eq. 8-9): the patches query the class-aware text features,
    A^x = f_x (g^a)^T (P x K per image), f^a = softmax(A^x) g^a + f_x (softmax over classes),
applied to every patch and pooled by the mean over patches, with the image's global feature as the residual.
Prediction (Eq. 11): logits_i = s (cos(f, g_i) + lambda cos(f^a, g^a_i)), lambda = 0.2, with g_i = G(p_i) the
unconditioned prompts; trained with cross-entropy on Eq. 11 (SGD lr 0.002, cosine, 10 epochs).

Patch features live in the joint space (D) and prompts in token space (W); a linear map D -> W (identity at
start when D == W, as for ViT-B/16 where both are 512) brings the patches to the prompts. Everything is batched
over images and classes, so the paper's batch-size-1 limitation does not apply: the default stays the paper's
batch 1, and ``batch_size=B`` scales the lr by B (linear scaling rule) unless ``scale_lr=false``.

Ablations (paper Tables 5 and 6): ``ctp="none"`` (w/o CTP), ``tft="none"`` (w/o TFT), ``ctp="mlp"`` (MLP-PL: a
Linear-ReLU-Linear block maps the global image feature to the prompt residual, shared by all classes) and
``tft="mlp"`` (MLP-FT: the block maps each class-aware text feature to an image-feature residual).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from vlmtune.methods.common.prompt import mlp
from vlmtune.methods.common.prompt_classifier import ImagePromptConfig, PromptClassifier, PromptMethod
from vlmtune.methods.options import method_config, option
from vlmtune.methods.registry import register_method

VARIANTS = ("attention", "mlp", "none")
Variant = Literal["attention", "mlp", "none"]


@method_config
class TMMConfig(ImagePromptConfig):
    lam: float = option(0.2, "lambda of Eq. (11)", ge=0)
    ctp: Variant = option("attention", "class-aware text prompts: attention (CTP), mlp (MLP-PL) or none")
    tft: Variant = option("attention", "text-guided feature tuning: attention (TFT), mlp (MLP-FT) or none")


def class_aware_prompts(p: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """CTP, Eq. (4)-(5): class queries p (K, W), patch keys (B, P, W) -> f_x^t (B, K, W)."""
    attn = torch.einsum("kw,bpw->bkp", p, keys)  # A^t = p f_x^T, Eq. (4)
    return torch.softmax(attn, dim=-1) @ keys  # softmax over the patches, Eq. (5)


def text_guided_features(patches: torch.Tensor, text: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """TFT, Eq. (8)-(9): patches (B, P, D) query class-aware text (B, K, D) -> f^a (B, D), mean over patches."""
    attn = torch.einsum("bpd,bkd->bpk", patches, text)  # A^x = f_x (g^a)^T, Eq. (8)
    guided = torch.softmax(attn, dim=-1) @ text  # softmax over the classes: (B, P, D)
    return guided.mean(1) + residual  # Eq. (9), pooled over patches


class TMMHead(nn.Module):
    def __init__(self, embed_dim: int, width: int, ctp: str, tft: str) -> None:
        super().__init__()
        if ctp not in VARIANTS or tft not in VARIANTS:
            raise ValueError(f"ctp and tft must be one of {VARIANTS}")
        self.ctp, self.tft = ctp, tft
        self.to_tokens = nn.Linear(embed_dim, width, bias=False)  # patches (D) -> token space (W)
        if embed_dim == width:
            with torch.no_grad():
                self.to_tokens.weight.copy_(torch.eye(width))
        self.mlp_pl = mlp(embed_dim, width) if ctp == "mlp" else None
        self.mlp_ft = mlp(embed_dim, embed_dim) if tft == "mlp" else None


class TMMClassifier(PromptClassifier):
    needs_patches: ClassVar[bool] = True
    prompts_per_image: ClassVar[bool] = True  # K prompts per image: a pass is bounded by eval_prompts

    @classmethod
    def build_head(cls, settings: dict[str, Any]) -> nn.Module:
        return TMMHead(settings["embed_dim"], settings["width"], settings["ctp"], settings["tft"])

    def class_queries(self) -> torch.Tensor:
        """p_i: mean token embedding of class i's prompt (context, name, period) -> (K, W), in CLIP's token units."""
        a = self.assembler
        e = a.embeds(self.ctx) / a.scale  # (K, L', W)
        pos = torch.arange(e.shape[1], device=e.device)
        mask = ((pos >= 1) & (pos < a.eot.to(e.device)[:, None])).to(e.dtype)  # (K, L')
        return (e * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)

    def forward_logits(self, features: torch.Tensor, patches: torch.Tensor | None) -> torch.Tensor:
        head = self.head
        assert isinstance(head, TMMHead) and patches is not None
        f = F.normalize(features, dim=-1)  # (B, D)
        fx = F.normalize(patches, dim=-1)  # (B, P, D)
        k = len(self.classnames)
        g = self.text_features()  # G(p_i): (K, D)
        if head.ctp == "none":
            g_a = g.expand(len(f), -1, -1)  # (B, K, D)
        else:
            if head.ctp == "attention":
                residual = class_aware_prompts(self.class_queries(), head.to_tokens(fx))  # f_x^t: (B, K, W)
            else:
                assert head.mlp_pl is not None
                residual = head.mlp_pl(f)[:, None].expand(-1, k, -1)  # MLP-PL: (B, K, W)
            ctx = self.ctx[None, None] + residual[:, :, None, :]  # p^a = p + f_x^t, Eq. (6): (B, K, n, W)
            g_a = self.assembler.encode(ctx)  # G(p^a): (B, K, D)
        base = torch.einsum("bd,kd->bk", f, g)  # cos(f, g_i)
        if head.tft == "mlp":
            assert head.mlp_ft is not None
            f_a = F.normalize(f[:, None] + head.mlp_ft(g_a), dim=-1)  # MLP-FT: (B, K, D)
            aug = (f_a * g_a).sum(-1)
        else:
            f_a = text_guided_features(fx, g_a, f) if head.tft == "attention" else f  # (B, D)
            aug = torch.einsum("bd,bkd->bk", F.normalize(f_a, dim=-1), g_a)  # cos(f^a, g^a_i)
        return self.scale * (base + self.settings["lam"] * aug)  # Eq. (11)


@register_method("tmm")
class TMM(PromptMethod):
    """TMM: class-aware text prompts (CTP) + text-guided feature tuning (TFT), fused prediction (Eq. 11)."""

    config_cls = TMMConfig
    paper_batch = 1
    classifier = TMMClassifier
    needs_patches = True
    summary = "TMM: class-aware text prompts + text-guided feature tuning (paper 002), batched"

    def extra_settings(self) -> dict[str, Any]:
        cfg = self.config
        return {"lam": cfg.lam, "ctp": cfg.ctp, "tft": cfg.tft}
