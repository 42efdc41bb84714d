"""Reading input data: images from disk, SA-1B and image-folder datasets, synthetic SA-1B folders."""
