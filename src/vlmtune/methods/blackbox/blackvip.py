"""BlackVIP: black-box visual prompting (Oh et al., CVPR 2023; a baseline of paper 001, Table 9).

A coordinator makes an input-dependent visual prompt the size of the image: a frozen, pretrained image encoder on
the client gives z(x); a small decoder (a learnable prompt trigger appended to z, reshaped to (src_dim / 49, 7, 7),
then five x2 transposed-convolution stages) gives phi(x) of shape (3, 224, 224). The black box scores the prompted
image clip(x + eps * phi(x)) against the class prompts; only its predictions come back. The decoder's parameters w
are trained by SPSA-GC, a zeroth-order method:

    a_k = a / (k + o)^alpha,  c_k = c / k^gamma                                   (gain sequences, step k >= 1)
    g_k = 1/q sum_i (L(w + c_k D_i) - L(w - c_k D_i)) / (2 c_k D_i)               (SPSA, q = sp_avg perturbations)
    m_k = beta m_{k-1} + g_k  (m_1 = g_1);  w <- w - a_k (g_k + beta m_k)         (GC: look-ahead correction)

with D_i drawn elementwise from the segmented uniform [-1, -0.5] u [0.5, 1]. Every candidate w +- c_k D_i scored on
a batch is a query (BlackVIP's own code counts none): 2 q queries a step, more when a request must be split to fit
the service's limits. Defaults are the reference code's (configs/trainers/BLACKVIP, docs/configuration.md);
per-dataset settings are presets. See docs/fidelity.md for what differs (the encoder, augmentation, units).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from vlmtune.blackbox.api import BlackBoxVLM, BudgetExceeded, ImageRefs
from vlmtune.capabilities import Capability
from vlmtune.methods.api import Method, Task
from vlmtune.methods.blackbox.base import PIXEL_CHUNK, BlackBoxClassifier, query_pixel_scores
from vlmtune.methods.options import method_config, option
from vlmtune.methods.registry import register_method

# The reference adds eps * phi to CLIP-normalised images; a black box takes pixel units: phi x CLIP's std per channel.
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# docs/configuration.md of the reference code: black-box epochs, moms, gamma, spsa_c and p_eps per dataset
_PER_DATASET = {
    "caltech101": (5000, 0.9, 0.2, 0.005, 0.2),
    "oxford_pets": (5000, 0.9, 0.1, 0.01, 1.0),
    "stanford_cars": (2500, 0.9, 0.2, 0.01, 0.3),
    "oxford_flowers": (5000, 0.5, 0.2, 0.02, 1.0),
    "food101": (5000, 0.9, 0.1, 0.01, 0.3),
    "fgvc_aircraft": (5000, 0.3, 0.1, 0.01, 0.5),
    "sun397": (1000, 0.5, 0.1, 0.01, 1.0),
    "dtd": (5000, 0.7, 0.2, 0.01, 0.3),
    "svhn": (5000, 0.9, 0.2, 0.005, 1.0),
    "eurosat": (5000, 0.9, 0.2, 0.005, 0.4),
    "resisc45": (5000, 0.95, 0.1, 0.01, 0.3),
    "clevr": (5000, 0.9, 0.2, 0.005, 1.0),
    "ucf101": (5000, 0.9, 0.1, 0.01, 0.3),
    "imagenet": (500, 0.9, 0.2, 0.005, 0.3),
}
BLACKVIP_PRESETS = {
    name: {"epochs": e, "moms": m, "gamma": g, "spsa_c": c, "p_eps": p}
    for name, (e, m, g, c, p) in _PER_DATASET.items()
}


@method_config
class BlackVIPConfig:
    encoder: str | None = option(
        None, "the coordinator's frozen image encoder (backbone spec); none = the run's backbone (paper: MAE ViT-B/16)"
    )
    src_dim: int = option(1568, "decoder input: encoder feature + prompt trigger, a multiple of 49 (7 x 7)", ge=49)
    upsamplings: int | None = option(
        None, "x2 decoder stages (5 = 224 px, the reference); none = the fewest covering the model's input", ge=2, le=5
    )
    p_eps: float = option(1.0, "eps, the prompt's strength (in CLIP-normalised units, as the reference)", gt=0)
    epochs: int = option(5000, "passes over the training images (reference: 5000 on most datasets)", ge=1)
    batch_size: int = option(128, "images per SPSA step (reference: 128)", ge=1)
    budget: int | None = option(None, "total queries; none = what the epochs take", ge=1)
    spsa_a: float = option(0.01, "a of the step-size sequence a_k = a / (k + o)^alpha", gt=0)
    spsa_c: float = option(0.01, "c of the perturbation sequence c_k = c / k^gamma", gt=0)
    spsa_o: float = option(1.0, "o, the step-size offset", ge=0)
    alpha: float = option(0.4, "alpha, the step-size decay", ge=0)
    gamma: float = option(0.1, "gamma, the perturbation decay", ge=0)
    moms: float = option(0.9, "beta, the gradient-correction momentum", ge=0, lt=1)
    sp_avg: int = option(5, "q, perturbations averaged per step (2 q candidates)", ge=1)
    optimizer: Literal["spsa-gc", "spsa"] = option("spsa-gc", "spsa-gc (BlackVIP) or plain SPSA (its ablation)")
    template: str = option("dataset", "prompt template; 'dataset' = the dataset's own first template (reference)")


def upsamplings_for(image_size: int) -> int:
    """x2 decoder stages for a model input of side S: the fewest with 7 x 2^s >= S, at most 5 (224 px)."""
    return max(2, min(5, math.ceil(math.log2(max(1, image_size) / 7))))


class Coordinator(nn.Module):
    """The coordinator's decoder: encoder feature z (B, z_dim) + prompt trigger -> visual prompt (B, 3, P, P),
    P = 7 x 2^upsamplings (the reference: 5 stages, 224 px)."""

    def __init__(self, z_dim: int, src_dim: int = 1568, upsamplings: int = 5) -> None:
        super().__init__()
        if src_dim % 49 or src_dim <= z_dim:
            raise ValueError(
                f"src_dim must be a multiple of 49 larger than the encoder's {z_dim}-d feature; got {src_dim} "
                f"(try {49 * (z_dim // 49 + 17)})"
            )
        if not 2 <= upsamplings <= 5:
            raise ValueError(f"the decoder has 2 to 5 upsampling stages, not {upsamplings}")
        self.trigger = nn.Parameter(torch.empty(1, src_dim - z_dim))  # the prompt trigger vector
        layers: list[nn.Module] = []
        c_in = src_dim // 49
        for i, c_out in enumerate((64, 32, 32, 16)[: upsamplings - 1]):
            mid = 64 if i == 0 else c_in  # x2 grouped upsampling, 1x1 channel mix, BN, GELU
            layers += [
                nn.ConvTranspose2d(c_in, mid, 2, 2, groups=math.gcd(c_in, mid)),
                nn.ConvTranspose2d(mid, c_out, 1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.GELU(),
            ]
            c_in = c_out
        self.body = nn.Sequential(*layers, nn.ConvTranspose2d(c_in, 3, 2, 2, bias=False))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        trigger = self.trigger.expand(len(z), -1)
        return self.body(torch.cat([z, trigger], dim=1).view(len(z), -1, 7, 7))  # (B, 3, P, P)


def new_coordinator(z_dim: int, src_dim: int, upsamplings: int, generator: torch.Generator) -> Coordinator:
    """A coordinator at the reference's init: trigger ~ U(0, 0.1), layers by torch's default rule, all drawn from
    a seed of ``generator``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
        coordinator = Coordinator(z_dim, src_dim, upsamplings)
        with torch.no_grad():
            coordinator.trigger.uniform_(0.0, 0.1)
    return coordinator


def segmented_uniform(n: int, generator: torch.Generator) -> torch.Tensor:
    """D (n,) with entries uniform on [-1, -0.5] u [0.5, 1] (the reference's perturbation)."""
    magnitude = (torch.rand(n, generator=generator) + 1) / 2
    sign = torch.where(torch.rand(n, generator=generator) < 0.5, 1.0, -1.0)
    return magnitude * sign


class BlackVIPClassifier(BlackBoxClassifier):
    """The coordinator's decoder and settings; the client-side encoder is bound (``bind_encoder``) to predict."""

    storage_dtype = torch.float32

    def __init__(self, classnames: list[str], template: str, coordinator: Coordinator, settings: dict) -> None:
        super().__init__(classnames, template, None)
        self.coordinator = coordinator
        self.settings = dict(settings)
        self._encoder: Any = None

    @property
    def encoder_spec(self) -> str | None:
        return str(self.settings["encoder"])

    @property
    def encoder_bound(self) -> bool:
        return self._encoder is not None

    def bind_encoder(self, encoder: Any) -> None:
        if encoder.embed_dim != self.settings["z_dim"]:
            raise ValueError(
                f"{encoder.spec} gives {encoder.embed_dim}-d features; the coordinator takes {self.settings['z_dim']}"
            )
        self._encoder = encoder

    def box_options(self) -> dict[str, Any]:
        return {"pixel_prompts": True}

    def encode(self, images: Any, indices: range) -> torch.Tensor:
        """The frozen encoder's features z (B, z_dim) of the client's images ``images[i]``, ``PIXEL_CHUNK`` at a
        time."""
        if self._encoder is None:
            raise RuntimeError("blackvip: bind_encoder(the coordinator's encoder) first")
        enc, out = self._encoder, []
        with torch.no_grad():
            for start in range(0, len(indices), PIXEL_CHUNK):
                chunk = indices[start : start + PIXEL_CHUNK]
                batch = torch.stack([enc.preprocess(images[i]) for i in chunk]).to(enc.device)
                out.append(enc.encode_images(batch, normalize=False).float().cpu())
        return torch.cat(out)

    def pixel_prompts(self, z: torch.Tensor, image_size: int) -> torch.Tensor:
        """Features (B, z_dim) -> pixel prompts (B, 3, S, S): eps * phi(x) in pixel units at the box's size S."""
        phi = self.coordinator(z)  # (B, 3, P, P), CLIP-normalised units
        if image_size != phi.shape[-1]:
            phi = F.interpolate(phi, size=(image_size, image_size), mode="bilinear", antialias=True)
        std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
        return self.settings["p_eps"] * phi * std

    def predict_blackbox(self, box: BlackBoxVLM, refs: ImageRefs) -> torch.Tensor:
        if refs.images is None:
            raise ValueError("blackvip prompts each image on the client: ImageRefs.images must hold the images")
        size = box.info().image_size
        if size is None:
            raise ValueError(f"{box.info().name} takes no pixel prompts (serve it with --pixel-prompts)")
        self.eval()
        out = []
        with torch.no_grad():
            for start in range(0, len(refs.ids), PIXEL_CHUNK):
                idx = range(start, min(start + PIXEL_CHUNK, len(refs.ids)))
                prompts = self.pixel_prompts(self.encode(refs.images, idx), size).numpy()[None]  # (1, B, 3, S, S)
                out.append(
                    query_pixel_scores(box, refs.ids[idx.start : idx.stop], self.classnames, self.template, prompts)[0]
                )
        return torch.cat(out)

    def extra_meta(self) -> dict[str, Any]:
        return {"template": self.template, "settings": self.settings}

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> BlackVIPClassifier:
        settings = meta["settings"]
        coordinator = Coordinator(settings["z_dim"], settings["src_dim"], settings["upsamplings"])
        clf = cls(meta["classnames"], meta["template"], coordinator, settings)
        clf.load_state_dict(tensors)
        return clf.eval()


class SPSATrainer:
    """SPSA(-GC) over the decoder's parameter vector, each candidate scored through the black box."""

    def __init__(
        self, cfg: BlackVIPConfig, box: BlackBoxVLM, clf: BlackVIPClassifier, refs: ImageRefs, size: int
    ) -> None:
        self.cfg, self.box, self.clf, self.refs, self.size = cfg, box, clf, refs, size  # size: the box's input side
        self.z = clf.encode(refs.images, range(len(refs)))  # (N, z_dim): frozen encoder, fixed images: once
        self.params = list(clf.coordinator.parameters())
        self.momentum: torch.Tensor | None = None

    def losses(self, w: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-entropy of each candidate parameter vector w (C, P) on the batch ``idx`` -> (C,), scores (C, B, K).

        Candidates are prompted and queried as many at a time as one request's pixel values allow (at 224 px and
        batch 128 one candidate's prompts are 77 MB: never all 2q at once)."""
        ids = [self.refs.ids[i] for i in idx.tolist()]
        limits = self.box.info().service_limits
        per = max(1, min(len(w), limits.candidates_per_request(len(idx), len(self.clf.classnames), 3 * self.size**2)))
        scores = []
        for start in range(0, len(w), per):
            prompts = []
            for row in w[start : start + per]:
                nn.utils.vector_to_parameters(row, self.params)
                prompts.append(self.clf.pixel_prompts(self.z[idx], self.size))  # (B, 3, S, S)
            batch = torch.stack(prompts).numpy()
            scores.append(query_pixel_scores(self.box, ids, self.clf.classnames, self.clf.template, batch))
        out = torch.cat(scores)  # (C, B, K)
        labels = torch.as_tensor(self.refs.labels)[idx]
        return torch.stack([F.cross_entropy(s, labels) for s in out]), out

    @torch.no_grad()
    def step(self, k: int, idx: torch.Tensor, generator: torch.Generator) -> float:
        cfg = self.cfg
        a_k = cfg.spsa_a / (k + cfg.spsa_o) ** cfg.alpha  # gain sequences
        c_k = cfg.spsa_c / k**cfg.gamma
        w = nn.utils.parameters_to_vector(self.params).detach()
        deltas = torch.stack([segmented_uniform(len(w), generator) for _ in range(cfg.sp_avg)])  # (q, P)
        candidates = torch.cat([w + c_k * deltas, w - c_k * deltas])  # (2q, P): w + c_k D_i, then w - c_k D_i
        loss, _ = self.losses(candidates, idx)
        g = ((loss[: cfg.sp_avg] - loss[cfg.sp_avg :])[:, None] / (2 * c_k * deltas)).mean(dim=0)  # SPSA estimate
        if cfg.optimizer == "spsa-gc":
            self.momentum = g if self.momentum is None else cfg.moms * self.momentum + g
            g = g + cfg.moms * self.momentum  # gradient correction (look-ahead)
        nn.utils.vector_to_parameters(w - a_k * g, self.params)
        return float(loss.mean())


@register_method("blackvip")
class BlackVIP(Method):
    """BlackVIP: an input-dependent pixel prompt from a coordinator, trained by SPSA-GC through the black box."""

    capability = Capability.BLACK_BOX
    config_cls = BlackVIPConfig
    classifier = BlackVIPClassifier
    presets: ClassVar[dict[str, dict[str, Any]]] = BLACKVIP_PRESETS
    summary = "BlackVIP: coordinator pixel prompts, SPSA-GC through the black box (counts every query)"

    def box_options(self) -> dict[str, Any]:
        return {"pixel_prompts": True}

    def wants_encoder(self) -> str | None:
        return self.config.encoder or ""

    def fit(self, handle: BlackBoxVLM, task: Task, *, generator: torch.Generator) -> BlackVIPClassifier:
        cfg = self.config
        refs = task.train
        if not isinstance(refs, ImageRefs) or len(refs) == 0 or refs.images is None:
            raise ValueError("blackvip needs uploaded training images with the client's own copies (ImageRefs.images)")
        if task.encoder is None:
            raise ValueError("blackvip needs the coordinator's image encoder (Task.encoder)")
        if getattr(self.hooks.journal, "queries", 0):
            raise ValueError("a blackvip run cannot be resumed (it keeps no step journal): start a new run")
        template = task.templates[0] if cfg.template == "dataset" else cfg.template
        size = handle.info().image_size
        if size is None:
            raise ValueError(f"{handle.info().name} takes no pixel prompts: BlackVIP needs a box that does")
        ups = cfg.upsamplings or upsamplings_for(size)
        coordinator = new_coordinator(task.encoder.embed_dim, cfg.src_dim, ups, generator)
        settings = {
            "upsamplings": ups,
            "encoder": task.encoder.spec,
            "z_dim": task.encoder.embed_dim,
            "src_dim": cfg.src_dim,
            "p_eps": cfg.p_eps,
        }
        clf = BlackVIPClassifier(list(task.classnames), template, coordinator, settings)
        clf.bind_encoder(task.encoder)
        trainer = SPSATrainer(cfg, handle, clf, refs, size)
        n = len(refs)
        batch = min(cfg.batch_size, n)
        per_epoch = n // batch  # full batches only (the reference's loader drops the last partial one)
        steps = cfg.epochs * per_epoch
        per_step = 2 * cfg.sp_avg
        if cfg.budget is not None:
            steps = min(steps, cfg.budget // per_step)
        remaining = handle.usage().remaining
        if remaining is not None and remaining < steps * per_step:
            steps = remaining // per_step
            self.hooks.note(f"blackvip: the key's {remaining} remaining queries allow {steps} SPSA steps")
        clf.train()
        k = 0
        try:
            while k < steps:
                order = torch.randperm(n, generator=generator)
                for b in range(per_epoch):
                    if k >= steps:
                        break
                    k += 1
                    loss = trainer.step(k, order[b * batch : (b + 1) * batch], generator)
                    self.hooks.step(k, steps, "step", loss=loss, queries=handle.usage().used)
        except BudgetExceeded as exc:
            self.hooks.note(f"blackvip stopped after {k - 1} steps: {exc}")
        clf.eval()
        return clf
