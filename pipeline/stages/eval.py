"""eval: score a checkpoint on the held-out rows: loss, perplexity and token accuracy, then generation metrics.

    python -m pipeline stages=[eval] ckpt=outputs/<exp>/<time>          # an earlier run (its sft/best)
    python -m pipeline stages=[eval] ckpt=base eval.max_samples=50       # the base model, for comparison

Which weights: this run's sft checkpoint, else `ckpt` ("base" = model.path as it is). Which rows: the first
eval.max_samples validation rows of the dataset split (the same split sft held out, for the same seed).
Loss metrics are token-weighted over every response token (as in training); with eval.generate each row's
last response is generated greedily from its prompt (query, history, image) and scored against its references.
When the held-out rows are preference pairs (the response is the chosen answer), the model's preference is
scored too: pref_accuracy, the share of pairs whose chosen answer it gives the higher log-probability (summed
over the answer's tokens), and pref_margin, the mean of that difference.
After fine-tuning (eval.compare_base) the base model is scored on the same rows as well: the before/after
table (eval loss and task metrics of both, three answers with their images) is written to comparison.json
and printed at the end of the run; `stages=[eval] ckpt=base` reproduces its "base" column.
Reads: model, dataset, eval, ckpt, seed. Writes run_dir/eval/metrics.json and, with generation,
run_dir/eval/predictions.jsonl (base_predictions.jsonl, comparison.json when compared). Returns
{"metrics": {...}}; eval.objective is one of them (what sweeps optimise).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path

import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from pipeline.apps.generation import generate_for_rows, generation_settings, load_inference_bundle
from pipeline.config import BASE_CKPT, ConfigError, last_round_only, objective_problems, resolve_device
from pipeline.data.images import ImageFiles
from pipeline.data.prepare import read_dataset, split_dataset
from pipeline.data.rows import DatasetError, Row
from pipeline.families import family_from_config, image_limit, video_limit
from pipeline.families.base import Bundle, Family
from pipeline.stages.state import RunState
from pipeline.training.preference import PairCollate, PairSample
from pipeline.utils.io import atomic_write_json, atomic_write_text
from pipeline.utils.memory import advice_on_out_of_memory, halved, resolution_knob
from pipeline.utils.metrics import compute_generation_metrics

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
PREDICTIONS_FILE = "predictions.jsonl"
BASE_PREDICTIONS_FILE = "base_predictions.jsonl"
COMPARISON_FILE = "comparison.json"
# the before/after table's rows
COMPARED = ("eval_loss", "token_acc", "exact_match", "numeric_accuracy", "pref_accuracy", "pref_margin")
N_EXAMPLES = 3  # answers shown in the before/after table


def _batches(n: int, size: int) -> list[range]:
    return [range(start, min(start + size, n)) for start in range(0, n, size)]


@torch.no_grad()
def loss_metrics(
    family: Family,
    bundle: Bundle,
    rows: list[Row],
    batch_size: int,
    max_length: int,
    truncation: str,
    last_round: bool = False,
) -> dict[str, float]:
    """Returns eval_loss (mean cross-entropy per response token: every round's, or the last one's with
    `last_round`), perplexity, token_acc and num_tokens."""
    dataset = family.dataset(bundle, rows, max_length, truncation, ImageFiles(), last_round=last_round)
    model = bundle.core  # PEFT injects its LoRA layers into this module, so it scores with the adapter
    device = family.device_of(bundle)
    collate = family.eval_collate(bundle)
    loss_sum = tokens = correct = 0.0
    for indices in tqdm(_batches(len(dataset), batch_size), desc="eval loss", unit="batch", leave=False):
        batch = collate([dataset[i] for i in indices])
        batch = family.to_device(batch, device)
        out = family.loss_outputs(model, batch)
        loss_sum += float(out.loss_sum)
        tokens += float(out.num_tokens)
        correct += float(out.num_correct)
    if tokens == 0:
        raise DatasetError(
            "the evaluated rows hold no response token to score; check the dataset's responses"
        )
    loss = loss_sum / tokens
    # exp overflows a float past ~709; such a loss means the model predicts nothing anyway
    perplexity = math.exp(loss) if loss < 700 else float("inf")
    return {
        "eval_loss": loss,
        "perplexity": perplexity,
        "token_acc": correct / tokens,
        "num_tokens": int(tokens),
    }


@torch.no_grad()
def preference_metrics(
    family: Family,
    bundle: Bundle,
    rows: list[Row],
    batch_size: int,
    max_length: int,
    truncation: str,
    last_round: bool = True,
) -> dict[str, float]:
    """Returns pref_accuracy (the share of the rows' preference pairs whose chosen answer has the higher
    summed log-probability: the final answer's, or every round's without `last_round`) and pref_margin (the
    mean difference); nothing when no row is a pair."""
    pairs = [row for row in rows if row.rejected is not None]
    if not pairs:
        return {}
    images = ImageFiles()
    chosen = family.dataset(bundle, pairs, max_length, truncation, images, last_round=last_round)
    rejected_rows = [dataclasses.replace(row, response=row.rejected, num_tokens=None) for row in pairs]
    rejected = family.dataset(bundle, rejected_rows, max_length, truncation, images, last_round=last_round)
    collate = PairCollate(family.eval_collate(bundle))
    device = family.device_of(bundle)
    margins: list[float] = []
    for indices in tqdm(_batches(len(pairs), batch_size), desc="eval pairs", unit="batch", leave=False):
        batch = collate([PairSample(i, chosen[i], rejected[i]) for i in indices])
        batch = family.to_device(batch, device)
        logps = family.sequence_logps(bundle.core, batch).logps.float()
        n = len(indices)
        margins += (logps[:n] - logps[n:]).tolist()
    return {
        "pref_accuracy": sum(m > 0 for m in margins) / len(margins),
        "pref_margin": sum(margins) / len(margins),
    }


def prediction_record(row: Row, response: str) -> dict:
    """Returns one predictions.jsonl row: the prompt, the generated response and the label."""
    record = {
        "query": row.query,
        "response": response,
        "label": row.response,
        "history": [list(pair) for pair in row.history],
        "images": list(row.images),
        "system": row.system,
    }
    if row.references:
        record["references"] = list(row.references)
    return record


def _log_table(metrics: dict, n_rows: int, ckpt: Path | None) -> None:
    lines = [f"eval on {n_rows} held-out row(s), {ckpt if ckpt is not None else 'base model'}:"]
    lines += [f"  {name:<17} {value:.4f}" for name, value in metrics.items()]
    log.info("\n".join(lines))


def score(
    cfg: DictConfig, family: Family, bundle: Bundle, rows: list[Row]
) -> tuple[dict[str, float], int, list[str]]:
    """Returns the metrics of `bundle` on `rows`, the scored token count and the generated answers."""
    knobs = [
        halved("eval.batch_size", cfg.eval.batch_size),
        *([halved("eval.max_new_tokens", cfg.eval.max_new_tokens)] if cfg.eval.generate else []),
        "a smaller dataset.max_length",
        *resolution_knob(family.resolution_setting),
    ]
    with advice_on_out_of_memory(f"in the eval stage ({len(rows)} rows)", knobs):
        return _score(cfg, family, bundle, rows)


def _score(
    cfg: DictConfig, family: Family, bundle: Bundle, rows: list[Row]
) -> tuple[dict[str, float], int, list[str]]:
    encoding = (cfg.eval.batch_size, cfg.dataset.max_length, cfg.dataset.truncation)
    scores = loss_metrics(
        family, bundle, rows, *encoding, last_round=last_round_only(cfg.dataset.loss_scale, pairs=False)
    )
    num_tokens = scores.pop("num_tokens")
    metrics: dict[str, float] = dict(scores)
    metrics.update(
        preference_metrics(
            family, bundle, rows, *encoding, last_round=last_round_only(cfg.dataset.loss_scale, pairs=True)
        )
    )
    predictions: list[str] = []
    if cfg.eval.generate:
        settings = generation_settings({"max_new_tokens": cfg.eval.max_new_tokens})
        predictions = generate_for_rows(
            family, bundle, rows, settings, cfg.eval.batch_size, desc="eval generate"
        )
        references = [row.references or [row.response] for row in rows]
        metrics.update(compute_generation_metrics(predictions, references))
    return metrics, num_tokens, predictions


def _write_predictions(path: Path, rows: list[Row], predictions: list[str]) -> None:
    lines = [
        json.dumps(prediction_record(row, text), ensure_ascii=False)
        for row, text in zip(rows, predictions, strict=True)
    ]
    atomic_write_text(path, "".join(line + "\n" for line in lines))


def comparison_table(comparison: dict) -> str:
    """Returns the before/after table: base and fine-tuned metrics, then a few answers with their images."""
    base, tuned = comparison["base"], comparison["finetuned"]
    lines = [
        f"before/after fine-tuning, on {comparison['num_samples']} held-out row(s):",
        f"  {'metric':<17} {'base':>9} {'fine-tuned':>11}",
    ]
    lines += [f"  {name:<17} {base[name]:>9.4f} {tuned[name]:>11.4f}" for name in COMPARED if name in tuned]
    for example in comparison["examples"]:
        lines.append(f"  {example['image']}: {example['query']!r}, expected {example['label']!r}")
        lines.append(f"    base: {example['base']!r}  fine-tuned: {example['finetuned']!r}")
    return "\n".join(lines)


def _comparison(
    rows: list[Row], base: dict, tuned: dict, base_answers: list[str], tuned_answers: list[str]
) -> dict:
    """Returns comparison.json's content: both models' COMPARED metrics and the first rows' answers."""
    keep = [name for name in COMPARED if name in base and name in tuned]
    # rows with an image first: the table shows what each answer was looking at
    shown = sorted(range(len(rows)), key=lambda i: not rows[i].images)[:N_EXAMPLES]
    examples = [
        {
            "image": Path(rows[i].images[0]).name if rows[i].images else "(no image)",
            "query": rows[i].query,
            "label": rows[i].response,
            "base": base_answers[i],
            "finetuned": tuned_answers[i],
        }
        for i in (shown if base_answers and tuned_answers else [])
    ]
    return {
        "num_samples": len(rows),
        "base": {name: base[name] for name in keep},
        "finetuned": {name: tuned[name] for name in keep},
        "examples": examples,
    }


def run(cfg: DictConfig, run_dir: Path, state: RunState) -> dict:
    """Scores the checkpoint and returns {"metrics": {eval_loss, perplexity, token_acc, [generation metrics]}}.

    With a fine-tuned checkpoint and eval.compare_base, the base model is scored on the same rows too, and
    {"comparison": the before/after table} is returned as well.
    """
    problems = objective_problems(cfg.eval.objective, cfg.eval.generate)
    if problems:
        raise ConfigError(problems)
    eval_dir = Path(run_dir) / "eval"
    eval_dir.mkdir(parents=True, exist_ok=True)
    ckpt = state.weights_for("eval", cfg)
    load = dict(
        device=resolve_device(cfg),
        dtype=str(cfg.model.dtype),
        allow_download=cfg.model.trust_hub,
        family=family_from_config(cfg.model),
        quantization=cfg.model.quantization,
    )

    # ----- setup: model and held-out rows
    raw_rows = read_dataset(
        cfg.dataset, cfg.seed, image_limit(cfg.model), video_limit(cfg.model)
    )  # checked before any weight loads
    bundle, family = load_inference_bundle(state.model_path, ckpt, **load)
    splits = split_dataset(
        raw_rows,
        cfg.dataset,
        cfg.seed,
        # the stricter of the two scopes (a row kept for its final answer is kept for every answer)
        family.token_counter(
            bundle,
            cfg.dataset.max_length,
            cfg.dataset.truncation,
            ImageFiles(),
            last_round_only(cfg.dataset.loss_scale, pairs=True),
        ),
        problems_path=eval_dir / "dataset_problems.jsonl",
    )
    held_out = [row for row in splits.val if row.label is not False]  # an undesirable answer is no reference
    rows = held_out if cfg.eval.max_samples is None else held_out[: cfg.eval.max_samples]
    if not rows:
        raise DatasetError(
            f"dataset {cfg.dataset.name} has no held-out rows to evaluate: set dataset.val_path=<file> or "
            "dataset.test_ratio > 0"
        )

    # ----- score: loss over the responses, then generation
    metrics, num_tokens, predictions = score(cfg, family, bundle, rows)
    if predictions:
        _write_predictions(eval_dir / PREDICTIONS_FILE, rows, predictions)
    problems = objective_problems(cfg.eval.objective, cfg.eval.generate, written=metrics)
    if problems:  # numeric_accuracy on rows without numbers
        raise DatasetError(problems[0])
    comparison = None
    if ckpt is not None and cfg.eval.compare_base:
        del bundle  # one model in memory at a time
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        base_bundle, _ = load_inference_bundle(state.model_path, None, **load)
        base_metrics, _, base_predictions = score(cfg, family, base_bundle, rows)
        if base_predictions:
            _write_predictions(eval_dir / BASE_PREDICTIONS_FILE, rows, base_predictions)
        comparison = _comparison(rows, base_metrics, metrics, base_predictions, predictions)
        atomic_write_json(eval_dir / COMPARISON_FILE, comparison)

    # ----- report
    atomic_write_json(
        eval_dir / METRICS_FILE,
        {
            **metrics,
            "num_samples": len(rows),
            "num_tokens": num_tokens,
            "checkpoint": str(ckpt) if ckpt is not None else BASE_CKPT,
        },
    )
    _log_table(metrics, len(rows), ckpt)
    tracker = state.tracker
    if tracker is not None:
        numbers = {f"eval/{k}": float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        tracker.log(numbers, step=int((state.sft or {}).get("global_step", 0)))
        tracker.summary(numbers)
    result: dict = {"metrics": metrics}
    if comparison is not None:
        result["comparison"] = comparison_table(comparison)
    return result
