"""The prompts of the text-generation stage: the papers' wording by default, the reference code's by name.

Placeholders: ``{domain}`` / ``{domains}`` (what the dataset shows, singular / plural), ``{classname}`` (class
descriptions), ``{label}`` (the zero-shot pseudo-label of the image: the LatteCLIP code's Flowers / Food prompts),
``{options}`` (LMM zero-shot). ``{}`` stays literal: it is the class slot a generated template must contain.

- ``image`` / ``group``: paper 004 Sec. 3.1 (``paper``) or the LatteCLIP code's per-dataset prompts
  (``reference``: "...concisely, less than 20 words."; EuroSAT's satellite wording; Flowers / Food name the label).
- ``class``: a one-sentence visual description of a class (LaFTer-style; the exact wording of LaFTer's GPT prompts
  is not published with its code, see docs/fidelity.md).
- ``templates``: a caption with a ``{}`` class slot (CoFT+: the paper gives no prompt; ours, see docs/fidelity.md).
- ``select``: paper 004's LLaVA zero-shot prompt.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from vlmtune.errors import UnknownName

Kind = Literal["image", "group", "class", "templates", "select"]
KINDS: tuple[str, ...] = ("image", "group", "class", "templates", "select")
VARIANTS = ("paper", "reference")

# (singular, plural) of what each dataset shows: the LatteCLIP code's [domain] words; others "object(s)"
DOMAINS: dict[str, tuple[str, str]] = {
    "dtd": ("texture", "textures"),
    "sun397": ("scene", "scenes"),
    "fgvc_aircraft": ("aircraft", "aircraft"),
    "oxford_pets": ("pet", "pets"),
    "stanford_cars": ("car", "cars"),
    "caltech101": ("object", "objects"),
    "ucf101": ("action of the person", "actions of the persons"),
    "eurosat": ("land use", "land uses"),
    "oxford_flowers": ("flower", "flowers"),
    "food101": ("food", "foods"),
    "imagenet": ("object", "objects"),
}
TOY_DOMAIN = ("shape", "shapes")

PAPER = {
    "image": "Describe the {domain} in the photo concisely, using less than 20 words.",
    "group": "Describe the common visual attributes of the {domain} in all the photos concisely, "
    "in fewer than 20 words.",
    "class": "Describe in one sentence what a {classname}, a kind of {domain}, looks like in a photo.",
    "templates": "Write one short caption of a photo of a {domain}, with {{}} in place of the {domain}'s name.",
    "select": "Select the most appropriate category for the image from the following options:{options}. "
    "Write only the category name.",
}
_REFERENCE_IMAGE = "Describe the {domain} in the photo concisely, less than 20 words."
_REFERENCE_GROUP = (
    "Describe the common visual attributes of the {domains} in all the photos concisely, less than 20 words."
)
REFERENCE_OVERRIDES: dict[str, dict[str, str]] = {
    "eurosat": {
        "image": "Describe the land use in the satellite image concisely, less than 20 words.",
        "group": "Describe the common visual attributes of the land use in all the satellite images concisely, "
        "less than 20 words.",
    },
    "oxford_flowers": {"image": "Describe the {label} flower in the photo concisely, less than 20 words."},
    "food101": {"image": "Describe the {label} food in the photo concisely, less than 20 words."},
}


def base_dataset(dataset: str) -> str:
    """``caltech101@noisy=...`` -> ``caltech101``; ``toy:shapes-pool`` stays as it is."""
    return dataset.split("@", 1)[0]


def domain_of(dataset: str) -> tuple[str, str]:
    name = base_dataset(dataset)
    if name.startswith("toy:"):
        return TOY_DOMAIN
    return DOMAINS.get(name, ("object", "objects"))


@dataclass(frozen=True)
class Prompts:
    """The prompt of each kind for one dataset (overridable: ``with_overrides``)."""

    image: str
    group: str
    class_: str
    templates: str
    select: str
    variant: str = "paper"

    @classmethod
    def for_dataset(cls, dataset: str, variant: str = "paper") -> Prompts:
        if variant not in VARIANTS:
            raise UnknownName("prompt variant", variant, list(VARIANTS))
        singular, plural = domain_of(dataset)
        texts = dict(PAPER)
        if variant == "reference":
            texts.update(image=_REFERENCE_IMAGE, group=_REFERENCE_GROUP)
            texts.update(REFERENCE_OVERRIDES.get(base_dataset(dataset), {}))

        def fill(text: str) -> str:  # the dataset's words now; per-image placeholders stay
            return text.replace("{domains}", plural).replace("{domain}", singular)

        return cls(
            image=fill(texts["image"]),
            group=fill(texts["group"]),
            class_=fill(texts["class"]),
            templates=fill(texts["templates"]).replace("{{}}", "{}"),
            select=fill(texts["select"]),
            variant=variant,
        )

    def with_overrides(self, overrides: dict[str, str]) -> Prompts:
        """Replace the prompts of some kinds (keys from ``KINDS``)."""
        unknown = [k for k in overrides if k not in KINDS]
        if unknown:
            raise UnknownName("prompt kind", unknown[0], list(KINDS))
        return replace(self, **{("class_" if k == "class" else k): v for k, v in overrides.items()})

    def get(self, kind: str) -> str:
        if kind not in KINDS:
            raise UnknownName("text kind", kind, list(KINDS))
        return getattr(self, "class_" if kind == "class" else kind)
