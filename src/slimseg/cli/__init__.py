"""The slimseg command line."""
