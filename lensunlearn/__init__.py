"""lensunlearn: unlearn knowledge from a language model through its tuned lenses."""

__version__ = "0.1.0"
