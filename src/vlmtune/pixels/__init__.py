"""Training on pixels: label-free image sets, augmented views, data loaders, the training loop (mixed precision
on GPU, ``torchrun`` / DDP), the encoding pass through a tuned tower, EMA encoders and a MoCo queue.

Methods that tune visual prompts or the image tower, or that need augmented views, get ``Task.images`` (and
``Task.train_images`` for labelled shots) from the runner; frozen-feature methods keep the feature cache.
"""

from vlmtune.pixels.augment import RECIPES, input_size, view
from vlmtune.pixels.data import ImageSet, LabelledViews, ViewDataset, encode_all, make_loader
from vlmtune.pixels.dist import DistInfo, dist_info, init_from_env, is_main
from vlmtune.pixels.ema import EMAEncoder, MoCoQueue
from vlmtune.pixels.loop import LossModule, train_pixels

__all__ = [
    "RECIPES",
    "DistInfo",
    "EMAEncoder",
    "ImageSet",
    "LabelledViews",
    "LossModule",
    "MoCoQueue",
    "ViewDataset",
    "dist_info",
    "encode_all",
    "init_from_env",
    "input_size",
    "is_main",
    "make_loader",
    "train_pixels",
    "view",
]
