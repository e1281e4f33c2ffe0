"""ultracurate: curation toolkit for instruction-based image-editing datasets."""

__version__ = "0.1.0"
