"""ReCLIP (Hu et al., WACV 2024): source-free domain adaptation of CLIP by label propagation and cross-modality
self-training (a baseline of paper 004).

Two models train side by side on the unlabelled images, without augmentation:

- ReCLIP-V: the image tower's LayerNorms train; it classifies by cluster centroids (the mean feature of the images
  label propagation assigned to each class);
- ReCLIP-T: the text tower's LayerNorms (and the final one) train; it classifies the frozen image features with the
  text features of the first template.

At the start of every epoch each model's features (V: its tuned tower's; T: the frozen tower's) are pseudo-labelled
by label propagation (``_propagation``): projection P = U[:, 1:cut] U[:, 1:cut]^T of the class text matrix (the first
direction dropped), k-NN graph (k = 20) over [class embeddings; images], diffusion alpha = 0.99 by conjugate
gradients (20 iterations). After every epoch ReCLIP-T's projection and class nodes are recomputed from its tuned
text tower with all templates. The cross-entropy of each model counts only the images whose two pseudo-labels
**agree**. SGD lr 1e-3, momentum 0.9, weight decay 1e-4, batch 64, min(100, N / 5000 + 2) epochs, constant rate.
Prediction: the mean of the T and V logits. Reference-code details and our choices: docs/fidelity.md.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F

from vlmtune.backbones.base import Backbone
from vlmtune.backbones.tuning import TowerTuning, text_layernorm_copy, tunable_copy
from vlmtune.capabilities import Capability
from vlmtune.methods.api import Method, Task
from vlmtune.methods.common.text import class_text_weights
from vlmtune.methods.common.tower import TowerClassifier, TowerEnsemble, TowerHead, draw_seed
from vlmtune.methods.labelfree.base import PSEUDO_TEMPLATE_DOC, pseudo_templates, unlabeled_of
from vlmtune.methods.labelfree.propagation import default_cut, projection, propagate
from vlmtune.methods.options import method_config, option
from vlmtune.methods.registry import register_method
from vlmtune.pixels import LabelledViews, LossModule, ViewDataset, encode_all, make_loader, train_pixels
from vlmtune.pixels import view as make_view
from vlmtune.schedule import Schedule

LAYERNORM = TowerTuning(mode="layernorm")


@method_config
class ReCLIPConfig:
    template: str = option(
        "ensemble", PSEUDO_TEMPLATE_DOC + " (the first is ReCLIP-T's training template; all build the class nodes)"
    )
    neighbors: int = option(20, "k of the k-NN graph of label propagation", ge=1)
    alpha: float = option(0.99, "diffusion alpha of label propagation", gt=0, lt=1)
    cg_iterations: int = option(20, "conjugate-gradient iterations per class", ge=1)
    cut: int | None = option(None, "projection: directions 1..cut-1 of the class matrix (none = 768; 250 if K > 500)")
    lr: float = option(1e-3, "SGD learning rate (both models)", gt=0)
    momentum: float = option(0.9, "SGD momentum", ge=0, lt=1)
    weight_decay: float = option(1e-4, "SGD weight decay", ge=0)
    batch_size: int = option(64, "images per step", ge=1)
    max_epochs: int = option(100, "epochs = min(max_epochs, N / 5000 + 2) (the reference)", ge=1)
    epochs: int | None = option(None, "a fixed number of epochs instead", ge=1)
    v_loss: Literal["agreeing", "reference"] = option(
        "agreeing", "ReCLIP-V's loss: mean over the agreeing images, or the reference code's (also divided by the "
        "batch size)"
    )  # fmt: skip
    workers: int | None = option(None, "DataLoader workers per process (none = cores - 1, <= 8; 0 on <= 2 cores)", ge=0)


class ReCLIPMember(TowerClassifier):
    """One of the two: ReCLIP-T (the frozen tower, its tuned text features) or ReCLIP-V (tuned tower, centroids)."""


class ReCLIPClassifier(TowerEnsemble):
    """The mean of the ReCLIP-T and ReCLIP-V logits."""

    member_cls = ReCLIPMember
    average = "logits"


def reclip_epochs(n: int, max_epochs: int) -> int:
    return max(1, min(max_epochs, int(n / 5000 + 2)))


@register_method("reclip")
class ReCLIP(Method):
    """ReCLIP: label propagation + cross-modality self-training of the two towers' LayerNorms."""

    config_cls = ReCLIPConfig
    classifier = ReCLIPClassifier
    extra_classifiers = (ReCLIPMember,)
    capability = Capability.WHITE_BOX
    needs_labels = False
    default_shots = 0
    summary = "ReCLIP: label propagation pseudo-labels, visual and text LayerNorms self-trained where they agree"
    presets: ClassVar[dict[str, dict[str, Any]]] = {"reference": {"v_loss": "reference"}}

    def wants_images(self) -> bool:
        return True

    def fit(self, handle: Backbone, task: Task, *, generator: torch.Generator) -> ReCLIPClassifier:
        cfg = self.config
        templates = pseudo_templates(task, cfg.template)
        frozen = F.normalize(unlabeled_of(task, self.name).features.float().cpu(), dim=-1)  # (N, D)
        n, k = len(frozen), task.num_classes
        cut = cfg.cut or default_cut(k)
        w0 = class_text_weights(handle, task.classnames, templates)  # (K, D): V's class nodes, fixed
        v_model = tunable_copy(handle, LAYERNORM, generator)
        t_model = text_layernorm_copy(handle)
        device = v_model.device
        short = t_model.tokenize([templates[0].format(c) for c in task.classnames]).to(device)  # (K, L)
        assert task.images is not None
        plain = ViewDataset(task.images, [make_view("none", v_model)])
        v_proj = projection(w0, cut)  # V's projection and class nodes stay at the frozen model's
        state: dict[str, torch.Tensor] = {"t_nodes": w0, "t_proj": v_proj}  # T's are replaced after every epoch
        scale = handle.logit_scale

        def relabel(epoch: int) -> None:
            """Both models' pseudo-labels for epoch ``epoch`` (and V's centroids); after the last, the final ones."""
            v_feats = F.normalize(encode_all(v_model, plain, workers=cfg.workers).float().cpu(), dim=-1)  # (N, D)
            t = propagate(state["t_nodes"], frozen, state["t_proj"], cfg.neighbors, cfg.alpha, cfg.cg_iterations)
            v = propagate(w0, v_feats, v_proj, cfg.neighbors, cfg.alpha, cfg.cg_iterations)
            state.update(t_labels=t.labels, v_labels=v.labels, centroids=v.centroids)
            everything = torch.arange(n)
            self.hooks.pseudo_labels(epoch, "all", everything, t.labels, "ReCLIP-T")
            self.hooks.pseudo_labels(epoch, "all", everything, v.labels, "ReCLIP-V")
            agree = (t.labels == v.labels).nonzero().flatten()
            self.hooks.pseudo_labels(epoch, "selected", agree, t.labels[agree], "agreeing")

        def loss(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
            cpu_idx = idx.cpu()
            t_lab, v_lab = state["t_labels"][cpu_idx].to(device), state["v_labels"][cpu_idx].to(device)
            agree = (t_lab == v_lab).float()  # (B,)
            v_logits = scale * v_model.encode_images(x) @ state["centroids"].to(device).T  # (B, K)
            g = t_model.encode_tokens(short)  # (K, D) normalised, through the tuned text LayerNorms
            t_logits = scale * frozen[cpu_idx].to(device) @ g.T  # (B, K)
            count = agree.sum().clamp_min(1)
            t_loss = (F.cross_entropy(t_logits, t_lab, reduction="none") * agree).sum() / count
            v_ce = F.cross_entropy(v_logits, v_lab, reduction="none") * agree
            v_loss = v_ce.mean() / count if cfg.v_loss == "reference" else v_ce.sum() / count
            return t_loss + v_loss  # 0 (no gradient step of size) when nothing agrees

        def on_epoch(epoch: int) -> dict[str, float]:
            t_weights = class_text_weights(t_model, task.classnames, templates)  # (K, D) all templates
            state.update(t_nodes=t_weights, t_proj=projection(t_weights, cut))
            agreed = float((state["t_labels"] == state["v_labels"]).float().mean())
            if epoch + 1 < epochs:
                relabel(epoch + 1)
            return {"agreeing": 100 * agreed}

        epochs = cfg.epochs or reclip_epochs(n, cfg.max_epochs)
        relabel(0)
        index = torch.arange(n)
        data = LabelledViews([(task.images, index, index)], make_view("none", v_model))
        loader = make_loader(data, cfg.batch_size, seed=draw_seed(generator), workers=cfg.workers)
        schedule = Schedule(
            lr=cfg.lr, epochs=epochs, batch_size=cfg.batch_size, momentum=cfg.momentum,
            weight_decay=cfg.weight_decay, warmup_epochs=0, decay="constant",
        )  # fmt: skip
        module = LossModule({"v": v_model.model, "t": t_model.model}, loss)
        train_pixels(module, loader, schedule, step=self.hooks.step, on_epoch=on_epoch, device=device,
                     seed=draw_seed(generator))  # fmt: skip

        relabel(epochs)  # V's centroids from its final tower (the reference keeps those of the last epoch's start)
        g_t = class_text_weights(t_model, task.classnames, templates[:1])  # ReCLIP-T's classifier (K, D)
        frozen_copy = tunable_copy(handle, LAYERNORM)  # untouched: an empty state delta, the frozen tower
        members = [
            TowerHead(weights, scale, cosine=True).to_classifier(
                ReCLIPMember, task.classnames, (), tower, handle, LAYERNORM
            )
            for weights, tower in ((g_t, frozen_copy), (state["centroids"], v_model))
        ]
        return ReCLIPClassifier(task.classnames, members)
