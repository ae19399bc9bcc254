"""Names the config schema checks against: the stages in their fixed run order, and the metrics eval writes.

The stage registry (pipeline.stages) and the eval stage read them from here, so the schema needs neither.
"""

from __future__ import annotations

STAGES: tuple[str, ...] = ("sft", "eval", "merge", "infer", "serve")

LOSS_METRICS: tuple[str, ...] = ("eval_loss", "perplexity", "token_acc")
# numeric_accuracy is only written when some reference holds a number
GENERATION_METRICS: tuple[str, ...] = ("bleu4", "rouge_l", "cider", "exact_match", "numeric_accuracy")
