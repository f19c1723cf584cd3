"""``vlmtune reproduce``: one recipe per main table of the five papers, run through the protocols, our numbers
beside the papers' (``recipes``: what a table is; ``plan``: its runs and what they lack; ``execute``: running and
comparing; ``toy``: the recipes on the toy world)."""

from vlmtune.reproduce.execute import Reproduction, RunSettings, execute, write
from vlmtune.reproduce.plan import (
    DatasetCheck,
    Group,
    Selection,
    backbone_missing,
    data_missing,
    estimate,
    measured_times,
    plan,
    unavailable_rows,
)
from vlmtune.reproduce.recipes import BACKBONES, RECIPES, Recipe, Row, get_recipe

__all__ = [
    "BACKBONES",
    "RECIPES",
    "DatasetCheck",
    "Group",
    "Recipe",
    "Reproduction",
    "Row",
    "RunSettings",
    "Selection",
    "backbone_missing",
    "data_missing",
    "estimate",
    "execute",
    "get_recipe",
    "measured_times",
    "plan",
    "unavailable_rows",
    "write",
]
