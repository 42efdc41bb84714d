"""Segment everything: SAM's automatic mask generator over slimseg models, with grid or
AutoPPN point prompts."""

from slimseg.inference.everything.generator import MaskGenerator, PointProposer

__all__ = ["MaskGenerator", "PointProposer"]
