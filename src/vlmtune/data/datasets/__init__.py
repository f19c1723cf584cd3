"""Built-in datasets; importing this package registers them."""

from vlmtune.data.datasets import aircraft, coop, folder, imagenet, toy  # noqa: F401
