"""Names the config schema checks against: the stages in their fixed run order, and the metrics eval writes.

The stage registry (pipeline.stages) and the eval stage read them from here, so the schema needs neither.
"""

from __future__ import annotations

STAGES: tuple[str, ...] = ("sft", "dpo", "eval", "merge", "infer", "serve")
# the stages that train (every process of a multi-process run takes part); a run holds at most one of them
TRAINING_STAGES: tuple[str, ...] = ("sft", "dpo")
# what a run does when `stages` is not given: dpo only when asked (+experiment=dpo), serve runs until stopped
DEFAULT_STAGES: tuple[str, ...] = ("sft", "eval", "merge", "infer")

LOSS_METRICS: tuple[str, ...] = ("eval_loss", "perplexity", "token_acc")
# numeric_accuracy is only written when some reference holds a number
GENERATION_METRICS: tuple[str, ...] = ("bleu4", "rouge_l", "cider", "exact_match", "numeric_accuracy")
# written when the held-out rows are preference pairs (a chosen and a rejected answer)
PREFERENCE_METRICS: tuple[str, ...] = ("pref_accuracy", "pref_margin")

# what a training stage's periodic evaluation reports beside `loss` (logged as eval_<name>), which
# trainer.metric_for_best_model may name; dpo reports `nll` too when preference.rpo_alpha is set
TRAINING_EVAL_STATS: dict[str, tuple[str, ...]] = {
    "sft": ("token_acc",),
    "dpo": (
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
        "logps/chosen",
        "logps/rejected",
    ),
}
# dpo's statistics under preference.loss_type=kto: the desirable rows' (chosen) and the undesirable rows'
# (rejected) rewards and log-probabilities, each a mean over its own rows (KTO_STAT_COUNTS: the statistic that
# counts them), the KL estimate its loss subtracts, and the shares of desirable and undesirable rows
KTO_STATS: tuple[str, ...] = (
    "rewards/chosen",
    "rewards/rejected",
    "logps/chosen",
    "logps/rejected",
    "kl",
    "desirable",
    "undesirable",
)
KTO_STAT_COUNTS: dict[str, str] = {
    "rewards/chosen": "desirable",
    "logps/chosen": "desirable",
    "rewards/rejected": "undesirable",
    "logps/rejected": "undesirable",
}
