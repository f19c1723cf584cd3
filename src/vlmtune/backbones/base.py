"""Capabilities and the backbone interface shared by every adapter (toy, open_clip, Hugging Face).

A method declares the access it needs (``Capability``) and receives only that:

- ``FEATURES``: frozen encoders, ``encode_images`` / ``encode_texts`` -> L2-normalised features;
- ``WHITE_BOX``: plus ``tokenize``, ``embed_tokens`` and ``encode_text_embeddings(embeds, eot_index)`` (the
  differentiable path through which soft prompts enter the text tower), patch features and the modules;
- ``BLACK_BOX``: predictions only, through ``vlmtune.blackbox`` (never a backbone object).

Adapters set ``model`` and ``eot_token_id`` and implement four primitives; everything else is written once here.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from vlmtune.backbones.prefix import TextStack, encode_shared_prefix
from vlmtune.capabilities import Capability
from vlmtune.errors import VlmtuneError

__all__ = ["Backbone", "Capability", "FeatureEncoder"]


@runtime_checkable
class FeatureEncoder(Protocol):
    """What a ``FEATURES`` method may use: frozen encoders and the model's logit scale."""

    spec: str
    embed_dim: int

    @property
    def logit_scale(self) -> float: ...

    def encode_images(self, images: torch.Tensor) -> torch.Tensor: ...

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor: ...


class Backbone(ABC):
    """A CLIP-style dual encoder behind one small interface (``WHITE_BOX`` handle; also a ``FeatureEncoder``).

    Attributes:
        spec: the string it was loaded from, e.g. ``"toy"`` or ``"openclip:ViT-B-32@openai"``.
        embed_dim: dimension D of the joint embedding space.
        token_width: width W of token embeddings (soft prompts live in this space).
        context_length: number of token positions L of the text tower.
        preprocess: PIL image -> normalised (3, H, W) tensor, as the weights expect.
        preprocess_id: a string that identifies ``preprocess`` (part of feature-cache keys).
    """

    spec: str
    embed_dim: int
    token_width: int
    context_length: int
    preprocess: Callable[[Image.Image], torch.Tensor]
    preprocess_id: str
    model: nn.Module
    eot_token_id: int
    text_batch_size: int = 256

    # ---- the four primitives an adapter implements -------------------------------------------------------
    @abstractmethod
    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """Texts -> token ids (M, L) with start/end tokens and padding."""

    @abstractmethod
    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids (M, L) -> token embeddings (M, L, W)."""

    @abstractmethod
    def _text_forward(self, embeds: torch.Tensor, eot_index: torch.Tensor) -> torch.Tensor:
        """Token embeddings (M, L', W), L' <= L, -> unnormalised text features (M, D)."""

    @abstractmethod
    def _image_forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Preprocessed images (B, 3, H, W) -> unnormalised pooled (B, D) and patch/spatial features (B, P, D)."""

    # ---- shared, written once ------------------------------------------------------------------------
    @property
    def module(self) -> nn.Module:
        """The underlying torch module (for methods that fine-tune the encoders)."""
        return self.model

    @property
    def logit_scale(self) -> float:
        """exp of the learned temperature (about 100 for CLIP)."""
        return float(self.model.logit_scale.detach().exp())

    def eot_index(self, tokens: torch.Tensor) -> torch.Tensor:
        """Position of the (first) end-of-text token in each row of ``tokens`` (M, L) -> (M,)."""
        return (tokens == self.eot_token_id).int().argmax(dim=-1)

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The floating dtype of the weights (inputs are cast to it)."""
        return next(p for p in self.module.parameters() if p.is_floating_point()).dtype

    def cast(self, dtype: torch.dtype) -> Backbone:
        """A copy whose weights are ``dtype`` (a bfloat16 copy runs on AMX / tensor cores; autocast does not
        get that speed on CPUs); ``self`` if they already are. The copy has its own fingerprint. A convolutional
        image tower (ResNet) is also put in channels_last, which its bf16 kernels want (RN50: 4.3x instead of
        2.2x over fp32 on AMX, benchmarks/feature_precision.py)."""
        if dtype == self.dtype:
            return self
        clone = copy.copy(self)
        clone.model = copy.deepcopy(self.model).to(dtype)
        clone.__dict__.pop("_fingerprint", None)
        convs = sum(isinstance(m, nn.Conv2d) for m in clone.image_tower().modules())
        clone.channels_last = dtype != torch.float32 and convs > 1  # a patch-embedding conv alone: a ViT
        if clone.channels_last:
            clone.image_tower().to(memory_format=torch.channels_last)
        return clone

    channels_last: bool = False  # image inputs go in channels_last (a cast ResNet tower)

    def _pixels(self, images: torch.Tensor) -> torch.Tensor:
        """Preprocessed images on the model's device, dtype and memory format."""
        images = images.to(self.device, self.dtype)
        return images.contiguous(memory_format=torch.channels_last) if self.channels_last else images

    def fingerprint(self) -> str:
        """A short hash of the weights (part of feature-cache keys); recomputed only after in-place changes."""
        versions = tuple(t._version for t in self.module.state_dict().values())
        cached = getattr(self, "_fingerprint", None)
        if cached is not None and cached[0] == versions:
            return cached[1]
        h = hashlib.sha256()
        for name, tensor in sorted(self.module.state_dict().items()):
            h.update(name.encode())
            t = tensor.detach().flatten()
            h.update(t[:: max(1, t.numel() // 4096)].float().cpu().numpy().tobytes())  # a strided sample: fast
            h.update(str(tuple(tensor.shape)).encode())
            if tensor.dtype not in (torch.float32, torch.int64):  # a cast copy (keys of fp32 weights unchanged)
                h.update(str(tensor.dtype).encode())
        self._fingerprint = (versions, h.hexdigest()[:16])
        return self._fingerprint[1]

    def encode_text_embeddings(
        self, embeds: torch.Tensor, eot_index: torch.Tensor, normalize: bool = True
    ) -> torch.Tensor:
        """Differentiable text tower from token embeddings (M, L', W) and EOT positions (M,) -> (M, D).

        ``L'`` may be shorter than the context length (the text tower is causal, so positions after the EOT
        token never change its feature): methods can truncate to the longest prompt to save compute.
        """
        x = self._text_forward(embeds.to(self.dtype), eot_index)  # (M, D)
        return F.normalize(x, dim=-1) if normalize else x

    def text_stack(self) -> TextStack | None:
        """The text tower as pre-norm blocks (for prefix sharing), or None where it is not described."""
        return None

    def encode_text_shared_prefix(
        self, prefix: torch.Tensor, suffix: torch.Tensor, eot_index: torch.Tensor, normalize: bool = True
    ) -> torch.Tensor:
        """C candidates' shared prompt prefixes (C, P, W) and K class suffixes (C, K, S, W), end-of-text positions
        (K,) in the whole prompt (all >= P) -> text features (C, K, D): equal to encoding every [prefix; suffix],
        with the prefix computed once per candidate where ``text_stack`` describes the tower."""
        c, k = suffix.shape[:2]
        stack = self.text_stack()
        if stack is None:
            whole = torch.cat([prefix[:, None].expand(-1, k, -1, -1), suffix], 2).flatten(0, 1)  # (C*K, P+S, W)
            return self.encode_text_embeddings(whole, eot_index.repeat(c), normalize).view(c, k, -1)
        x = encode_shared_prefix(stack, prefix.to(self.device), suffix.to(self.device), eot_index)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_tokens(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Token ids (M, L) -> text features (M, D)."""
        tokens = tokens.to(self.device)
        eot = self.eot_index(tokens)
        length = int(eot.max()) + 1  # (M, L) -> (M, length): nothing after the last EOT matters
        return self.encode_text_embeddings(self.embed_tokens(tokens[:, :length]), eot, normalize)

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str], normalize: bool = True) -> torch.Tensor:
        """Texts -> text features (M, D), L2-normalised by default."""
        out = [
            self.encode_tokens(self.tokenize(texts[i : i + self.text_batch_size]), normalize)
            for i in range(0, len(texts), self.text_batch_size)
        ]
        return torch.cat(out) if out else torch.empty(0, self.embed_dim)

    def encode_images(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Preprocessed images (B, 3, H, W) -> image features (B, D)."""
        pooled, _ = self._image_forward(self._pixels(images))
        return F.normalize(pooled, dim=-1) if normalize else pooled

    def encode_image_tokens(self, images: torch.Tensor, normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Preprocessed images -> pooled (B, D) and patch features (B, P, D) in the joint space."""
        pooled, patches = self._image_forward(self._pixels(images))
        if self.visual_prompt_tokens:  # installed visual prompts (backbones.tuning) ride after the patches
            patches = patches[:, : patches.shape[1] - self.visual_prompt_tokens]
        if normalize:
            pooled, patches = F.normalize(pooled, dim=-1), F.normalize(patches, dim=-1)
        return pooled, patches

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """Weights out of autograd for the block (prompt learners train only their own parameters)."""
        params = [p for p in self.module.parameters() if p.requires_grad]
        for p in params:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p in params:
                p.requires_grad_(True)

    # ---- the image tower (methods that tune it: backbones.tuning) ---------------------------------------
    visual_prompt_tokens: int = 0  # visual prompt tokens installed in this (tuned) copy's image tower

    def image_tower(self) -> nn.Module:
        """The modules that map pixels to the pooled image feature (fine-tuning, normalisation-layer tuning).

        The default is ``self.model.visual`` (open_clip's and ToyCLIP's layout); a backbone laid out otherwise
        overrides this, or the methods that train on pixels cannot run on it."""
        tower = getattr(self.model, "visual", None)
        if not isinstance(tower, nn.Module):
            raise VlmtuneError(
                f"{self.spec}: {type(self).__name__} does not say which modules are its image tower; methods that "
                "train on pixels need it: override Backbone.image_tower()"
            )
        return tower

    def visual_blocks(self) -> Sequence[nn.Module] | None:
        """The transformer blocks of a ViT image tower, in order (deep visual prompts); None for other towers."""
        return None

    @property
    def visual_batch_first(self) -> bool:
        """Whether the blocks of ``visual_blocks`` take tokens as (B, N, W) (else (N, B, W))."""
        return True

    # ---- visual prompts (ViT image towers) ------------------------------------------------------------
    def visual_prompt_site(self) -> nn.Module | None:
        """The module that first sees the image token sequence (a ViT's ``ln_pre``); None if the tower is no ViT.

        Visual prompt tokens are appended to that module's input: after the class token, the patch tokens and
        their positional embeddings, before the transformer (shallow visual prompts as in Yu et al. 2023, the
        variant CraFT's App. B uses).
        """
        return None

    @property
    def visual_width(self) -> int | None:
        """Width of one visual prompt token, or None if this backbone takes none."""
        site = self.visual_prompt_site()
        return None if site is None else int(site.normalized_shape[0])  # type: ignore[index]

    def encode_images_prompted(
        self, images: torch.Tensor, prompts: torch.Tensor, normalize: bool = True
    ) -> torch.Tensor:
        """Preprocessed images (B, 3, H, W) under each of C visual prompts (C, n_v, W_v) -> features (C, B, D)."""
        site = self.visual_prompt_site()
        if site is None:
            raise TypeError(f"{self.spec}: the image tower is not a ViT; it takes no visual prompt tokens")
        c, b = prompts.shape[0], images.shape[0]
        pixels = self._pixels(images).repeat(c, 1, 1, 1)  # (C*B, 3, H, W), candidate-major
        tokens = prompts.to(self.device).repeat_interleave(b, 0)  # (C*B, n_v, W_v)

        def append(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
            x = args[0]  # (C*B, 1+P, W_v)
            if x.dim() != 3 or x.shape[0] != c * b:
                raise RuntimeError(f"unexpected token layout {tuple(x.shape)} at the visual prompt site")
            return (torch.cat([x, tokens.to(x.dtype)], 1), *args[1:])  # (C*B, 1+P+n_v, W_v)

        handle = site.register_forward_pre_hook(append)
        try:
            pooled, _ = self._image_forward(pixels)  # (C*B, D)
        finally:
            handle.remove()
        pooled = F.normalize(pooled, dim=-1) if normalize else pooled
        return pooled.view(c, b, -1)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r}, embed_dim={self.embed_dim}, token_width={self.token_width})"
