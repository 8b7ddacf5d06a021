"""Downstream evaluation: fine-tuning protocols, label-fraction sweep and true k-shot, on the ten tasks.

Protocols (docs/method.md §5–§6), for any encoder init (``scratch`` or a pretraining run / encoder file):

- ``paper``: the public ``Finetune/Finetuning.py``: the encoder frozen except its last ResNet stage,
  the 2048/128 → 128 feature layer after it re-initialised, ten heads trained with masked BCE, AdamW (5e-3, weight
  decay 1e-3) under a cosine OneCycle (5e-3 → 5e-4) stepped per micro-batch, micro-batches of 12 with 2-step
  gradient accumulation and norm clipping at 1.0, the trained stage's BatchNorm in training mode, early stopping on
  validation macro AUROC (≤ 100 epochs, patience 6, min_delta 1e-4, at least 6 epochs), the best epoch tested. The
  intended difference is defect 7: ``pos_weight`` is counted on the subset actually trained on. The frozen part's
  output is computed once per init, which makes thousands of runs affordable on a CPU; the public loop instead runs
  it in training mode (its BatchNorm on micro-batch statistics), which ``FinetuneSpec.trunk_batchnorm`` approximates
  by re-estimating the statistics on the training split (register D3, measured by ``bench/trunk_batchnorm.py``).
  Every hyper-parameter is pinned to its public line by ``tests/test_protocol_pinning.py``; every remaining
  difference is a row of the register (``docs/method.md`` §6).
- ``scratch_all``: the public code's no-pretraining baseline: every layer trained from random weights, with the
  same optimiser, schedule and stopping rule. (``paper`` applied to ``scratch`` is the like-for-like scratch.)
- ``probe``: logistic regression (scikit-learn) per task on the frozen encoder's 128-d features.

Settings: label fractions of the training split (the public sweep: fractions × seeds 123/456/789, random rows of the
patients with at least one label, drawn as ``Finetuning.py:351-358`` draws them) and true k-shot (k positives and k
negatives per task from the training split, the patient ids written out). The public code has no k-shot sampler:
k-shot here runs the ``paper`` protocol for a fixed number of epochs with no early stopping, since a 5-shot user
has no labelled validation set, its OneCycle spanning exactly those epochs (``kshot_schedule``, register D9). The draws of pretraining seed K are their own (draw seed d + 1000·K),
shared by every init of seed K, so paired differences stay paired and the seed-level interval includes the
variance of which patients were drawn.

Where each piece lives (one room each):

- ``subsets``: the public fraction draw and the k-shot draws;
- ``encoding``: an init built or loaded, its frozen trunk and features, the encoding cache;
- ``protocol``: the public fine-tuning loop, its trainable top (:class:`TopModel`) and validation macro AUROC;
- ``early_stopping``: the public stopping rule;
- ``probe``: the linear probe;
- ``whole_network``: the public network run whole: the no-pretraining baseline (every layer trained) and the
  exact public semantic of a frozen trunk (the reference of the trunk-BatchNorm benchmark);
- ``experiment``: one evaluation's data and inits, the fraction sweep and k-shot, their records;
- ``runs``: evaluations kept in an output folder (reused when the configuration matches), the profile's inits.
"""

from __future__ import annotations

from xcardia.finetune.early_stopping import EarlyStopping
from xcardia.finetune.encoding import (EncodedInit, build_init, encode, encode_cached, reestimate_trunk_batchnorm,
                                       refuse_unfinished, trunk_batchnorm_state)
from xcardia.finetune.experiment import (Experiment, load_predictions, prepare_experiment, run_fraction_sweep,
                                         run_kshot, save_predictions, task_record)
from xcardia.finetune.probe import linear_probe
from xcardia.finetune.protocol import TopModel, macro_auroc, predict_top, train_public_protocol, train_top
from xcardia.finetune.runs import (LAST_SUFFIX, fewshot_experiment, finetune_experiment, profile_inits,
                                   representative_inits)
from xcardia.finetune.whole_network import FrozenTrunkNetwork, train_frozen_trunk_network, train_scratch_all
from xcardia.finetune.subsets import (KSHOT_SEED_STRIDE, fraction_subset, kshot_draw_seed, kshot_subset,
                                      labelled_rows)
from xcardia.specs import FinetuneSpec

PROTOCOLS = ("paper", "probe", "scratch_all")

__all__ = [
    "PROTOCOLS", "EarlyStopping", "FrozenTrunkNetwork", "EncodedInit", "Experiment", "FinetuneSpec", "KSHOT_SEED_STRIDE", "LAST_SUFFIX",
    "TopModel", "build_init", "encode", "encode_cached", "fewshot_experiment", "finetune_experiment",
    "fraction_subset", "kshot_draw_seed", "kshot_subset", "labelled_rows", "linear_probe", "load_predictions",
    "macro_auroc", "predict_top", "prepare_experiment", "profile_inits", "reestimate_trunk_batchnorm", "refuse_unfinished", "representative_inits",
    "run_fraction_sweep", "run_kshot", "save_predictions", "task_record", "train_frozen_trunk_network", "train_public_protocol", "train_scratch_all",
    "train_top", "trunk_batchnorm_state",
]
