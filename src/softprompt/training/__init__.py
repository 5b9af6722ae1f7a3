"""Training soft prompts: ``train(TrainConfig(...))`` runs setup, the loop, the test evaluation and
the report (:mod:`softprompt.training.loop`); tasks define data, loss and metrics
(:mod:`softprompt.training.tasks`); several processes and sharded models are in
:mod:`softprompt.training.distributed`."""

from softprompt.training.config import TrainConfig
from softprompt.training.loop import fit, train

__all__ = ["TrainConfig", "fit", "train"]
