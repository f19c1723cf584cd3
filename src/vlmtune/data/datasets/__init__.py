"""Built-in datasets; importing this package registers them."""

from vlmtune.data.datasets import aircraft, cifar, coop, folder, imagenet, toy  # noqa: F401
