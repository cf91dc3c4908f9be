"""bntriton: batch normalization as Triton kernels, with a PyTorch front end.

Public names only; see README.md.
"""
from .functional import batch_norm
from .kernels.runtime import cpu_backend
from .nn import (
    BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchNormAct1d, BatchNormAct2d, BatchNormAct3d, ConversionReport,
    SyncBatchNorm, convert_model, fold_batch_norm, revert_model,
)
from .verification import Report, verify
from .version import __version__

__all__ = [
    "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "BatchNormAct1d", "BatchNormAct2d", "BatchNormAct3d", "ConversionReport",
    "Report", "SyncBatchNorm", "batch_norm", "cpu_backend", "convert_model", "fold_batch_norm", "revert_model",
    "verify",
]
