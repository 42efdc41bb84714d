"""Compression of SAM's image encoder after SlimSAM (Chen et al., 2023): prune, then distil.

SlimSAM slims the encoder in two stages, each followed by distillation from the teacher:

* ``"embedding"``: prune the residual-stream width (every block shares it);
* ``"bottleneck"``: prune each block's q/k/v head dims and MLP hidden width.

``importance`` ranks channels (SlimSAM's "disturbed Taylor" needs gradients collected
first); ``prune`` performs one stage in place with torch-pruning and returns the new exact
config; the ``distill*`` and training modules align the pruned student with its teacher.
Nothing is imported here, so that ``import slimseg`` never loads torch-pruning.
"""
