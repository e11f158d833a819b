"""Find and read checkpoint series: trainer layouts, sharded safetensors, parameter names -> (layer, module)."""

from .formats import TensorInfo
from .layouts import LAYOUTS, Layout, checkpoint_path, find_checkpoints
from .names import GLOBAL_LAYER, MatrixPlan, MatrixRef, plan_matrices
from .reader import Checkpoint, matched_matrices, open_checkpoint
from .writer import save_checkpoint

__all__ = [
    "GLOBAL_LAYER",
    "LAYOUTS",
    "Checkpoint",
    "Layout",
    "MatrixPlan",
    "MatrixRef",
    "TensorInfo",
    "checkpoint_path",
    "find_checkpoints",
    "matched_matrices",
    "open_checkpoint",
    "plan_matrices",
    "save_checkpoint",
]
