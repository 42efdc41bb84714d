"""Reading input data: images from disk."""
