"""careen: refit existing cloud images without booting them."""

__version__ = "0.1.0"
