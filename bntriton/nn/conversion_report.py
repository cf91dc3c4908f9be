"""What a conversion did, layer by layer: ``convert_model(..., report=True)`` and
``fold_batch_norm(..., report=True)`` return one beside the model, so that ``print(model)``
is not the only way to tell which batch norms bntriton took over and which it left.

Every batch norm the call leaves is also named in one warning per call (all of them in
one message), so nothing is skipped silently even when nobody asks for the report.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field


@dataclass
class ConversionReport:
    """Qualified layer names (as in ``model.named_modules()``) with what happened to them.

    * ``converted``: ``(name, "BatchNorm2d -> BatchNormAct2d(relu)")`` for every batch norm
      now computed by bntriton;
    * ``fused``: ``(name, "relu")`` / ``(name, "relu + residual")`` for those of them that
      also apply the activation (and the residual add) that followed them;
    * ``folded``: ``(batch norm, layer)`` pairs folded away by ``fold_batch_norm``;
    * ``left``: ``(name, reason)`` for every batch norm left as it was;
    * ``notes``: model-wide events (fusion given up, and why).
    """

    call: str
    converted: list = field(default_factory=list)
    fused: list = field(default_factory=list)
    folded: list = field(default_factory=list)
    left: list = field(default_factory=list)
    notes: list = field(default_factory=list)

    def counts(self) -> dict:
        return {"converted": len(self.converted), "fused": len(self.fused), "folded": len(self.folded),
                "left": len(self.left)}

    def __str__(self) -> str:
        c = self.counts()
        if self.call.startswith("fold_batch_norm"):
            head = f"{self.call}: folded {c['folded']} batch norms, left {c['left']}"
        else:
            head = (f"{self.call}: converted {c['converted']} batch norms, {c['fused']} of them "
                    f"fused with their activation; left {c['left']}")
        lines = [head]
        # The fused layers show in their conversion line: "-> bntriton.BatchNormAct2d(relu)".
        sections = [("note", [(None, n) for n in self.notes]), ("converted", self.converted),
                    ("folded", self.folded), ("left", self.left)]
        for title, entries in sections:
            for name, what in entries:
                lines.append(f"  {title:9} {what}" if name is None else f"  {title:9} {name}: {what}")
        return "\n".join(lines)

    def warn_left(self, stacklevel: int) -> None:
        """One warning naming every batch norm left, if any."""
        if self.left:
            listed = "; ".join(f"{name or '(the model itself)'}: {why}" for name, why in self.left)
            warnings.warn(f"{self.call} left {len(self.left)} batch norm(s) as they were: {listed}",
                          stacklevel=stacklevel + 1)
