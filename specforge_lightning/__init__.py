"""specforge_lightning: train speculative-decoding drafts against a frozen target, on Lightning."""

__version__ = "0.1.0"
