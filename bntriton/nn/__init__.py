"""Drop-in modules and model conversion: ``BatchNorm1d/2d/3d`` (torch's classes on
bntriton's functional layer), ``BatchNormAct1d/2d/3d`` (batch norm + activation, with a
residual and in place), ``SyncBatchNorm``, and ``convert_model`` / ``revert_model`` /
``fold_batch_norm`` with what they need: the tracer that keeps mode-dependent modules as
modules, the layer patterns that can be taken over, graph fusion and ``ConversionReport``."""
from .conversion_report import ConversionReport
from .convert import convert_model, fold_batch_norm, revert_model
from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchNormAct1d, BatchNormAct2d, BatchNormAct3d
from .sync_batchnorm import SyncBatchNorm

__all__ = [
    "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "BatchNormAct1d", "BatchNormAct2d", "BatchNormAct3d", "ConversionReport",
    "SyncBatchNorm", "convert_model", "fold_batch_norm", "revert_model",
]
