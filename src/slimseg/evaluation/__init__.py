"""Evaluating SAM-family models: point-prompt mIoU on SA-1B style annotations (SlimSAM's validation)."""
