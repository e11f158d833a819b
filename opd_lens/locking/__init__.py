"""Subspace locking: whether a run's update locks into an early low-dimensional channel (:func:`lock_alignment`),
training confined to such a channel (:class:`SubspaceProjector`), a ``transformers.Trainer`` callback that
constrains a run and feeds its checkpoints to a store, and rank-constrained retraining of the demo zoo.

``OpdLensCallback`` and the retraining need ``transformers`` (the ``zoo`` extra), so they load on first use.
"""

from .analysis import lock_alignment, lock_summary
from .projector import MODES, SubspaceError, SubspaceProjector, Subspaces, subspaces_from_checkpoint

__all__ = [
    "MODES",
    "OpdLensCallback",
    "RetrainJob",
    "SubspaceError",
    "SubspaceProjector",
    "Subspaces",
    "lock_alignment",
    "lock_summary",
    "rank_constrained_retrain",
    "retrain_accuracy",
    "subspaces_from_checkpoint",
]

_LAZY = {
    "OpdLensCallback": "callback",
    "RetrainJob": "retrain",
    "rank_constrained_retrain": "retrain",
    "retrain_accuracy": "retrain",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
