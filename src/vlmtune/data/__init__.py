"""Datasets as plain data: splits, few-shot picks, base/new splits, templates."""

from vlmtune.data.base import DatasetSplit, open_image
from vlmtune.data.fewshot import (
    base_new_classes,
    base_new_split,
    few_shot,
    few_shot_indices,
)
from vlmtune.data.registry import list_datasets, load_dataset, register_dataset

__all__ = [
    "DatasetSplit",
    "base_new_classes",
    "base_new_split",
    "few_shot",
    "few_shot_indices",
    "list_datasets",
    "load_dataset",
    "open_image",
    "register_dataset",
]
