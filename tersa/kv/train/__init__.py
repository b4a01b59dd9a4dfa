"""Training RAT+ models and their attention twins from a YAML training recipe (``tersa train``).

- :func:`train`: the loop (active recurrence learning, resolution adaptation, checkpoints,
  ``--resume``, DDP under ``torchrun``) (:mod:`tersa.kv.train.loop`).
- :class:`TrainRecipe`, :func:`load_train_recipe`, :func:`parse_train_recipe`: the recipe
  (:mod:`tersa.kv.train.recipe`).
- ``init``: continue a Llama-family checkpoint converted to RAT+, with its tokenizer
  (:mod:`tersa.kv.train.converted`).
- :func:`train_tokenizer`: the byte-level BPE (:mod:`tersa.kv.train.tokenizer`).
- :func:`load_trained`: open a trained model by ``trained:NAME`` or folder
  (:mod:`tersa.kv.train.trained`).
"""

from tersa.kv.train.loop import TrainResult, train
from tersa.kv.train.recipe import TrainRecipe, load_train_recipe, parse_train_recipe
from tersa.kv.train.tokenizer import train_tokenizer
from tersa.kv.train.trained import TRAINED_PREFIX, load_trained, trained_dir

__all__ = [
    "TRAINED_PREFIX",
    "TrainRecipe",
    "TrainResult",
    "load_train_recipe",
    "load_trained",
    "parse_train_recipe",
    "train",
    "train_tokenizer",
    "trained_dir",
]
