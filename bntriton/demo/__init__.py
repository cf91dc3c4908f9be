"""What batch norm buys, shown with bntriton's layers: ``bntriton demo``.

Five experiments on a seeded synthetic task (nothing downloaded): the range of learning
rates that trains with and without batch norm, deep nets' loss curves, normalizing z or a,
gamma/beta (the identity, sigmoid inputs), and running averages at test time.  One file per
job: settings (sizes), data, models, training, experiments, figures (optional matplotlib),
report (markdown + JSON), run (the command).
"""
from .run import main, run
from .settings import PRESETS, Settings, preset

__all__ = ["PRESETS", "Settings", "main", "preset", "run"]
