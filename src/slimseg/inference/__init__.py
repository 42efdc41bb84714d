"""Running models on images: prompts in, masks and records out."""
