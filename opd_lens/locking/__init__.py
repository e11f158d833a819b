"""Subspace locking: whether a run's update locks into an early low-dimensional channel (:func:`lock_alignment`),
training confined to such a channel (:class:`SubspaceProjector`), and a ``transformers.Trainer`` callback that
constrains a run and feeds its checkpoints to a store. The demo zoo's rank-constrained retraining is
:mod:`opd_lens.zoo.retrain`.

``OpdLensCallback`` needs ``transformers`` (the ``zoo`` extra), so it loads on first use.
"""

from .analysis import channel_overlap, final_channel_overlap, lock_alignment, lock_summary
from .projector import MODES, SubspaceError, SubspaceProjector, Subspaces, subspaces_from_checkpoint

__all__ = [
    "MODES",
    "OpdLensCallback",
    "SubspaceError",
    "SubspaceProjector",
    "Subspaces",
    "channel_overlap",
    "final_channel_overlap",
    "lock_alignment",
    "lock_summary",
    "subspaces_from_checkpoint",
]


def __getattr__(name: str):
    if name == "OpdLensCallback":
        from .callback import OpdLensCallback

        return OpdLensCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
