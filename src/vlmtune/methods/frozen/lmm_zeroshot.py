"""LMM zero-shot: the "LLaVA zero-shot" baseline of paper 004 (Table 1).

The run's text-generation backend (``--textgen-backend``; LLaVA through ``transformers`` or an OpenAI-compatible
endpoint) sees each test image with paper 004's question, "Select the most appropriate category for the image from
the following options:[options]. Write only the category name.", and its answer is matched to a class name (exact,
then the longest class name the answer contains, then the closest by difflib's ratio >= 0.6; an answer that matches
none scores every class 0, so it counts as a vote for the first class). A backend that cannot follow instructions
(the toy describer) ranks the classes instead by its log-likelihood of ``answer`` filled with each class name, and
the run says so (``mode=auto``; ``mode=answer`` / ``likelihood`` force one).

Nothing is trained and CLIP is not used: the adapter's "image encoder" is the LMM, whose feature of an image is its
score of each class (K,), cached like image features under a fingerprint of the backend, model, prompt, mode and
class names. Images reach the LMM padded to a square (``image_side``).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image, ImageOps

from vlmtune.backbones.base import Backbone
from vlmtune.capabilities import Capability
from vlmtune.errors import VlmtuneError
from vlmtune.methods.api import Classifier, Method, Task
from vlmtune.methods.options import method_config, option
from vlmtune.methods.registry import register_method
from vlmtune.textgen.backends import load_generator
from vlmtune.textgen.base import GenRequest, GenSettings, LikelihoodScorer, TextGenerator

_WORDS = re.compile(r"[a-z0-9]+")


@method_config
class LMMZeroShotConfig:
    mode: Literal["auto", "answer", "likelihood"] = option(
        "auto", "answer: the LMM names a class from the options (paper 004); likelihood: classes ranked by the "
        "backend's log-likelihood of `answer`; auto: answer if the backend follows instructions, else likelihood"
    )  # fmt: skip
    answer: str = option("a photo of a {}.", "likelihood mode: the text, with each class name, whose likelihood ranks")
    prompt: str | None = option(None, "the question with {options} (none = paper 004's, the stage's 'select' prompt)")
    image_side: int | None = option(None, "side of the square the images are padded to (none: 32 toy, 672 else)", ge=8)
    max_new_tokens: int = option(77, "answer mode: most tokens of an answer (the stage's default)", ge=1)


def _norm(text: str) -> str:
    return " ".join(_WORDS.findall(text.lower()))


def match_answer(answer: str, classnames: Sequence[str]) -> int | None:
    """The class an answer names: exact (case and punctuation ignored), else the longest class name it contains as
    whole words, else the closest name by difflib (ratio >= 0.6), else None."""
    names = [_norm(c) for c in classnames]
    said = _norm(answer)
    if said in names:
        return names.index(said)
    inside = [(len(n), i) for i, n in enumerate(names) if n and re.search(rf"\b{re.escape(n)}\b", said)]
    if inside:
        return max(inside)[1]
    close = difflib.get_close_matches(said, names, n=1, cutoff=0.6)
    return names.index(close[0]) if close else None


class LMMScorer:
    """Stands where an image encoder stands: images (B, 3, S, S) uint8, padded squares -> class scores (B, K)."""

    def __init__(self, settings: dict[str, Any], classnames: Sequence[str], generator: TextGenerator | None) -> None:
        self.settings, self.classnames = settings, list(classnames)
        self._generator = generator
        self.spec = f"lmm:{settings['backend']}:{settings['model']}"
        self.embed_dim = len(self.classnames)
        self.side = int(settings["image_side"])
        self.preprocess_id = f"lmm-pad-square-{self.side}"

    @property
    def generator(self) -> TextGenerator:
        if self._generator is None:
            s = self.settings
            self._generator = load_generator(s["backend"], s["model"], s.get("endpoint"), s.get("device", "cpu"))
        return self._generator

    def fingerprint(self) -> str:
        blob = json.dumps({"settings": self.settings, "classnames": self.classnames}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        square = ImageOps.pad(image.convert("RGB"), (self.side, self.side), Image.Resampling.BICUBIC, color=0)
        return torch.from_numpy(np.asarray(square).copy()).permute(2, 0, 1)  # (3, S, S) uint8

    def question(self) -> str:
        return self.settings["prompt"].replace("{options}", " " + ", ".join(self.classnames))

    def encode_images(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        pil = [Image.fromarray(x.permute(1, 2, 0).to(torch.uint8).cpu().numpy()) for x in images]
        requests = [GenRequest(self.question(), im) for im in pil]
        if self.settings["mode"] == "likelihood":
            scorer = self.generator
            assert isinstance(scorer, LikelihoodScorer)
            filled = [self.settings["answer"].format(c) for c in self.classnames]
            return torch.tensor(scorer.score(requests, filled), dtype=torch.float32)  # (B, K)
        answers = self.generator.generate(requests, GenSettings(max_new_tokens=self.settings["max_new_tokens"]))
        scores = torch.zeros(len(answers), len(self.classnames))
        for row, text in enumerate(answers):
            hit = match_answer(text, self.classnames)
            if hit is not None:
                scores[row, hit] = 1.0
        return scores

    def encode_image_tokens(self, images: torch.Tensor, normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        scores = self.encode_images(images)
        return scores, scores[:, None]  # no patch tokens: the scores stand in


class LMMZeroShotClassifier(Classifier):
    """No weights: the LMM's class scores are the logits."""

    def __init__(self, classnames: Sequence[str], settings: dict[str, Any]) -> None:
        super().__init__(classnames)
        self.settings = dict(settings)
        self._generator: TextGenerator | None = None
        self._scorer: LMMScorer | None = None

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return features.float().cpu()  # (N, K)

    def image_encoder(self, backbone: Backbone) -> Backbone:
        if self._scorer is None:
            self._scorer = LMMScorer(self.settings, self.classnames, self._generator)
        return self._scorer  # type: ignore[return-value]

    def for_classnames(self, classnames: Sequence[str], backbone: Backbone) -> LMMZeroShotClassifier:
        clf = LMMZeroShotClassifier(classnames, self.settings)
        clf._generator = self._generator
        return clf

    def extra_meta(self) -> dict[str, Any]:
        return {"settings": self.settings}

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> LMMZeroShotClassifier:
        return cls(meta["classnames"], meta["settings"])


@register_method("lmm_zeroshot")
class LMMZeroShot(Method):
    """The LMM picks the class of each image from the option list (or ranks the classes by likelihood)."""

    config_cls = LMMZeroShotConfig
    classifier = LMMZeroShotClassifier
    capability = Capability.FEATURES
    needs_labels = False
    needs_train = False  # like CLIP zero-shot: class names alone (the text stage comes without images)
    default_shots = 0
    supports_new_classes = True
    summary = "LMM zero-shot: the text-generation backend picks a class from the option list (paper 004's LLaVA)"

    def fit(self, handle: Backbone, task: Task, *, generator: torch.Generator) -> LMMZeroShotClassifier:
        if task.texts is None:
            raise VlmtuneError("lmm_zeroshot asks the run's text-generation backend: run it through the runner")
        cfg, stage = self.config, task.texts.stage
        backend = stage.generator
        scores = isinstance(backend, LikelihoodScorer)
        follows = getattr(backend, "follows_instructions", True)
        mode = cfg.mode if cfg.mode != "auto" else ("answer" if follows or not scores else "likelihood")
        if mode == "likelihood" and not scores:
            raise VlmtuneError(f"the {stage.backend} text-generation backend cannot score answers: use mode=answer")
        if mode == "likelihood":
            self.hooks.note(
                f"lmm_zeroshot: the {stage.backend} backend "
                + ("does not follow instructions" if not follows else "was asked for likelihoods")
                + f"; classes ranked by its log-likelihood of {cfg.answer!r} with each class name"
            )
        side = cfg.image_side or (32 if stage.backend == "toy" else 672)
        settings = {
            "backend": stage.backend, "model": stage.model_id, "endpoint": stage.endpoint, "device": stage.device,
            "prompt": cfg.prompt or task.texts.prompts.select, "mode": mode, "answer": cfg.answer,
            "image_side": side, "max_new_tokens": cfg.max_new_tokens,
        }  # fmt: skip
        clf = LMMZeroShotClassifier(task.classnames, settings)
        clf._generator = backend
        return clf
