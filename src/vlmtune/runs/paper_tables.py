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
    "coft+": (94.40, 52.30, 90.20, 31.25, 79.60, 90.45, 93.16, 79.13, 80.23, 76.75),
    "coft": (95.50, 52.13, 86.02, 29.49, 78.08, 90.58, 92.40, 77.08, 78.35, 75.51),
    "upl": (94.56, 44.68, 66.20, 23.67, 73.37, 84.71, 90.43, 66.19, 71.82, 68.40),
    "ifpl": (93.47, 48.24, 39.31, 23.10, 68.86, 86.55, 89.42, 50.55, 68.70, 63.13),
    "grip": (92.13, 50.90, 59.68, 10.14, 68.25, 89.16, 91.69, 60.84, 70.50, 65.92),
    "lafter": (93.43, 51.77, 45.15, 20.91, 65.25, 83.72, 87.03, 60.76, 69.47, 64.17),
    "cpl": (82.80, 50.11, 63.59, 22.86, 65.73, 88.64, 90.08, 58.23, 68.23, 65.59),
}


def paper_003(method: str, dataset: str) -> str:
    """The paper's number for ``method`` on ``dataset`` (the 9-dataset average for other datasets), or ''."""
    row = PAPER_003_TABLE1.get(method)
    if row is None:
        return ""
    if dataset in PAPER_003_TABLE1_DATASETS:
        return f"{row[PAPER_003_TABLE1_DATASETS.index(dataset)]:.2f}"
    return f"{row[-1]:.2f} (avg of 9)"
