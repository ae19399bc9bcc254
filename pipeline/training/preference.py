"""Preference training: the objective dpo gives the training loop, its pair batches and its reference.

A training row is a preference pair: a prompt with its images and two answers, the chosen and the rejected.
Both answers of a pair go into the same micro-batch, as two samples of the family's own collate (right-padded
or packed), the chosen answers of the micro-batch's n pairs first and their rejected answers after them, so
that the family runs the vision tower once per pair (Family.sequence_logps) and the token budget counts both
answers (a pair's size is its two token counts plus its vision patches once). Each answer's log-probability
is the sum over its tokens under the policy (the model being trained) and under the reference.

Losses (`preference.loss_type`; TRL's and ms-swift's definitions), with r = beta x (policy - reference):

    sigmoid  DPO: -log sigmoid(r_chosen - r_rejected), label-smoothed (cDPO) when label_smoothing > 0
    ipo      IPO: (h - 1 / (2 beta))^2 with h the log-ratio margin of the answers' mean token log-probs
    sigmoid_norm  DPO on the same mean token log-ratios: -log sigmoid(beta h)
    aot      AOT: sigmoid's loss, label-smoothed, of the policy's margins (logp chosen - logp rejected) sorted
             minus the reference's sorted, pair by pair in that order, within each micro-batch
    simpo    SimPO, reference-free: -log sigmoid(beta x (mean logp chosen - mean logp rejected) - gamma)
    cpo      CPO, reference-free: -log sigmoid(beta x (logp chosen - logp rejected)), label-smoothed
    orpo     ORPO, reference-free: -beta x log sigmoid(log odds chosen - log odds rejected), the odds of an
             answer p / (1 - p) with p its mean token probability, exp(mean logp)

and TRL's other pair losses on the answers' summed log-ratios to the reference, with a = r_chosen,
b = r_rejected, d = a - b: hinge max(0, 1 - d); robust (-(1 - e) log sigmoid(d) + e log sigmoid(-d)) /
(1 - 2e); exo_pair sigmoid(d) (log sigmoid(d) - log(1 - e)) + sigmoid(-d) (log sigmoid(-d) - log e); nca_pair
-log sigmoid(a) - (log sigmoid(-a) + log sigmoid(-b)) / 2; bco_pair -log sigmoid(a) - log sigmoid(-b);
sppo_hard (a - 1/2)^2 + (b + 1/2)^2 over beta^2; apo_zero 1 - sigmoid(a) + sigmoid(b); apo_down sigmoid(a) +
1 - sigmoid(d); discopop (1 - m) (-log sigmoid(d)) + m exp(-d) with m = sigmoid(d / tau); aot_unpaired
sigmoid's loss of d with the chosen and the rejected log-ratios each sorted within the micro-batch (e:
label_smoothing, tau: discopop_tau). With `f_divergence_type` other than reverse_kl (f-DPO), sigmoid, hinge,
robust, exo_pair and discopop read d as beta x (f'(t_chosen) - f'(t_rejected)), t an answer's probability ratio
to the reference (f_divergence_score), as TRL's do.

`loss_mix` weighs several of those last in place of loss_type (MPO: sigmoid 0.8, bco_pair 0.2, sft 1.0).

kto (KTO, TRL's KTOTrainer and ms-swift's `--rlhf_type kto`) trains on binary feedback: rows of one answer
labelled desirable or not (a pair is one of each). Its batches are laid out as pairs too, each row's sample
first and then its KL sample (the row's prompt and images with another row's answer, PairSample.label the
row's label), so the vision tower runs once a row. With r = the answer's log-ratio to the reference and
z = the KL samples' mean log-ratio over the micro-batch, clamped at 0 and without gradient (the estimate of
KL(policy || reference) the loss is measured against): a desirable row's loss is desirable_weight x
(1 - sigmoid(beta (r - z))), an undesirable one's undesirable_weight x (1 - sigmoid(beta (z - r))).

A term of the chosen answer's mean token negative log-likelihood is added at the weight
pipeline.config.nll_weight gives: `rpo_alpha` for sigmoid and ipo (ms-swift's RPO term, the SFT loss RLAIF-V
mixes in), `cpo_alpha` for cpo and simpo (TRL's CPOTrainer, which ms-swift runs both with), 1 for orpo, and
`sft`'s weight in a loss_mix. Every term is summed over pairs, so the loop normalises the loss by the pairs
of the whole accumulation window on all processes, as it does sft's by tokens: 1 and N processes give the
same gradient for the same global batch (not kto's, whose KL estimate is each micro-batch's, nor aot's and
aot_unpaired's, which sort within each micro-batch, as TRL sorts within each device's batch).

The reference (`Reference`): the same weights with the LoRA adapter disabled (`NoAdapterReference`: no
second copy in memory), or log-probabilities computed once before training and cached in the run folder
(`CachedReference`, `reference_table`): full fine-tuning, and training on from an sft adapter, whose model
is the reference. The cache file carries a key over the pairs and the model it was computed with, so a
resumed run reuses it and a changed one recomputes it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from pipeline.config import CHOICES, nll_weight
from pipeline.families.base import DESIRABLE, PAIR_INDEX, PAIRS, SequenceLogps
from pipeline.stage_names import KTO_STAT_COUNTS, KTO_STATS, TRAINING_EVAL_STATS
from pipeline.training.batching import plan_window
from pipeline.training.loop import ObjectiveSums, loader_options
from pipeline.utils.io import atomic_write_bytes

log = logging.getLogger(__name__)

LOSS_TYPES = CHOICES["preference.loss_type"]
REFERENCE_FREE = ("simpo", "cpo", "orpo")
# the losses whose answers are scored by their mean token log-probability rather than the sum
MEAN_LOGPS = ("ipo", "sigmoid_norm", "simpo", "orpo")
CACHE_FILE = "reference_logps.safetensors"
STATS = TRAINING_EVAL_STATS["dpo"]

# `logps(model, batch)`: each sample's summed log-probability (Family.sequence_logps)
LogpsFn = Callable[..., SequenceLogps]  # (model, batch, image_features=None): Family.sequence_logps


@dataclass(frozen=True)
class PreferenceSettings:
    """The objective's settings, resolved from the preference config group."""

    loss_type: str = "sigmoid"
    beta: float = 0.1
    rpo_alpha: float | None = None
    label_smoothing: float = 0.0
    simpo_gamma: float = 1.0
    cpo_alpha: float = 1.0
    discopop_tau: float = 0.05
    f_divergence: str = "reverse_kl"
    f_alpha: float = 0.5
    mix: tuple[tuple[str, float], ...] = ()  # preference.loss_mix: (loss, weight) in place of loss_type
    desirable_weight: float = 1.0  # kto
    undesirable_weight: float = 1.0

    @classmethod
    def from_config(cls, preference: Any) -> PreferenceSettings:
        """Returns the settings of the `preference` config node; beta null = ms-swift's (2.0 for simpo, else
        0.1)."""
        loss = str(preference.loss_type)
        if loss not in LOSS_TYPES:
            raise ValueError(f"preference.loss_type={loss} is not one of {', '.join(LOSS_TYPES)}")
        beta = preference.beta if preference.beta is not None else (2.0 if loss == "simpo" else 0.1)
        return cls(
            loss_type=loss,
            beta=float(beta),
            rpo_alpha=float(preference.rpo_alpha) if preference.rpo_alpha else None,
            label_smoothing=float(preference.label_smoothing),
            simpo_gamma=float(preference.simpo_gamma),
            discopop_tau=float(preference.discopop_tau),
            f_divergence=str(preference.f_divergence_type),
            f_alpha=float(preference.f_alpha_divergence_coef),
            cpo_alpha=float(preference.cpo_alpha),
            mix=tuple((str(name), float(weight)) for name, weight in (preference.loss_mix or {}).items()),
            desirable_weight=float(preference.desirable_weight),
            undesirable_weight=float(preference.undesirable_weight),
        )

    @property
    def nll_weight(self) -> float:
        """The weight of the chosen answer's mean token NLL in the loss (0: no such term)."""
        return nll_weight(self.loss_type, self.rpo_alpha, self.cpo_alpha, dict(self.mix))

    @property
    def needs_reference(self) -> bool:
        return self.loss_type not in REFERENCE_FREE


def kto_losses(
    logratios: torch.Tensor, kl_logratios: torch.Tensor, desirable: torch.Tensor, settings: PreferenceSettings
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns each row's KTO loss [n], its reward beta x its log-ratio to the reference (detached) and the
    KL estimate: `logratios` the rows' answers' [n], `kl_logratios` their KL samples' [n], `desirable` [n]
    bool (see the module's docstring)."""
    kl = kl_logratios.detach().mean().clamp(min=0)
    beta = settings.beta
    losses = torch.where(
        desirable,
        settings.desirable_weight * (1 - torch.sigmoid(beta * (logratios - kl))),
        settings.undesirable_weight * (1 - torch.sigmoid(beta * (kl - logratios))),
    )
    return losses, beta * logratios.detach(), kl


def preference_losses(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    ref_chosen: torch.Tensor | None,
    ref_rejected: torch.Tensor | None,
    settings: PreferenceSettings,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns each pair's loss, and the rewards of its chosen and rejected answer (detached).

    The log-probabilities are per pair [n]: summed over the answer's tokens (sigmoid, cpo), or their means
    (ipo, simpo, orpo); the reference's are None for a reference-free loss."""
    beta, smoothing = settings.beta, settings.label_smoothing
    if settings.loss_type in REFERENCE_FREE:
        if settings.loss_type == "orpo":
            # log(p / (1 - p)) of the mean token probability p = exp(mean logp) < 1
            def log_odds(mean_logps: torch.Tensor) -> torch.Tensor:
                mean_logps = mean_logps.clamp(max=-1e-6)
                return mean_logps - torch.log(-torch.expm1(mean_logps))

            losses = -beta * F.logsigmoid(log_odds(chosen) - log_odds(rejected))
        else:
            margin = beta * (chosen - rejected)
            if settings.loss_type == "simpo":
                margin = margin - settings.simpo_gamma
            losses = smoothed_sigmoid(margin, smoothing)
        return losses, (beta * chosen).detach(), (beta * rejected).detach()
    if ref_chosen is None or ref_rejected is None:
        raise ValueError(f"preference.loss_type={settings.loss_type} needs the reference's log-probabilities")
    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
    logits = chosen_ratio - rejected_ratio
    if settings.loss_type == "ipo":
        losses = (logits - 1 / (2 * beta)) ** 2
    elif settings.loss_type == "sigmoid_norm":
        losses = -F.logsigmoid(beta * logits)
    elif settings.loss_type == "aot":
        # the policy's and the reference's margins, each sorted: the i-th smallest against the i-th smallest
        margins = torch.sort(chosen - rejected).values - torch.sort(ref_chosen - ref_rejected).values
        losses = smoothed_sigmoid(beta * margins, smoothing)
    else:
        # sft's share (the chosen answer's NLL) is added by the objective, at nll_weight
        parts = [(name, weight) for name, weight in settings.mix if name != "sft"] or [
            (settings.loss_type, 1.0)
        ]
        # the margin losses read the f-divergence's scores of the log-ratios (reverse_kl: the log-ratios)
        scores = f_divergence_score(chosen_ratio, settings) - f_divergence_score(rejected_ratio, settings)
        losses = sum(
            weight
            * reward_loss(name, chosen_ratio, rejected_ratio, beta, smoothing, settings.discopop_tau, scores)
            for name, weight in parts
        )
    return losses, (beta * chosen_ratio).detach(), (beta * rejected_ratio).detach()


def f_divergence_score(ratio: torch.Tensor, settings: PreferenceSettings) -> torch.Tensor:
    """Returns f'(t) at t = exp(ratio), the score of an answer's log-ratio under the f-divergence
    preference.f_divergence_type regularises with (f-DPO; TRL's): reverse_kl log t (DPO), forward_kl 1 - 1/t,
    js_divergence log(2t / (t + 1)), alpha_divergence (t^(a - 1) - 1) / (a - 1) (log t at a = 1)."""
    kind, alpha = settings.f_divergence, settings.f_alpha
    if kind == "forward_kl":
        return 1 - torch.exp(-ratio)
    if kind == "js_divergence":
        return math.log(2) + F.logsigmoid(ratio)
    if kind == "alpha_divergence" and abs(alpha - 1) > 1e-6:
        exponent = ((alpha - 1) * ratio).float().clamp(max=80.0)  # exp stays finite
        return (torch.expm1(exponent) / (alpha - 1)).to(ratio.dtype)
    return ratio


def reward_loss(
    loss_type: str,
    chosen_ratio: torch.Tensor,
    rejected_ratio: torch.Tensor,
    beta: float,
    smoothing: float,
    tau: float = 0.05,
    scores: torch.Tensor | None = None,
) -> torch.Tensor:
    """Returns each pair's loss from its answers' log-ratios to the reference, for the losses that read only
    those and their implicit rewards, beta x the log-ratios (module docstring; `tau`: discopop's; `scores`: the
    margin of the f-divergence's scores, which sigmoid, hinge, robust, exo_pair and discopop read in place of
    the log-ratios' margin)."""
    if loss_type == "sppo_hard":
        return (chosen_ratio - 0.5 / beta) ** 2 + (rejected_ratio + 0.5 / beta) ** 2
    chosen, rejected = beta * chosen_ratio, beta * rejected_ratio
    margin = beta * scores if scores is not None else chosen - rejected
    if loss_type == "hinge":
        return torch.relu(1 - margin)
    if loss_type == "robust":
        return (-(1 - smoothing) * F.logsigmoid(margin) + smoothing * F.logsigmoid(-margin)) / (
            1 - 2 * smoothing
        )
    if loss_type == "exo_pair":
        kept, flipped = F.logsigmoid(margin), F.logsigmoid(-margin)
        return kept.exp() * (kept - math.log1p(-smoothing)) + flipped.exp() * (flipped - math.log(smoothing))
    if loss_type == "nca_pair":
        return -F.logsigmoid(chosen) - 0.5 * (F.logsigmoid(-chosen) + F.logsigmoid(-rejected))
    if loss_type == "bco_pair":
        return -F.logsigmoid(chosen) - F.logsigmoid(-rejected)
    if loss_type == "apo_zero":
        return 1 - torch.sigmoid(chosen) + torch.sigmoid(rejected)
    if loss_type == "apo_down":
        return torch.sigmoid(chosen) + 1 - torch.sigmoid(chosen - rejected)
    if loss_type == "aot_unpaired":
        return smoothed_sigmoid(torch.sort(chosen).values - torch.sort(rejected).values, smoothing)
    if loss_type == "discopop":  # the logistic loss blended into the exponential one as the margin grows
        blend = torch.sigmoid(margin / tau)
        # where the margin is far below 0 the blend is 0: exp(-margin) is kept finite so that 0 x it stays 0
        return -F.logsigmoid(margin) * (1 - blend) + torch.exp(-margin.clamp(min=-80.0)) * blend
    if loss_type != "sigmoid":
        raise ValueError(f"preference.loss_type={loss_type} is not a loss of the implicit rewards")
    return smoothed_sigmoid(margin, smoothing)


def smoothed_sigmoid(margin: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Returns DPO's loss of each margin, label-smoothed: the pair taken as mislabelled at rate `smoothing`."""
    return -F.logsigmoid(margin) * (1 - smoothing) - F.logsigmoid(-margin) * smoothing


# ----- the reference
class Reference:
    """Where the reference log-probabilities of a pair batch come from: `logps(model, batch, policy)` returns
    each sample's summed log-probability [2n] (no gradient); `policy`: the policy's SequenceLogps of the same
    batch."""

    def logps(self, model: nn.Module, batch: dict, policy: SequenceLogps | None = None) -> torch.Tensor:
        raise NotImplementedError


class NoAdapterReference(Reference):
    """The policy's own weights with its LoRA adapter disabled (PEFT's `disable_adapter`): the model the
    adapter started from, with no second copy in memory. `reuse_images` (the adapter leaves the vision tower
    and projector untouched: Family.images_outside_adapter, e.g. lora=qkv): the reference scores the batch on
    the policy's image features instead of running the vision tower again."""

    def __init__(
        self, logps_fn: LogpsFn, unwrap: Callable[[nn.Module], nn.Module], reuse_images: bool = False
    ) -> None:
        self.logps_fn = logps_fn
        self.unwrap = unwrap  # the PeftModel under DDP / FSDP / DeepSpeed's wrapper
        self.reuse_images = reuse_images

    @torch.no_grad()
    def logps(self, model: nn.Module, batch: dict, policy: SequenceLogps | None = None) -> torch.Tensor:
        peft_model = self.unwrap(model)
        features = policy.image_features if self.reuse_images and policy is not None else None
        with peft_model.disable_adapter():
            return self.logps_fn(peft_model, batch, image_features=features).logps.detach()


class CachedReference(Reference):
    """Log-probabilities computed once before training (`reference_table`), looked up by pair index."""

    def __init__(self, table: torch.Tensor) -> None:
        self.table = table  # [pairs, 2]: chosen, rejected

    def logps(self, model: nn.Module, batch: dict, policy: SequenceLogps | None = None) -> torch.Tensor:
        index = batch[PAIR_INDEX].to(self.table.device)
        rows = self.table[index]
        device = batch["input_ids"].device
        return torch.cat([rows[:, 0], rows[:, 1]]).to(device)


class PreferenceLoss:
    """dpo's objective for the training loop (pipeline.training.loop.Objective): the preference loss summed
    over the micro-batch's pairs, with the rewards, their margin, the accuracy (the share of pairs whose chosen
    answer gets the larger reward) and the policy's log-probabilities logged beside it."""

    name = "dpo"

    def __init__(self, logps_fn: LogpsFn, settings: PreferenceSettings, reference: Reference | None) -> None:
        if settings.needs_reference and reference is None:
            raise ValueError(f"preference.loss_type={settings.loss_type} needs a reference")
        self.logps_fn = logps_fn
        self.settings = settings
        self.reference = reference if settings.needs_reference else None
        if settings.loss_type == "kto":
            self.stat_names, self.stat_counts = KTO_STATS, KTO_STAT_COUNTS
        else:
            self.stat_names = STATS + (("nll",) if settings.nll_weight else ())
            self.stat_counts = {}

    def units(self, batch: dict) -> int:
        return int(batch[PAIRS])

    def sums(self, model: nn.Module, batch: dict) -> ObjectiveSums:
        n = int(batch[PAIRS])
        policy = self.logps_fn(model, batch)
        tokens = policy.tokens.clamp(min=1)
        mean = self.settings.loss_type in MEAN_LOGPS
        scores = policy.logps / tokens if mean else policy.logps
        ref_chosen = ref_rejected = None
        if self.reference is not None:
            ref = self.reference.logps(model, batch, policy).to(scores.dtype)
            ref = ref / tokens if mean else ref
            ref_chosen, ref_rejected = ref[:n], ref[n:]
        if self.settings.loss_type == "kto":
            return self._kto_sums(batch, scores, scores - ref, n)
        losses, chosen_rewards, rejected_rewards = preference_losses(
            scores[:n], scores[n:], ref_chosen, ref_rejected, self.settings
        )
        loss_sum = losses.sum()
        logps = policy.logps.detach()
        stats = {
            "rewards/chosen": chosen_rewards.sum(),
            "rewards/rejected": rejected_rewards.sum(),
            "rewards/margins": (chosen_rewards - rejected_rewards).sum(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().sum(),
            "logps/chosen": logps[:n].sum(),
            "logps/rejected": logps[n:].sum(),
        }
        if self.settings.nll_weight:
            nll = -(policy.logps[:n] / tokens[:n]).sum()  # each chosen answer's mean token NLL
            loss_sum = loss_sum + self.settings.nll_weight * nll
            stats["nll"] = nll.detach()
        return ObjectiveSums(loss_sum, stats)

    def _kto_sums(self, batch: dict, logps: torch.Tensor, logratios: torch.Tensor, n: int) -> ObjectiveSums:
        """The kto loss of the micro-batch's n rows (samples :n; their KL samples n:), summed, with its
        statistics: the desirable and the undesirable rows' rewards and log-probabilities summed apart,
        with their counts (Objective.stat_counts), and the KL estimate once per row."""
        desirable = batch[DESIRABLE].to(logps.device)
        losses, rewards, kl = kto_losses(logratios[:n], logratios[n:], desirable, self.settings)
        own = logps[:n].detach()
        wanted = desirable.to(own.dtype)
        stats = {
            "rewards/chosen": (rewards * wanted).sum(),
            "rewards/rejected": (rewards * (1 - wanted)).sum(),
            "logps/chosen": (own * wanted).sum(),
            "logps/rejected": (own * (1 - wanted)).sum(),
            "kl": kl * n,
            "desirable": wanted.sum(),
            "undesirable": (1 - wanted).sum(),
        }
        return ObjectiveSums(losses.sum(), stats)


# ----- pair batches
@dataclass
class PairSample:
    """One encoded pair: its number in the dataset, and its chosen and rejected answers encoded by the family
    (each the whole conversation, prompt and images included). Under kto: a labelled row's sample and its KL
    sample, with the row's `label` (desirable or not)."""

    index: int
    chosen: Any
    rejected: Any
    label: bool | None = None


class PairDataset(Dataset):
    """Pairs encoded on access from two of the family's datasets over the same rows (one answering with the
    chosen answer, one with the rejected); `offset` numbers the pairs after another split's (the reference
    table holds the training pairs, then the validation pairs); `rows`: the pairs' rows, as read; `labels`:
    under kto, each row's label (`chosen` then holds the rows' samples, `rejected` their KL samples)."""

    def __init__(
        self,
        chosen: Dataset,
        rejected: Dataset,
        sizes: Sequence[int],
        offset: int = 0,
        rows: Sequence[Any] = (),
        labels: Sequence[bool] | None = None,
    ) -> None:
        if len(chosen) != len(rejected) or len(chosen) != len(sizes):
            raise ValueError(f"{len(chosen)} chosen, {len(rejected)} rejected answers and {len(sizes)} sizes")
        if labels is not None and len(labels) != len(chosen):
            raise ValueError(f"{len(labels)} labels for {len(chosen)} rows")
        self.rows = list(rows)
        self.chosen = chosen
        self.rejected = rejected
        self.sizes = list(sizes)
        self.offset = offset
        self.labels = None if labels is None else list(labels)

    def __len__(self) -> int:
        return len(self.chosen)

    def __getitem__(self, index: int) -> PairSample:
        label = None if self.labels is None else self.labels[index]
        return PairSample(self.offset + index, self.chosen[index], self.rejected[index], label)

    def token_counts(self) -> list[int]:
        """Returns every pair's size in the token budget: both answers' tokens."""
        return list(self.sizes)


class PairCollate:
    """Collates pairs with the family's collate: the chosen answers of the n pairs, then their rejected answers
    (samples i and n + i are pair i), plus PAIRS = n, PAIR_INDEX (each pair's number) and, for kto's rows,
    DESIRABLE (each row's label)."""

    def __init__(self, collate: Callable[[list], dict]) -> None:
        self.collate = collate

    def __call__(self, pairs: list[PairSample]) -> dict:
        batch = self.collate([p.chosen for p in pairs] + [p.rejected for p in pairs])
        batch[PAIRS] = len(pairs)
        batch[PAIR_INDEX] = torch.tensor([p.index for p in pairs], dtype=torch.long)
        if pairs and pairs[0].label is not None:
            batch[DESIRABLE] = torch.tensor([bool(p.label) for p in pairs], dtype=torch.bool)
        return batch


# ----- the cached reference
def cache_key(identity: dict) -> str:
    """Returns the sha256 of what a reference table depends on (the pairs, the model, the encoding)."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()


def read_cached_table(path: Path, key: str, pairs: int) -> torch.Tensor | None:
    """Returns the reference table cached at `path` when it was computed for `key`, else None."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("key") != key:
                log.info(
                    "reference log-probabilities in %s are for other pairs or weights: recomputing", path
                )
                return None
            table = handle.get_tensor("logps")
    except (OSError, ValueError, RuntimeError) as err:  # a damaged file is computed again
        log.warning("reference log-probabilities in %s cannot be read (%s): recomputing", path, err)
        return None
    return table if table.shape == (pairs, 2) else None


def write_cached_table(path: Path, table: torch.Tensor, key: str) -> None:
    """Writes the reference table with its key, atomically (safetensors)."""
    from safetensors.torch import save

    atomic_write_bytes(path, save({"logps": table.contiguous()}, metadata={"key": key}))


@torch.no_grad()
def compute_reference_table(
    model: nn.Module,
    logps_fn: LogpsFn,
    datasets: Sequence[PairDataset],
    collate: Callable[[list], dict],
    accelerator: Accelerator,
    budget: tuple[int, int, int],
    num_workers: int = 0,
) -> torch.Tensor:
    """Returns [pairs, 2]: every pair's reference log-probabilities (chosen, rejected) under `model` as it is,
    in eval mode: one pass over the pairs of every dataset (numbered by their offsets), each process scoring
    every world-th pair (and as many micro-batches as the process with the most, for engines that gather
    weights: the extra ones count for nothing), summed across processes. `budget` is (batch_size, micro_batch_tokens, pad_to_multiple) of the training plan."""
    batch_size, tokens, multiple = budget
    world, rank = accelerator.num_processes, accelerator.process_index
    total = sum(len(d) for d in datasets)
    table = torch.zeros(total, 2, device=accelerator.device)
    was_training = model.training
    model.eval()
    bar = tqdm(total=total, desc="reference log-probs", unit="pair", disable=not accelerator.is_main_process)
    for dataset in datasets:
        if len(dataset) == 0:
            continue
        rows = list(range(len(dataset)))
        plans = plan_window(
            [rows[r::world] for r in range(world)], dataset.token_counts(), batch_size, tokens, multiple
        )
        counted = len(plans[rank])
        batches = plans[rank] + [[0]] * (max(len(p) for p in plans) - counted)
        loader = DataLoader(
            dataset,
            batch_sampler=batches,
            collate_fn=collate,
            **loader_options(num_workers, accelerator.device.type == "cuda"),
        )
        for i, batch in enumerate(loader):
            batch = {
                k: v.to(accelerator.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()
            }
            with accelerator.autocast():
                logps = logps_fn(model, batch).logps.float()
            if i >= counted:
                continue
            n = int(batch[PAIRS])
            index = batch[PAIR_INDEX]
            table[index, 0] = logps[:n]
            table[index, 1] = logps[n:]
            bar.update(n * world)
    bar.close()
    model.train(was_training)
    if world > 1:
        table = accelerator.reduce(table, reduction="sum")  # every pair was scored by one process
    return table.cpu()


def reference_table(
    path: Path,
    key: str,
    compute: Callable[[], torch.Tensor],
    pairs: int,
    accelerator: Accelerator,
) -> torch.Tensor:
    """Returns the reference table cached at `path` for `key`, else computes it and writes it there (rank 0,
    atomically), so a resumed run reuses it."""
    table = read_cached_table(path, key, pairs)
    found = torch.tensor([0.0 if table is None else 1.0], device=accelerator.device)
    if accelerator.num_processes > 1:  # every process computes its share, or none does
        found = accelerator.reduce(found, reduction="min")
    if table is not None and float(found) == 1.0:
        log.info("reference log-probabilities of %d pairs read from %s", pairs, path)
        return table
    table = compute()
    if accelerator.is_main_process:
        write_cached_table(path, table, key)
        log.info("reference log-probabilities of %d pairs cached in %s", pairs, path)
    accelerator.wait_for_everyone()
    return table
