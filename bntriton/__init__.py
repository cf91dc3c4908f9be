"""bntriton: batch normalization as Triton kernels, with a PyTorch front end.

Public names only; see README.md.
"""
from .distributed import SyncBatchNorm
from .functional import batch_norm
from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d, convert_model
from .verify import Report, verify

__all__ = [
    "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "Report", "SyncBatchNorm", "batch_norm",
    "convert_model", "verify",
]
__version__ = "0.1.0"
