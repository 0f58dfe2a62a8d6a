"""The package version, here at the bottom so every layer may read it."""

__version__ = "0.1.0"
