"""A tiny stand-in for the parts of torchvision that segment-anything imports.

torchvision has no CPU build on our CI machines, and segment-anything is only the numerical
reference in tests, so we provide exactly what it calls: PIL resizing and box NMS.
"""
