"""The method contract: ``Method`` (a frozen config dataclass + ``fit(handle, task, *, generator) -> Classifier``),
``Classifier`` (an adapter: logits, safetensors + JSON), ``Task`` and ``TrainingHooks``.

Methods never load models, write caches, compute metrics, parse the CLI or print: the runner does that and
hands each method only the access its ``capability`` names. Registration lives in ``vlmtune.methods.registry``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from safetensors.torch import save_file
from torch import nn
from typing_extensions import Self

from vlmtune._io import atomic_write, file_sha256
from vlmtune.capabilities import Capability

if TYPE_CHECKING:  # black-box methods import this module: it must not pull in model code at run time
    from vlmtune.backbones.base import Backbone
    from vlmtune.blackbox.api import ImageRefs
    from vlmtune.features.extract import FeatureSet, UnlabeledFeatures
    from vlmtune.pixels.data import ImageSet
    from vlmtune.textgen.stage import DatasetTexts

log = logging.getLogger(__name__)
ADAPTER_FORMAT = 2  # adapter.json layout; 2: checksums; 0 = written before the format was recorded (all still read)


def adapter_meta_sha256(meta: dict[str, Any]) -> str:
    """SHA-256 of an adapter.json's canonical JSON without its own ``meta_sha256`` field."""
    body = {k: v for k, v in meta.items() if k != "meta_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


StepFn = Callable[[int, int, str, dict[str, float]], None]  # (step, total steps, unit, metrics)
# (round, kind, indices, labels, source, confidence or None)
PseudoFn = Callable[[int, str, torch.Tensor, torch.Tensor, str, torch.Tensor | None], None]


@dataclass
class TrainingHooks:
    """What the runner may hand a long-running method (all optional; methods never write files or print).

    Attributes:
        monitor: called with (queries or steps used, snapshot classifier) every ``monitor_every`` units.
        monitor_every: spacing of monitor calls (0 = never).
        journal: an append-only log of the method's past generations, for exact resumption (see ``runs.journal``).
        on_step: receives training progress (step, total, unit, metrics such as loss): the runner's progress bar,
            training log and loss plot.
        notes: what the method wants the user told at the end (e.g. that a hard query limit stopped it early).
        on_pseudo_labels: receives a label-free method's pseudo-labels (see ``pseudo_labels``): the runner, which
            alone holds the hidden labels, measures their accuracy and class coverage.
    """

    monitor: Callable[[int, Classifier], None] | None = None
    monitor_every: int = 0
    journal: Any = None
    on_step: StepFn | None = None
    notes: list[str] = field(default_factory=list)
    on_pseudo_labels: PseudoFn | None = None

    def step(self, step: int, total: int, unit: str, **metrics: float) -> None:
        """Report progress: ``step`` of ``total`` ``unit``s done, with metrics (``loss=...``)."""
        if self.on_step is not None:
            self.on_step(step, total, unit, {k: float(v) for k, v in metrics.items()})

    def pseudo_labels(
        self,
        round: int,
        kind: str,
        indices: torch.Tensor,
        labels: torch.Tensor,
        source: str = "",
        confidence: torch.Tensor | None = None,
    ) -> None:
        """Report the pseudo-labels ``labels`` (M,) a label-free method gave the unlabelled images at ``indices``
        (M,) in ``round`` (0 = from the zero-shot model); ``kind`` is ``"all"`` (every image), ``"selected"``
        (the set it trains on), ``"clean"`` (the set a filter kept, CoFT) or ``"filter"`` (every label a filter
        judged, ``confidence`` > 0 = kept); ``source`` names the model that made them when a method has several
        (e.g. ``"model 1"``). ``confidence`` (M,): how sure the method is of each label (a filter's margin, a
        selection's score): the runner measures how well it separates right labels from wrong ones (AUROC)."""
        if self.on_pseudo_labels is not None:
            idx, lab = indices.detach().cpu().long(), labels.detach().cpu().long()
            conf = confidence.detach().cpu().float() if confidence is not None else None
            self.on_pseudo_labels(round, kind, idx, lab, source, conf)

    def note(self, text: str) -> None:
        """Tell the user something about this run (logged now, recorded in the results; once per text)."""
        if text not in self.notes:
            log.warning(text)
            self.notes.append(text)


@dataclass(frozen=True)
class Task:
    """What a method adapts to.

    Attributes:
        classnames: class names in label order.
        templates: prompt templates (the first is the dataset's default).
        train: labelled training features (few-shot regimes; uploaded image ids for black-box methods; the
            labelled shots of the semi-supervised regime), or None.
        val: labelled validation features for model selection, or None. Never test data.
        unlabeled: features of unlabelled images (label-free regimes): no labels exist in it, or None.
        images: the same unlabelled images as pixels (``ImageSet`` without labels, in the order of ``unlabeled``),
            for methods that train on pixels (``Method.wants_images``), else None.
        train_images: the images of ``train`` as pixels with their labels (pixel methods), else None.
        student: distillation (``Method.supports_student``): the backbone the method fine-tunes and returns an
            adapter for, while the ``fit`` handle (the teacher) pseudo-labels; None otherwise.
        texts: the text-generation stage bound to the training images (labels removed): LLM / LMM descriptions
            and templates, cached (``vlmtune.textgen``); bound to no image for methods that fit from class names
            alone; None outside the runner.
        encoder: a frozen client-side image encoder for black-box methods that compute prompts from the images
            themselves (BlackVIP's coordinator, ``Method.wants_encoder``); never the black box's model. Else None.
    """

    classnames: list[str]
    templates: list[str]
    train: FeatureSet | ImageRefs | None = None
    val: FeatureSet | ImageRefs | None = None
    unlabeled: UnlabeledFeatures | None = None
    images: ImageSet | None = None
    train_images: ImageSet | None = None
    student: Backbone | None = None
    texts: DatasetTexts | None = None
    encoder: Backbone | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classnames)


class Classifier(nn.Module, ABC):
    """An adapted model: logits for image features, and saving/loading as safetensors + JSON."""

    storage_dtype: ClassVar[torch.dtype] = torch.float32  # dtype of floating tensors in the saved artifact

    def __init__(self, classnames: Sequence[str]) -> None:
        super().__init__()
        self.classnames = list(classnames)

    @property
    def method(self) -> str:
        """The registry name of the method that made this adapter (recorded by ``Method.fit`` and the loader)."""
        name = self.__dict__.get("_method_name")
        if name is None:  # built outside fit (e.g. ``for_classnames``): the one method returning this class
            from vlmtune.methods.registry import method_of

            name = method_of(type(self))
        return name

    @method.setter
    def method(self, name: str) -> None:
        self.__dict__["_method_name"] = name

    @abstractmethod
    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """L2-normalised image features (N, D) -> logits (N, K)."""

    def score(self, data: FeatureSet) -> torch.Tensor:
        """Logits (N, K) for a feature set (methods that need patch features override this)."""
        with torch.no_grad():
            return self.logits(data.features)

    def bind(self, backbone: Backbone) -> Self:
        """Attach the backbone a loaded adapter computes through (prompt learners); a no-op for most."""
        return self

    def image_encoder(self, backbone: Backbone) -> Backbone:
        """The backbone whose image features this adapter scores: ``backbone`` itself, or (adapters that tuned the
        image tower) its tuned copy, whose features are cached under its own fingerprint."""
        return backbone

    def predict_images(self, backbone: Backbone, images: torch.Tensor) -> torch.Tensor:
        """Preprocessed images (N, 3, H, W) -> logits (N, K)."""
        with torch.no_grad():
            return self.bind(backbone).logits(self.image_encoder(backbone).encode_images(images))

    def for_classnames(self, classnames: Sequence[str], backbone: Backbone) -> Classifier:
        """The same adapter for other class names (new classes), where the method allows it."""
        raise NotImplementedError(f"{self.method} cannot classify class names it was not trained on")

    def extra_meta(self) -> dict[str, Any]:
        """JSON-serialisable settings needed to rebuild the classifier (besides its tensors)."""
        return {}

    def extra_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors saved beside the state dict (e.g. a tuned image tower); ``from_state`` receives them too."""
        return {}

    @classmethod
    @abstractmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Classifier:
        """Rebuild from ``save``'s tensors and metadata."""

    def save(self, folder: str | Path, **info: Any) -> Path:
        """Write ``adapter.safetensors`` + ``adapter.json`` into ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {
            k: (v.to(self.storage_dtype) if v.is_floating_point() else v).detach().cpu().contiguous()
            for k, v in {**self.state_dict(), **self.extra_tensors()}.items()
        }
        data = folder / "adapter.safetensors"
        try:
            atomic_write(data, lambda tmp: save_file(tensors, tmp))
        except Exception as exc:  # safetensors reports a full disk as its own error type
            if isinstance(exc, OSError):
                raise
            raise OSError(f"could not write {data}: {exc}") from None
        from vlmtune._version import __version__

        meta = {"format": ADAPTER_FORMAT, "vlmtune": __version__, "method": self.method}
        meta |= {"classifier": type(self).__name__, "classnames": self.classnames}
        meta |= {**self.extra_meta(), **info}
        meta["tensors_sha256"] = file_sha256(data)
        meta["meta_sha256"] = adapter_meta_sha256(meta)
        atomic_write(folder / "adapter.json", lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=1)))
        return folder


class Method(ABC):
    """A registered adaptation method (see ``register_method``)."""

    name: ClassVar[str]
    capability: ClassVar[Capability]
    config_cls: ClassVar[type]
    classifier: ClassVar[type[Classifier]]
    extra_classifiers: ClassVar[tuple[type[Classifier], ...]] = ()  # what else ``fit`` may return (by option)
    needs_labels: ClassVar[bool] = True  # False: label-free (gets ``Task.unlabeled``; labelled shots only if asked)
    default_shots: ClassVar[int] = 16  # labelled shots per class when the run names none (label-free: 0)
    needs_train: ClassVar[bool] = True  # False: fits from class names alone (zero-shot)
    needs_patches: ClassVar[bool] = False  # the runner extracts patch features too
    supports_new_classes: ClassVar[bool] = False
    supports_student: ClassVar[bool] = False  # distillation: fine-tunes ``Task.student`` (``RunConfig.student``)
    summary: ClassVar[str] = ""
    presets: ClassVar[dict[str, dict[str, Any]]] = {}  # named option sets (``--set preset=NAME``)

    def __init__(self, config: Any = None) -> None:
        self.config = config if config is not None else self.config_cls()
        self.hooks = TrainingHooks()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Every ``fit`` records the registry name on the adapter it returns (its ``adapter.json`` names it)."""
        super().__init_subclass__(**kwargs)
        fit = cls.__dict__.get("fit")
        if fit is None or getattr(fit, "__isabstractmethod__", False) or getattr(fit, "_names_adapter", False):
            return

        @functools.wraps(fit)
        def named_fit(self: Method, handle: Any, task: Task, *, generator: torch.Generator) -> Classifier:
            clf = fit(self, handle, task, generator=generator)
            if isinstance(clf, Classifier):
                clf.method = self.name
            return clf

        named_fit._names_adapter = True  # type: ignore[attr-defined]
        cls.fit = named_fit  # type: ignore[method-assign]

    def wants_images(self) -> bool:
        """Whether ``fit`` trains on pixels (``Task.images`` / ``Task.train_images``); may depend on the config."""
        return False

    def box_options(self) -> dict[str, Any]:
        """Keyword options for the ``LocalBlackBox`` a black-box method is run against (e.g. visual prompts)."""
        return {}

    def wants_encoder(self) -> str | None:
        """A black-box method's client-side image encoder (``Task.encoder``): its backbone spec, ``""`` for the
        run's own backbone spec, or None (no encoder, the default)."""
        return None

    @abstractmethod
    def fit(self, handle: Any, task: Task, *, generator: torch.Generator) -> Classifier:
        """Adapt to ``task`` through ``handle`` (a ``Backbone``, or a ``BlackBoxVLM`` for ``BLACK_BOX`` methods);
        all randomness from ``generator``."""
