"""groupemotion_core: the pure PyTorch/PyAV heart of groupemotion.

Nothing in this package imports Ray or an object-storage client: it decodes media, builds the
paper's audio-visual model, saves and loads checkpoints, and holds the training pieces. The Ray
jobs in `ray_jobs` are thin runners over it.
"""

from groupemotion_core.schema import CLASSES

__all__ = ["CLASSES"]
