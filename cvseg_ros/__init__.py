"""Semantic segmentation of H.264 streams in the compressed domain."""
__version__ = "0.1.0"
