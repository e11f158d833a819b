"""The demo zoo: real SFT, OPD and RLVR runs (and the paper's controls) of a tiny Qwen3-architecture model on
multi-digit addition with an exact-match reward, trained on CPU in minutes and saved as a trainer saves them.

``train_zoo(out, preset="classroom")`` trains it (resumable, deterministic in ``seed``), ``load_zoo(out)`` reads
its manifest, ``rank_constrained_retrain(out, run, K)`` retrains a run confined to its early channel and
``retrain_accuracy(out)`` tabulates the result. Needs ``transformers`` (the ``zoo`` extra).
"""

from .presets import PRESETS, RUNS, Preset, RunSpec
from .retrain import rank_constrained_retrain, retrain_accuracy
from .runner import MANIFEST, ZooError, load_zoo, train_zoo

__all__ = [
    "MANIFEST",
    "PRESETS",
    "RUNS",
    "Preset",
    "RunSpec",
    "ZooError",
    "load_zoo",
    "rank_constrained_retrain",
    "retrain_accuracy",
    "train_zoo",
]
