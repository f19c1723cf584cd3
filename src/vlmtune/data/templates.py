"""Prompt templates: CoOp's per-dataset templates and CLIP's selected ensemble."""

from __future__ import annotations

import string

DEFAULT_TEMPLATE = "a photo of a {}."

# CoOp's CUSTOM_TEMPLATES (single template per dataset).
COOP_TEMPLATES = {
    "oxford_pets": "a photo of a {}, a type of pet.",
    "oxford_flowers": "a photo of a {}, a type of flower.",
    "fgvc_aircraft": "a photo of a {}, a type of aircraft.",
    "dtd": "{} texture.",
    "eurosat": "a centered satellite photo of {}.",
    "stanford_cars": "a photo of a {}.",
    "food101": "a photo of {}, a type of food.",
    "sun397": "a photo of a {}.",
    "caltech101": "a photo of a {}.",
    "ucf101": "a photo of a person doing {}.",
    "imagenet": "a photo of a {}.",
}

# The 7 ImageNet templates selected from CLIP's 80 (used by CoOp / Tip-Adapter for ensembling).
ENSEMBLE_TEMPLATES = [
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
]


def templates_for(dataset: str) -> list[str]:
    """The dataset's own template first, then the ensemble (duplicates dropped)."""
    first = COOP_TEMPLATES.get(dataset, DEFAULT_TEMPLATE)
    return [first] + [t for t in ENSEMBLE_TEMPLATES if t != first]


def clean_classname(name: str) -> str:
    """CoOp's class-name fix: underscores to spaces."""
    return name.replace("_", " ").strip()


def check_template(template: str) -> None:
    """A template has exactly one plain ``{}`` (no field names, conversions or format specs), else ValueError."""
    try:
        fields = [f for f in string.Formatter().parse(template) if f[1] is not None]
    except ValueError as exc:
        raise ValueError(f"template is not a valid format string ({exc}); use one '{{}}' for the class name") from None
    if len(fields) != 1 or fields[0][1] != "" or fields[0][2] or fields[0][3]:
        raise ValueError("template must contain exactly one '{}' (no names, conversions or format specs in braces)")
