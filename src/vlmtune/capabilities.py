"""The access a method declares: what its ``fit`` receives as a handle."""

from __future__ import annotations

import enum


class Capability(enum.Enum):
    """``BLACK_BOX``: a ``BlackBoxVLM`` (predictions only); ``FEATURES``: frozen encoders; ``WHITE_BOX``: the model."""

    BLACK_BOX = "black_box"
    FEATURES = "features"
    WHITE_BOX = "white_box"
