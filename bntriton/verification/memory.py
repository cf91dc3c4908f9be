"""Bytes kept for the backward, as autograd sees them.

:func:`saved_bytes` runs a forward under ``torch.autograd.graph.saved_tensors_hooks`` and
adds up the *distinct storages* of everything saved: a tensor saved twice, or a view of
an input, counts once, and an output written into its input's storage (in-place) counts
as that one storage.
"""
from __future__ import annotations

import torch


def saved_bytes(fn, *args, **kwargs) -> tuple[int, object]:
    """``(bytes, fn(*args, **kwargs))``: the bytes of the distinct storages saved for backward."""
    storages: dict = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        storages[(storage.data_ptr(), t.device)] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args, **kwargs)
    return sum(storages.values()), out
