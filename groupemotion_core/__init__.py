"""groupemotion_core: the pure PyTorch/PyAV heart of groupemotion.

Nothing in this package imports Ray or an object-storage client: it decodes media, builds the
paper's audio-visual model, saves and loads checkpoints, and holds the training pieces. The Ray
jobs in `ray_jobs` are thin runners over it.

`Labeller` (groupemotion_core.labeller) labels one video from Python. It is imported when first
asked for: importing the package (every `groupemotion_core.*` import does) must not load PyAV and
torch where neither is needed, as in `groupemotion --help`.
"""

from groupemotion_core.schema import CLASSES

__all__ = ["CLASSES", "Labeller"]


def __getattr__(name: str):
    if name == "Labeller":
        from groupemotion_core.labeller import Labeller

        return Labeller
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
