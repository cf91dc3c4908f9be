"""bntriton: batch normalization as Triton kernels, with a PyTorch front end.

Public names only; see README.md.
"""
from .act_modules import BatchNormAct1d, BatchNormAct2d, BatchNormAct3d
from .conversion_report import ConversionReport
from .convert import convert_model, fold_batch_norm, revert_model
from .distributed import SyncBatchNorm
from .functional import batch_norm
from .kernels.runtime import cpu_backend
from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d
from .verification import Report, verify
from .version import __version__

__all__ = [
    "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "BatchNormAct1d", "BatchNormAct2d", "BatchNormAct3d", "ConversionReport",
    "Report", "SyncBatchNorm", "batch_norm", "cpu_backend", "convert_model", "fold_batch_norm", "revert_model",
    "verify",
]
