"""Tunable copies of a backbone's image tower: visual prompt tokens (VPT shallow / deep), LayerNorm-only tuning and
full fine-tuning, and the state an adapter carries to rebuild them.

``tunable_copy(backbone, tuning)`` deep-copies the backbone, freezes everything and opens to autograd only what
``tuning.mode`` names; the loaded (memoised) base is never changed. ``tower_state(tuned, base)`` is what an
adapter stores: a *state delta*, the tensors of the tuned model that differ from the base's, by value (bit-exact;
unchanged tensors are not stored, so VPT and LayerNorm-only adapters stay small), including the prompt tokens.
``restore_tower(base, tuning, state)`` rebuilds the tuned copy from a base with the same fingerprint.

Visual prompts (Jia et al. 2022, VPT) are ``n`` learnable tokens appended after the class and patch tokens (and
their positional embeddings) at the ViT's prompt site (``ln_pre``); ``vpt-deep`` replaces them with the next
layer's own tokens at the input of every further block.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from vlmtune.backbones.base import Backbone
from vlmtune.errors import VlmtuneError

TUNING_MODES = ("vpt-shallow", "vpt-deep", "layernorm", "full")
PROMPT_INITS = ("randn", "uniform", "normal")
PROMPTS_NAME = "vlmtune_visual_prompts"  # the prompt module's name inside the tuned model (its state key prefix)


@dataclass(frozen=True)
class TowerTuning:
    """What of the image tower trains.

    Attributes:
        mode: ``vpt-shallow``, ``vpt-deep``, ``layernorm`` (every LayerNorm of the image tower, as ReCLIP) or
            ``full`` (every parameter of the image tower).
        tokens: visual prompt tokens per layer (VPT modes).
        init: prompt init: ``randn`` (N(0, 1) / sqrt(width), Menghini et al.), ``uniform`` (VPT's
            U(-v, v), v = sqrt(6 / (3 p^2 + width)) for patch size p), ``normal`` (N(0, 0.02), MaPLe).
        layernorm: with a VPT mode, the image tower's LayerNorms train too (LaFTer).
    """

    mode: str = "vpt-shallow"
    tokens: int = 16
    init: str = "randn"
    layernorm: bool = False

    def __post_init__(self) -> None:
        if self.mode not in TUNING_MODES:
            raise VlmtuneError(f"unknown image-tower tuning {self.mode!r} (choose from {', '.join(TUNING_MODES)})")
        if self.init not in PROMPT_INITS:
            raise VlmtuneError(f"unknown visual prompt init {self.init!r} (choose from {', '.join(PROMPT_INITS)})")
        if self.tokens < 1:
            raise VlmtuneError(f"visual prompt tokens must be >= 1, got {self.tokens}")

    @property
    def prompted(self) -> bool:
        return self.mode.startswith("vpt")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class VisualPrompts(nn.Module):
    """Prompt tokens ``tokens`` (layers, n, W): row 0 appended at the prompt site, row i replaces them at block i."""

    def __init__(self, layers: int, n: int, width: int) -> None:
        super().__init__()
        self.tokens = nn.Parameter(torch.zeros(layers, n, width))
        self.batch_first = True

    def append(self, _module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        x = args[0]  # (B, 1+P, W) at the prompt site (always batch-first there)
        tokens = self.tokens[0].to(x.dtype).expand(x.shape[0], -1, -1)  # (B, n, W)
        return (torch.cat([x, tokens], 1), *args[1:])  # (B, 1+P+n, W)

    def replace(
        self, layer: int, _module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Forward pre-hook of block ``layer``: its input's last n tokens become this layer's prompts."""
        positional = bool(args)
        x = args[0] if positional else kwargs["hidden_states"]
        n = self.tokens.shape[1]
        own = self.tokens[layer].to(x.dtype)  # (n, W)
        if self.batch_first:  # (B, N, W)
            x = torch.cat([x[:, :-n], own.expand(x.shape[0], -1, -1)], 1)
        else:  # (N, B, W)
            x = torch.cat([x[:-n], own[:, None].expand(-1, x.shape[1], -1)], 0)
        if positional:
            return (x, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": x}


def _patch_size(tower: nn.Module) -> int:
    conv = next((m for m in tower.modules() if isinstance(m, nn.Conv2d)), None)
    return int(conv.kernel_size[0]) if conv is not None else 16


def _install_prompts(tuned: Backbone, tuning: TowerTuning, generator: torch.Generator | None) -> VisualPrompts:
    site, blocks, width = tuned.visual_prompt_site(), tuned.visual_blocks(), tuned.visual_width
    if site is None or not blocks or width is None:
        raise VlmtuneError(f"{tuned.spec}: the image tower is not a ViT; visual prompt tuning needs one")
    layers = len(blocks) if tuning.mode == "vpt-deep" else 1
    prompts = VisualPrompts(layers, tuning.tokens, width)
    prompts.batch_first = tuned.visual_batch_first
    shape = tuple(prompts.tokens.shape)
    with torch.no_grad():
        if tuning.init == "randn":
            init = torch.randn(shape, generator=generator) * width**-0.5
        elif tuning.init == "uniform":
            bound = math.sqrt(6.0 / (3 * _patch_size(tuned.image_tower()) ** 2 + width))
            init = (torch.rand(shape, generator=generator) * 2 - 1) * bound
        else:
            init = torch.randn(shape, generator=generator) * 0.02
        prompts.tokens.copy_(init)
    prompts.to(tuned.device)
    tuned.model.add_module(PROMPTS_NAME, prompts)
    site.register_forward_pre_hook(prompts.append)
    for i in range(1, layers):
        blocks[i].register_forward_pre_hook(functools.partial(prompts.replace, i), with_kwargs=True)
    tuned.visual_prompt_tokens = tuning.tokens
    return prompts


def _frozen_copy(backbone: Backbone) -> Backbone:
    """A deep copy of ``backbone`` with every weight frozen, its cached fingerprint dropped (its weights will change:
    never reuse the base's hash)."""
    tuned = copy.deepcopy(backbone)
    tuned.__dict__.pop("_fingerprint", None)
    tuned.model.requires_grad_(False)
    return tuned


NORMS = (nn.LayerNorm, nn.BatchNorm2d, nn.GroupNorm)


def norm_layers(tower: nn.Module) -> list[nn.Module]:
    """The normalisation layers ``layernorm`` tuning trains: the tower's LayerNorms, or for a tower without any (a
    ResNet) its BatchNorm / GroupNorm layers (their affine weights; running statistics stay frozen: the backbone
    is in eval mode throughout)."""
    layer_norms = [m for m in tower.modules() if isinstance(m, nn.LayerNorm)]
    return layer_norms or [m for m in tower.modules() if isinstance(m, NORMS) and any(True for _ in m.parameters())]


def tuning_for(backbone: Backbone, tuning: TowerTuning) -> tuple[TowerTuning, str | None]:
    """The tuning ``backbone``'s image tower can take, and what to tell the user when it is not ``tuning``: visual
    prompts need a ViT (a prompt site and blocks); on any other tower a VPT mode falls back to tuning the tower's
    normalisation layers (``layernorm``). A pure function of the two: restoring an adapter repeats the choice."""
    if not tuning.prompted or (backbone.visual_prompt_site() is not None and backbone.visual_blocks()):
        return tuning, None
    fallback = TowerTuning("layernorm", tuning.tokens, tuning.init)
    return fallback, (
        f"{backbone.spec}: the image tower is not a ViT, so it takes no visual prompts: {tuning.mode} fell back to "
        "tuning its normalisation layers (layernorm); set the method's tuning option to 'full' to fine-tune it all"
    )


def tunable_copy(
    backbone: Backbone,
    tuning: TowerTuning,
    generator: torch.Generator | None = None,
    note: Callable[[str], None] | None = None,
) -> Backbone:
    """A deep copy of ``backbone`` whose image tower trains as ``tuning`` says (or as ``tuning_for`` falls back to,
    told through ``note``, e.g. ``TrainingHooks.note``); every other weight is frozen."""
    if backbone.visual_prompt_tokens:
        raise VlmtuneError(f"{backbone.spec}: already a tuned copy; tune the base backbone instead")
    tuning, told = tuning_for(backbone, tuning)
    if told is not None and note is not None:
        note(told)
    tuned = _frozen_copy(backbone)
    tower = tuned.image_tower()
    if tuning.prompted:
        _install_prompts(tuned, tuning, generator).requires_grad_(True)
    if tuning.mode == "layernorm" or (tuning.prompted and tuning.layernorm):
        norms = norm_layers(tower)
        if not norms:
            raise VlmtuneError(f"{backbone.spec}: the image tower has no normalisation layer to tune (use 'full')")
        for m in norms:
            m.requires_grad_(True)
    elif tuning.mode == "full":
        tower.requires_grad_(True)
    return tuned


def text_layernorm_copy(backbone: Backbone) -> Backbone:
    """A deep copy of ``backbone`` whose text-side LayerNorms train (every LayerNorm outside the image tower: the
    text transformer's and the final one, ReCLIP-T); every other weight is frozen."""
    tuned = _frozen_copy(backbone)
    image = {id(m) for m in tuned.image_tower().modules()}
    norms = [m for m in tuned.model.modules() if isinstance(m, nn.LayerNorm) and id(m) not in image]
    if not norms:
        raise VlmtuneError(f"{backbone.spec}: the text tower has no LayerNorm to tune")
    for m in norms:
        m.requires_grad_(True)
    return tuned


def trainable_parameters(tuned: Backbone) -> list[nn.Parameter]:
    return [p for p in tuned.model.parameters() if p.requires_grad]


def tower_state(tuned: Backbone, base: Backbone) -> dict[str, torch.Tensor]:
    """The tensors of ``tuned`` that ``base`` lacks or holds with other values (by value, on the CPU)."""
    base_state = base.model.state_dict()
    out = {}
    for name, value in tuned.model.state_dict().items():
        old = base_state.get(name)
        if old is None or old.shape != value.shape or not torch.equal(old, value):
            out[name] = value.detach().cpu().clone()
    return out


def restore_tower(base: Backbone, tuning: TowerTuning, state: dict[str, torch.Tensor]) -> Backbone:
    """The tuned copy of ``base`` that ``tower_state`` described (frozen, for inference)."""
    tuned = tunable_copy(base, tuning)
    missing_ok = set(tuned.model.state_dict())
    unknown = sorted(set(state) - missing_ok)
    if unknown:
        raise VlmtuneError(
            f"the adapter's image tower has tensors {base.spec} does not: {', '.join(unknown[:3])}"
            + (" ..." if len(unknown) > 3 else "")
        )
    tuned.model.load_state_dict(state, strict=False)
    tuned.model.requires_grad_(False)
    return tuned


class StackedTowers(Backbone):
    """Several tuned copies of one base as one image encoder: its pooled feature is the members' L2-normalised
    features side by side, divided by sqrt(M) -> (B, M * D) (unit norm, so caching and normalising keep it
    unchanged); an ensemble adapter (``TowerEnsemble``: CoFT's two fine-tuned towers) splits it again. The text
    side is the first member's; patch features are the first member's too."""

    def __init__(self, members: Sequence[Backbone]) -> None:
        if not members:
            raise ValueError("StackedTowers needs at least one member")
        first = members[0]
        self.members = list(members)
        self.spec = f"{first.spec}[{len(members)} tuned towers]"
        self.embed_dim = first.embed_dim * len(members)
        self.token_width, self.context_length = first.token_width, first.context_length
        self.preprocess, self.preprocess_id = first.preprocess, first.preprocess_id
        self.eot_token_id = first.eot_token_id
        self.model = nn.ModuleList([m.model for m in members])  # fingerprint and device over every member

    @property
    def logit_scale(self) -> float:
        return self.members[0].logit_scale

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return self.members[0].tokenize(texts)

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.members[0].embed_tokens(tokens)

    def _text_forward(self, embeds: torch.Tensor, eot_index: torch.Tensor) -> torch.Tensor:
        return self.members[0]._text_forward(embeds, eot_index)

    def _image_forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        parts = [m.encode_image_tokens(images, normalize=True) for m in self.members]  # M x ((B, D), (B, P, D))
        pooled = torch.cat([p for p, _ in parts], dim=-1) / math.sqrt(len(parts))  # (B, M * D)
        return pooled, parts[0][1]
