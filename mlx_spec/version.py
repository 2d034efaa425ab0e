"""The package version (one home: the costs file keys measurements by it)."""

__version__ = "0.1.0"
