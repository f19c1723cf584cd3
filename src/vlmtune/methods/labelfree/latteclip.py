"""LatteCLIP (Cao et al., paper 004): unsupervised CLIP fine-tuning with LMM-written texts and momentum prototypes.

Per image three texts (Sec. 3.1): T^class = the template with its pseudo-label, T^image = the LMM's description of
the image, T^group = its description of a 2x2 collage of images sharing the zero-shot pseudo-label (from
``Task.texts``, the text-generation stage). Prototypes start at the T^class features. For each batch: the dual
pseudo-labels c_zs (frozen model, once) and c_ft (the model being fine-tuned, against the prototypes); the Dynamic
Feature Mixer weights each text by top1 - top2 of its cosine to the prototypes (Eq. 1) and blends the weighted mean
with the prototype (Eq. 2, alpha); CLIP's contrastive loss between f(x) and each prototype-text embedding (Eq. 3),
L_zs + L_ft; after each step the prototypes of the batch's pseudo-labels move by momentum mu towards the batch mean
of their prototype-text embeddings. Both towers are fine-tuned; prediction = the nearest prototype (cosine).
Equations -> code: docs/methods/latteclip.md; reference-code variants and our choices: docs/fidelity.md.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F

from vlmtune.backbones.base import Backbone
from vlmtune.capabilities import Capability
from vlmtune.methods.api import Method, Task
from vlmtune.methods.common.tower import TowerClassifier
from vlmtune.methods.labelfree.base import PSEUDO_TEMPLATE_DOC, pseudo_templates
from vlmtune.methods.labelfree.contrastive import (
    ContrastiveConfig,
    EpochLabels,
    both_towers,
    clip_loss,
    fit_both_towers,
    frozen_pseudo_labels,
    tower_adapter,
)
from vlmtune.methods.options import method_config, option
from vlmtune.methods.registry import register_method

Texts = Literal["class", "class+image", "class+group", "class+image+group", "image+group", "image", "group"]


@method_config
class LatteCLIPConfig(ContrastiveConfig):
    template: str = option(
        "a photo of a {}.", PSEUDO_TEMPLATE_DOC + " (T^class and c_zs; paper: 'a photo of a [class].')"
    )
    texts: Texts = option("class+image+group", "the descriptions the mixer blends (Table 2's rows)")
    alpha: float = option(0.99, "alpha: the prototype's weight in Eq. (2)", ge=0, le=1)
    momentum: float = option(0.99, "mu: momentum of the prototype update", ge=0, le=1)
    mixer: bool = option(True, "Dynamic Feature Mixer (Eq. 1); false = equal text weights (Table 3)")
    use_zs: bool = option(True, "L_zs: the zero-shot pseudo-label's loss (Table 3)")
    use_ft: bool = option(True, "L_ft: the fine-tuned model's pseudo-label's loss (Table 3)")
    momentum_update: bool = option(True, "update the prototypes (false: fixed at T^class)")
    update_from: Literal["prototype-text", "texts"] = option(
        "prototype-text",
        "what the update moves p_c towards: the prototype-text embeddings t of Eq. (2), or the weighted text "
        "features alone (Table 3's 'w/o momentum update': mu = 0 replaces p_c by them)",
    )
    normalize_prototypes: bool = option(False, "renormalise prototypes after each update (the reference code)")
    group_size: int = option(4, "images per group description (paper: 4, 2x2 collage)", ge=1)


class LatteCLIPClassifier(TowerClassifier):
    """The prototypes (K, D) as a cosine head on the fine-tuned image tower."""


ABLATIONS: dict[str, dict[str, Any]] = {
    "class-only": {"texts": "class"},
    "class+image": {"texts": "class+image"},
    "class+group": {"texts": "class+group"},
    "image+group": {"texts": "image+group"},  # Table 2's rows without T^class (the generated texts alone)
    "image-only": {"texts": "image"},
    "group-only": {"texts": "group"},
    "no-mixer": {"mixer": False},
    "no-zs": {"use_zs": False},
    "no-ft": {"use_ft": False},
    "no-momentum": {"momentum": 0.0, "update_from": "texts"},  # Table 3: p_c <- the new weighted text features
    "fixed-prototypes": {"momentum_update": False},  # ours: p_c stays at T^class
    # the code: p_c <- normalize(batch mean of t), i.e. mu = 0 on t (alpha is the only momentum), renormalised
    "reference": {"template": "dataset", "momentum": 0.0, "normalize_prototypes": True},
}


def mixer_weights(feats: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """Eq. (1): top1 - top2 of the cosines of text features (B, D) to the prototypes (K, D) -> (B,)."""
    cos = F.normalize(feats, dim=-1) @ F.normalize(prototypes, dim=-1).T  # (B, K)
    top = cos.topk(2, dim=-1).values  # (B, 2)
    return top[:, 0] - top[:, 1]


def mixed_text(parts: list[torch.Tensor], prototypes: torch.Tensor, mixer: bool) -> torch.Tensor:
    """The weighted text features of Eq. (2), sum_i w_i g(T_i) / sum_i w_i, for ``parts`` (each (B, D)); w from
    Eq. (1) (detached) or 1 without the mixer -> (B, D)."""
    protos = prototypes.detach()
    if mixer:
        w = torch.stack([mixer_weights(p.detach(), protos) for p in parts], 1) + 1e-6  # (B, I)
    else:
        w = torch.ones(len(parts[0]), len(parts), device=protos.device)
    return (w[:, :, None] * torch.stack(parts, 1)).sum(1) / w.sum(1, keepdim=True)  # (B, D)


def prototype_text(mix: torch.Tensor, prototypes: torch.Tensor, labels: torch.Tensor, alpha: float) -> torch.Tensor:
    """Eq. (2): t = (1 - alpha) mix + alpha p_c for the weighted text features ``mix`` (B, D) (``mixed_text``) and
    pseudo-labels ``labels`` (B,) -> (B, D)."""
    return (1 - alpha) * mix + alpha * prototypes.detach()[labels]


@torch.no_grad()
def momentum_update(
    prototypes: torch.Tensor, labels: torch.Tensor, embeds: torch.Tensor, mu: float, normalize: bool
) -> None:
    """p_c <- (1 - mu) mean{t : label c in the batch} + mu p_c for every class in ``labels`` (in place)."""
    k = prototypes.shape[0]
    sums = torch.zeros_like(prototypes).index_add_(0, labels, embeds.float())  # (K, D)
    counts = torch.bincount(labels, minlength=k).float()  # (K,)
    seen = counts > 0
    batch_mean = sums[seen] / counts[seen, None]
    prototypes[seen] = (1 - mu) * batch_mean + mu * prototypes[seen]
    if normalize:
        prototypes[seen] = F.normalize(prototypes[seen], dim=-1)


@register_method("latteclip")
class LatteCLIP(Method):
    """LatteCLIP: fine-tune both towers on LMM-written texts blended into momentum class prototypes."""

    config_cls = LatteCLIPConfig
    classifier = LatteCLIPClassifier
    capability = Capability.WHITE_BOX
    needs_labels = False
    default_shots = 0
    supports_new_classes = False  # the prototypes are learned for these classes
    summary = "LatteCLIP: LMM image / group descriptions + class texts mixed into momentum prototypes, both towers"
    presets: ClassVar[dict[str, dict[str, Any]]] = ABLATIONS

    def wants_images(self) -> bool:
        return True

    def fit(self, handle: Backbone, task: Task, *, generator: torch.Generator) -> LatteCLIPClassifier:
        cfg = self.config
        templates = pseudo_templates(task, cfg.template)
        class_weights, c_zs = frozen_pseudo_labels(
            "latteclip", handle, task, templates, self.hooks
        )  # T^class features (K, D)
        n = len(c_zs)
        kinds = cfg.texts.split("+")
        image_texts = group_texts = None
        if ("image" in kinds or "group" in kinds) and task.texts is None:
            self.hooks.note("LatteCLIP: no text-generation stage in this run; trained on the class texts alone")
            kinds = ["class"]
        if "image" in kinds:
            assert task.texts is not None
            image_texts = task.texts.image_descriptions([task.classnames[int(c)] for c in c_zs])
        if "group" in kinds:
            assert task.texts is not None
            group_texts = task.texts.group_descriptions(c_zs.numpy(), cfg.group_size)

        tuned = both_towers(handle, generator)
        device = tuned.device
        class_tokens = tuned.tokenize([templates[0].format(c) for c in task.classnames]).to(device)  # (K, L)
        image_tokens = tuned.tokenize(image_texts).to(device) if image_texts is not None else None  # (N, L)
        group_tokens = tuned.tokenize(group_texts).to(device) if group_texts is not None else None  # (N, L)
        prototypes = class_weights.clone().to(device)  # (K, D), initialised from T^class
        zs = c_zs.to(device)
        pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # (labels, t) of the last step, for the update
        c_ft_log = EpochLabels(self.hooks)
        scale = handle.logit_scale

        def loss(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
            f = tuned.encode_images(x)  # (B, D) normalised
            c_ft = (f.detach().float() @ F.normalize(prototypes, dim=-1).T).argmax(-1)  # (B,)
            c_ft_log.record(idx, c_ft)
            g_class = tuned.encode_tokens(class_tokens) if "class" in kinds else None  # (K, D)
            shared = []
            if image_tokens is not None:
                shared.append(tuned.encode_tokens(image_tokens[idx]))  # (B, D)
            if group_tokens is not None:
                shared.append(tuned.encode_tokens(group_tokens[idx]))  # (B, D)
            total = f.new_zeros(())
            pending.clear()
            for use, labels in ((cfg.use_zs, zs[idx]), (cfg.use_ft, c_ft)):
                if not use:
                    continue
                parts = ([g_class[labels]] if g_class is not None else []) + shared
                mix = mixed_text(parts, prototypes, cfg.mixer)  # (B, D)
                t = prototype_text(mix, prototypes, labels, cfg.alpha)  # (B, D), Eq. (2)
                total = total + clip_loss(f, t.to(f.dtype), scale)  # Eq. (3): L_zs + L_ft
                pending.append((labels, (t if cfg.update_from == "prototype-text" else mix).detach()))
            return total

        def update() -> None:
            if cfg.momentum_update:
                labels = torch.cat([lab for lab, _ in pending])
                embeds = torch.cat([t for _, t in pending])
                momentum_update(prototypes, labels, embeds, cfg.momentum, cfg.normalize_prototypes)

        assert task.images is not None
        index = torch.arange(n)  # the target of each view is the image's index (its texts and c_zs)
        fit_both_towers(tuned, [(task.images, index, index)], loss, cfg, generator, self.hooks, after_step=update,
                        on_epoch=c_ft_log.on_epoch)  # fmt: skip
        return tower_adapter(self.classifier, task.classnames, prototypes, tuned, handle)  # type: ignore[return-value]
