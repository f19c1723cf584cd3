"""Published numbers our protocol tables are put beside (accuracy, %), keyed by our method and dataset names."""

from __future__ import annotations

# Paper 003 (CoFT), Table 1: fully unlabelled train split -> test accuracy, CLIP ViT-B/16.
PAPER_003_TABLE1_DATASETS = (
    "caltech101",
    "dtd",
    "eurosat",
    "fgvc_aircraft",
    "oxford_flowers",
    "food101",
    "oxford_pets",
    "stanford_cars",
    "ucf101",
)
PAPER_003_TABLE1: dict[str, tuple[float, ...]] = {  # per dataset in the order above, then the average
    "zeroshot": (89.27, 44.73, 48.75, 25.11, 71.73, 84.83, 86.01, 66.52, 67.44, 64.93),
    "coft_plus": (94.40, 52.30, 90.20, 31.25, 79.60, 90.45, 93.16, 79.13, 80.23, 76.75),
    "coft": (95.50, 52.13, 86.02, 29.49, 78.08, 90.58, 92.40, 77.08, 78.35, 75.51),
    "upl": (94.56, 44.68, 66.20, 23.67, 73.37, 84.71, 90.43, 66.19, 71.82, 68.40),
    "ifpl": (93.47, 48.24, 39.31, 23.10, 68.86, 86.55, 89.42, 50.55, 68.70, 63.13),
    "grip": (92.13, 50.90, 59.68, 10.14, 68.25, 89.16, 91.69, 60.84, 70.50, 65.92),
    "lafter": (93.43, 51.77, 45.15, 20.91, 65.25, 83.72, 87.03, 60.76, 69.47, 64.17),
    "cpl": (82.80, 50.11, 63.59, 22.86, 65.73, 88.64, 90.08, 58.23, 68.23, 65.59),
}


def _per_dataset(
    table: dict[str, tuple[float, ...]],
    method: str,
    dataset: str,
    datasets: tuple[str, ...] = PAPER_003_TABLE1_DATASETS,
) -> str:
    """``table``'s number for ``method`` on ``dataset`` (the average over ``datasets`` for other datasets), or ''."""
    row = table.get(method)
    if row is None:
        return ""
    if dataset in datasets:
        return f"{row[datasets.index(dataset)]:.2f}"
    return f"{row[-1]:.2f} (avg of {len(datasets)})"


def paper_003(method: str, dataset: str) -> str:
    """Table 1's number for ``method`` on ``dataset`` (the 9-dataset average for other datasets), or ''."""
    return _per_dataset(PAPER_003_TABLE1, method, dataset)


# Paper 003, Table 2: CIFAR-100N (human labels, noise ~40%); CoFT / CoFT+ ignore the labels, the others train on them.
PAPER_003_TABLE2: dict[str, float] = {
    "ce": 72.41,
    "elr": 72.83,
    "sce": 72.52,
    "gmm": 76.06,
    "rolt": 75.91,
    "unicon": 77.68,
    "longremix": 73.94,
    "promix": 75.97,
    "deft": 79.04,
    "coft": 79.40,
    "coft_plus": 80.89,
}

# Paper 003, Table 3: Phase I on CLIP ViT-L/14, Phase II fine-tunes ViT-B/16 (datasets as Table 1, then the average).
PAPER_003_TABLE3: dict[str, tuple[float, ...]] = {
    "zeroshot": (89.27, 44.73, 48.75, 25.11, 71.73, 84.83, 86.01, 66.52, 67.44, 64.93),
    "coft_plus": (95.27, 57.72, 89.57, 37.67, 82.72, 93.53, 95.14, 83.87, 81.37, 79.65),
    "coft": (95.88, 57.97, 87.10, 36.86, 81.86, 92.59, 95.50, 83.38, 80.84, 79.11),
    "promptkd": (93.61, 55.08, 63.74, 26.24, 75.33, 88.84, 91.59, 73.93, 76.39, 71.33),
}


def paper_003_table2(method: str) -> str:
    """Table 2's CIFAR-100N number for ``method`` (linear_probe / coop stand beside its plain CE), or ''."""
    value = PAPER_003_TABLE2.get("ce" if method in ("linear_probe", "coop") else method)
    return "" if value is None else f"{value:.2f}" + (" (CE)" if method in ("linear_probe", "coop") else "")


def paper_003_table3(method: str, dataset: str) -> str:
    """Table 3's distillation number (L/14 -> B/16) for ``method`` on ``dataset`` (else the average), or ''."""
    return _per_dataset(PAPER_003_TABLE3, method, dataset)


# Paper 004 (LatteCLIP), Table 1: unlabelled train split -> test accuracy, OpenCLIP ViT-B/32 (LAION-2B); the oracle
# is FLYP on the true labels; "LLAVA zero-shot" is our lmm_zeroshot.
PAPER_004_TABLE1_DATASETS = (
    "eurosat",
    "sun397",
    "food101",
    "oxford_flowers",
    "dtd",
    "fgvc_aircraft",
    "oxford_pets",
    "stanford_cars",
    "ucf101",
    "caltech101",
)
PAPER_004_TABLE1: dict[str, tuple[float, ...]] = {  # per dataset in the order above, then the average
    "flyp": (94.46, 77.45, 85.01, 87.90, 76.65, 37.95, 92.42, 90.21, 79.49, 96.02, 81.76),
    "lmm_zeroshot": (44.78, 15.74, 29.81, 6.58, 20.27, 3.18, 28.92, 3.38, 44.25, 75.38, 27.23),
    "zeroshot": (42.95, 68.20, 78.65, 71.30, 55.32, 23.79, 87.30, 88.25, 64.37, 94.73, 67.49),
    "reclip": (49.25, 69.07, 77.91, 71.13, 56.91, 25.92, 88.50, 87.84, 68.86, 92.37, 68.78),
    "flyp_pl": (67.12, 70.19, 76.83, 68.78, 61.82, 17.40, 88.96, 84.19, 69.44, 94.69, 70.01),
    "latteclip": (80.27, 70.68, 79.63, 71.94, 56.26, 22.02, 89.21, 87.40, 70.08, 94.77, 72.23),
}


def paper_004(method: str, dataset: str) -> str:
    """Paper 004 Table 1's number for ``method`` on ``dataset`` (the 10-dataset average for others), or ''."""
    return _per_dataset(PAPER_004_TABLE1, method, dataset, PAPER_004_TABLE1_DATASETS)
