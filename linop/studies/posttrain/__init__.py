"""FR-PT vs BP-PT: the post-training study of seed 001 §4 (Tables 1-6, Figures 5-6).

A converged baseline CNN is split into ``L`` layers (:mod:`.blocks`); for a pair
``(l_S, l_R)`` the modules ``l_S+1 … l_R`` are post-trained and everything else is frozen:

* **FR-PT** minimises seed 001 Eq. 3 (:mod:`.loss`), ``(1−α)·CE(y*, â_L) + α·MSE(a*_{l_R},
  â_{l_R})``, where ``a*_{l_R}`` is the feature map reconstructed from the label through the
  frozen layers above ``l_R`` (:mod:`.features`, cached on disk);
* **BP-PT** trains the same modules with CE alone (:mod:`.training`).

:func:`posttrain_study` (:mod:`.study`) runs both for every pair and run, resumably, and
writes the tables (:mod:`.summary`, :mod:`linop.studies.report`) and figures.  The command
line is ``linop posttrain`` (:mod:`linop.cli.posttrain`), which loads the baseline and data.
"""
from __future__ import annotations

from .blocks import (
                     accuracy_percent,
                     check_block_decomposition,
                     default_pairs,
                     forward_split,
                     layer_features,
                     model_blocks,
                     parse_pair,
                     set_trainable,
                     trainable_parameter_count,
                     validate_pairs,
)
from .features import (
                     EMBEDDINGS,
                     Reconstructor,
                     default_reconstructor,
                     output_target,
                     reconstruct_features,
)
from .loss import REC_LOSSES, fr_pt_loss, rec_loss_for_embedding
from .study import (
                     PAIRS_FIGURE,
                     PAPER_ALPHA,
                     StudyResult,
                     check_options,
                     default_report_epochs,
                     paper_alpha,
                     posttrain_study,
                     resolve_alpha,
)
from .summary import compare_methods, summarize
from .training import METHODS, OPTIMIZERS, posttrain_run, training_memory

__all__ = [
                     "EMBEDDINGS",
                     "METHODS",
                     "OPTIMIZERS",
                     "PAIRS_FIGURE",
                     "PAPER_ALPHA",
                     "REC_LOSSES",
                     "Reconstructor",
                     "StudyResult",
                     "accuracy_percent",
                     "check_block_decomposition",
                     "check_options",
                     "compare_methods",
                     "default_pairs",
                     "default_report_epochs",
                     "default_reconstructor",
                     "forward_split",
                     "fr_pt_loss",
                     "layer_features",
                     "model_blocks",
                     "output_target",
                     "paper_alpha",
                     "parse_pair",
                     "posttrain_run",
                     "posttrain_study",
                     "rec_loss_for_embedding",
                     "resolve_alpha",
                     "reconstruct_features",
                     "set_trainable",
                     "summarize",
                     "trainable_parameter_count",
                     "training_memory",
                     "validate_pairs",
]
