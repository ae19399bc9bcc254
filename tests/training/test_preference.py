"""The preference objective on the tiny twins (CPU, fp32): each answer's log-probability, the losses and their
gradients against a direct computation, the same sums however the pairs are batched, and the vision tower
run once per pair."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from omegaconf import OmegaConf

from pipeline.config import REWARD_LOSSES
from pipeline.data.demo import ensure_demo_pairs
from pipeline.data.images import ImageFiles
from pipeline.data.sources import read_custom_file
from pipeline.families import get_family
from pipeline.families.base import PAIRS
from pipeline.training.preference import (
    CachedReference,
    NoAdapterReference,
    PairCollate,
    PairSample,
    PreferenceLoss,
    PreferenceSettings,
)
from tests.helpers import LORA_ALL

FAMILIES = ("minicpm_v2", "qwen2_5_vl", "qwen3_vl", "minicpm_v4_6")


@pytest.fixture(scope="module")
def pair_rows(tmp_path_factory) -> list:
    """Eight of the bundled demo's preference pairs (an image each, one of them larger and sliced)."""
    folder = ensure_demo_pairs(tmp_path_factory.mktemp("pairs") / "demo_pairs", n=8)
    rows, problems = read_custom_file(folder / "train.jsonl")
    assert not problems and all(row.rejected for row in rows)
    return rows


def encoded_pairs(family, bundle, rows) -> list[PairSample]:
    images = ImageFiles()
    chosen = family.dataset(bundle, rows, 4096, "delete", images)
    rejected = family.dataset(
        bundle, [dataclasses.replace(r, response=r.rejected) for r in rows], 4096, "delete", images
    )
    return [PairSample(i, chosen[i], rejected[i]) for i in range(len(rows))]


def loaded(family_twin, name: str, lora: bool = True, preset: str = "all"):
    family = get_family(name)
    bundle = family.load_bundle(family_twin(name))
    torch.manual_seed(0)
    settings = OmegaConf.merge(LORA_ALL, {"name": preset})
    model = family.prepare_training(bundle, settings, False, str(bundle.base_path)) if lora else bundle.model
    if lora:  # LoRA's B starts at zero: move it, so that the policy differs from the reference
        with torch.no_grad():
            for param_name, param in model.named_parameters():
                if "lora_B" in param_name:
                    param.normal_(std=0.02)
    return family, bundle, model.train()


def alone(family, bundle, model, sample) -> torch.Tensor:
    """One encoded answer's summed log-probability over its supervised tokens, from its full logits."""
    logits = family.logits_fn(bundle, torch.device("cpu"))(model, sample)
    labels = torch.tensor(sample.labels[1:])
    mask = labels != -100
    return logits[:-1].log_softmax(-1)[mask].gather(-1, labels[mask][:, None]).sum()


@pytest.mark.parametrize("name", FAMILIES)
def test_a_pair_batch_scores_each_answer_as_alone_with_the_vision_tower_run_once(
    name, family_twin, pair_rows
):
    family, bundle, model = loaded(family_twin, name)
    model.eval()
    pairs = encoded_pairs(family, bundle, pair_rows[:3])
    calls = []
    vision = bundle.core.get_submodule(family.freeze_groups().vision[0])
    hook = vision.register_forward_hook(lambda module, args, out: calls.append(args[0]))
    with torch.no_grad():
        batch = PairCollate(family.eval_collate(bundle))(pairs)
        scored = family.sequence_logps(model, batch)
    hook.remove()
    with torch.no_grad():
        direct = [alone(family, bundle, model, p.chosen) for p in pairs]
        direct += [alone(family, bundle, model, p.rejected) for p in pairs]
    torch.testing.assert_close(scored.logps, torch.stack(direct), rtol=1e-4, atol=1e-4)
    # what the tower takes: images (MiniCPM-V-2), patch rows (the Qwen VLs), patches along the last axis (4.6)
    size = (lambda x: int(x.shape[-1])) if name == "minicpm_v4_6" else (lambda x: int(x.shape[0]))
    chosen = family.eval_collate(bundle)([p.chosen for p in pairs])["pixel_values"]
    once = sum(len(images) for images in chosen) if isinstance(chosen, list) else size(chosen)
    assert sum(size(x) for x in calls) == once  # the chosen answers' images only: once per pair


def tower_calls(family, bundle) -> tuple[list, torch.utils.hooks.RemovableHandle]:
    calls: list = []
    vision = bundle.core.get_submodule(family.freeze_groups().vision[0])
    return calls, vision.register_forward_hook(lambda module, args, out: calls.append(1))


@pytest.mark.parametrize("name", FAMILIES)
def test_the_reference_scores_on_the_policy_s_image_features_when_the_adapter_leaves_the_tower_alone(
    name, family_twin, pair_rows
):
    family, bundle, model = loaded(family_twin, name, preset="qkv")
    assert family.images_outside_adapter(model)
    assert not family.images_outside_adapter(loaded(family_twin, name)[2])  # lora=all wraps the tower
    model.eval()
    batch = PairCollate(family.eval_collate(bundle))(encoded_pairs(family, bundle, pair_rows[:3]))
    calls, hook = tower_calls(family, bundle)
    policy = family.sequence_logps(model, batch)
    assert calls == [1] and policy.image_features is not None
    reused = NoAdapterReference(family.sequence_logps, lambda m: m, reuse_images=True).logps(
        model, batch, policy
    )
    assert calls == [1]  # the reference ran no vision tower
    again = NoAdapterReference(family.sequence_logps, lambda m: m).logps(model, batch, policy)
    hook.remove()
    assert calls == [1, 1]
    torch.testing.assert_close(reused, again, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(reused, policy.logps.detach(), atol=1e-3)  # the adapter was disabled


def policy_and_reference(family, bundle, model, pairs) -> tuple[torch.Tensor, torch.Tensor]:
    """Every answer's summed log-probability (the chosen ones, then the rejected) under the policy and, its
    adapter disabled, under the reference, each from the answer's own full logits."""
    answers = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    policy = torch.stack([alone(family, bundle, model, a) for a in answers])
    with torch.no_grad(), model.disable_adapter():
        reference = torch.stack([alone(family, bundle, model, a) for a in answers])
    return policy, reference


OTHER_PAIR_LOSSES = REWARD_LOSSES[1:]  # every reward loss but sigmoid, each written out in direct_loss


def f_score(ratio: torch.Tensor, settings: PreferenceSettings) -> torch.Tensor:
    """f'(t) of the f-divergence at t = exp(ratio), written out (f-DPO's table)."""
    t, a = torch.exp(ratio), settings.f_alpha
    return {
        "reverse_kl": lambda: torch.log(t),
        "forward_kl": lambda: 1 - 1 / t,
        "js_divergence": lambda: torch.log(2 * t / (t + 1)),
        "alpha_divergence": lambda: (t ** (a - 1) - 1) / (a - 1),
    }[settings.f_divergence]()


def direct_loss(settings: PreferenceSettings, policy, reference, tokens) -> torch.Tensor:
    """The loss of the pairs written out from the answers' summed log-probabilities [2n]."""
    n = len(policy) // 2
    mean = settings.loss_type in ("ipo", "sigmoid_norm", "simpo", "orpo")
    pol = policy / tokens if mean else policy
    beta, ls, tau = settings.beta, settings.label_smoothing, settings.discopop_tau
    if settings.loss_type in ("simpo", "cpo"):
        h = beta * (pol[:n] - pol[n:]) - (settings.simpo_gamma if settings.loss_type == "simpo" else 0.0)
        loss = (-(1 - ls) * torch.log(torch.sigmoid(h)) - ls * torch.log(torch.sigmoid(-h))).sum()
    elif settings.loss_type == "orpo":
        p = torch.exp(pol)  # the mean token probability of each answer
        odds = torch.log(p[:n] / (1 - p[:n])) - torch.log(p[n:] / (1 - p[n:]))
        loss = -beta * torch.log(torch.sigmoid(odds)).sum()
    else:
        ref = reference / tokens if mean else reference
        h = (pol[:n] - ref[:n]) - (pol[n:] - ref[n:])
        hf = f_score(pol[:n] - ref[:n], settings) - f_score(pol[n:] - ref[n:], settings)  # the margin losses'
        a, b = beta * (pol[:n] - ref[:n]), beta * (pol[n:] - ref[n:])  # the rewards
        sig = torch.sigmoid
        if settings.loss_type == "ipo":
            loss = ((h - 1 / (2 * beta)) ** 2).sum()
        elif settings.loss_type == "sigmoid_norm":
            loss = -torch.log(torch.sigmoid(beta * h)).sum()
        elif settings.loss_type == "aot":  # sorted margins, the policy's against the reference's
            d = beta * (torch.sort(pol[:n] - pol[n:]).values - torch.sort(ref[:n] - ref[n:]).values)
            loss = (-(1 - ls) * torch.log(torch.sigmoid(d)) - ls * torch.log(torch.sigmoid(-d))).sum()
        elif settings.loss_type in OTHER_PAIR_LOSSES or settings.mix:
            d = beta * hf
            per_pair = {
                "sigmoid": lambda: -(1 - ls) * torch.log(sig(d)) - ls * torch.log(sig(-d)),
                "hinge": lambda: torch.clamp(1 - d, min=0),
                "robust": lambda: ((1 - ls) * -torch.log(sig(d)) - ls * -torch.log(sig(-d))) / (1 - 2 * ls),
                "exo_pair": lambda: sig(d) * torch.log(sig(d) / (1 - ls)) + sig(-d) * torch.log(sig(-d) / ls),
                "nca_pair": lambda: -torch.log(sig(a)) - torch.log(sig(-a)) / 2 - torch.log(sig(-b)) / 2,
                "bco_pair": lambda: -torch.log(sig(a)) - torch.log(sig(-b)),
                "sppo_hard": lambda: (a / beta - 1 / (2 * beta)) ** 2 + (b / beta + 1 / (2 * beta)) ** 2,
                "apo_zero": lambda: (1 - sig(a)) + sig(b),
                "apo_down": lambda: sig(a) + (1 - sig(a - b)),
                "discopop": lambda: (1 - sig(d / tau)) * -torch.log(sig(d)) + sig(d / tau) * torch.exp(-d),
                "aot_unpaired": lambda: (
                    -(1 - ls) * torch.log(sig(torch.sort(a).values - torch.sort(b).values))
                    - ls * torch.log(sig(torch.sort(b).values - torch.sort(a).values))
                ),
            }
            mix = [(k, w) for k, w in settings.mix if k != "sft"] or [(settings.loss_type, 1.0)]
            loss = sum(w * per_pair[k]().sum() for k, w in mix)
        else:
            loss = (
                -(1 - ls) * torch.log(torch.sigmoid(beta * hf)) - ls * torch.log(torch.sigmoid(-beta * hf))
            ).sum()
    weight = {"orpo": 1.0, "cpo": settings.cpo_alpha, "simpo": settings.cpo_alpha}.get(
        settings.loss_type, settings.rpo_alpha or 0.0
    )
    if settings.mix:
        weight = dict(settings.mix).get("sft", 0.0)
    return loss + weight * (-(policy[:n] / tokens[:n])).sum()


SETTINGS = {
    "sigmoid": PreferenceSettings("sigmoid", beta=0.1, label_smoothing=0.1),
    "ipo": PreferenceSettings("ipo", beta=0.5),
    "simpo": PreferenceSettings("simpo", beta=2.0, simpo_gamma=0.5, cpo_alpha=0.0),
    "simpo+nll": PreferenceSettings("simpo", beta=2.0, simpo_gamma=0.5),  # ms-swift's: cpo_alpha 1
    "cpo": PreferenceSettings("cpo", beta=0.1, label_smoothing=0.1, cpo_alpha=0.5),
    "orpo": PreferenceSettings("orpo", beta=0.1),
    "sigmoid+rpo": PreferenceSettings("sigmoid", beta=0.1, rpo_alpha=0.5),
    "hinge": PreferenceSettings("hinge", beta=2.0),
    "robust": PreferenceSettings("robust", beta=0.5, label_smoothing=0.2),
    "exo_pair": PreferenceSettings("exo_pair", beta=0.5, label_smoothing=1e-3),
    "nca_pair": PreferenceSettings("nca_pair", beta=0.5),
    "bco_pair": PreferenceSettings("bco_pair", beta=0.5),
    "sppo_hard": PreferenceSettings("sppo_hard", beta=0.5),
    "apo_zero": PreferenceSettings("apo_zero", beta=0.5),
    "apo_down": PreferenceSettings("apo_down", beta=0.5),
    "sigmoid_norm": PreferenceSettings("sigmoid_norm", beta=2.0),
    # tau at its default and larger: the blend's two ends
    "discopop": PreferenceSettings("discopop", beta=0.5),
    "discopop_tau": PreferenceSettings("discopop", beta=0.5, discopop_tau=2.0),
    "aot": PreferenceSettings("aot", beta=0.5, label_smoothing=0.1),
    # f-DPO: the margin losses on the f-divergence's scores of the log-ratios
    "sigmoid+forward_kl": PreferenceSettings("sigmoid", beta=0.5, f_divergence="forward_kl"),
    "hinge+js_divergence": PreferenceSettings("hinge", beta=2.0, f_divergence="js_divergence"),
    "robust+alpha_divergence": PreferenceSettings(
        "robust", beta=0.5, label_smoothing=0.2, f_divergence="alpha_divergence", f_alpha=0.3
    ),
    "mpo+js_divergence": PreferenceSettings(
        "sigmoid",
        beta=0.5,
        mix=(("sigmoid", 0.8), ("bco_pair", 0.2), ("sft", 1.0)),
        f_divergence="js_divergence",
    ),
    "aot_unpaired": PreferenceSettings("aot_unpaired", beta=0.5, label_smoothing=0.1),
    # MPO (ms-swift's --loss_type sigmoid bco_pair sft --loss_weights 0.8 0.2 1.0)
    "mpo": PreferenceSettings("sigmoid", beta=0.5, mix=(("sigmoid", 0.8), ("bco_pair", 0.2), ("sft", 1.0))),
}


@pytest.mark.parametrize("case", list(SETTINGS))
def test_loss_and_gradient_equal_a_direct_computation(case, family_twin, pair_rows):
    settings = SETTINGS[case]
    family, bundle, model = loaded(family_twin, "qwen2_5_vl")
    pairs = encoded_pairs(family, bundle, pair_rows[:3])
    trainable = [p for p in model.parameters() if p.requires_grad]

    objective = PreferenceLoss(
        family.sequence_logps, settings, NoAdapterReference(family.sequence_logps, lambda m: m)
    )
    out = objective.sums(model, PairCollate(family.eval_collate(bundle))(pairs))
    grads = torch.autograd.grad(out.loss_sum, trainable)

    policy, reference = policy_and_reference(family, bundle, model, pairs)
    answers = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    tokens = torch.tensor([float(sum(label != -100 for label in a.labels[1:])) for a in answers])
    expected = direct_loss(settings, policy, reference, tokens)
    expected_grads = torch.autograd.grad(expected, trainable)

    torch.testing.assert_close(out.loss_sum, expected, rtol=1e-4, atol=1e-5)
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-6)
    margins = out.stats["rewards/margins"] / len(pairs)
    assert torch.isfinite(margins) and 0 <= float(out.stats["rewards/accuracies"]) <= len(pairs)


@pytest.mark.parametrize("name", ["qwen2_5_vl", "minicpm_v2"])
def test_the_sums_are_the_same_in_one_batch_in_two_and_packed(name, family_twin, pair_rows):
    """The token budget cuts a step's pairs into micro-batches and packing lays each into one row: the loss
    summed over the step's pairs and its gradient are the same every way (the loop divides by the pairs)."""
    family, bundle, model = loaded(family_twin, name)
    pairs = encoded_pairs(family, bundle, pair_rows[:4])
    settings = PreferenceSettings("sigmoid", beta=0.1)
    # a cached reference: any fixed numbers serve to compare the ways of batching
    table = torch.linspace(-30.0, -5.0, 2 * len(pairs)).view(len(pairs), 2)
    objective = PreferenceLoss(family.sequence_logps, settings, CachedReference(table))
    trainable = [p for p in model.parameters() if p.requires_grad]

    def total(groups, collate) -> tuple[torch.Tensor, list[torch.Tensor]]:
        loss = sum(objective.sums(model, PairCollate(collate)(group)).loss_sum for group in groups)
        return loss, list(torch.autograd.grad(loss, trainable))

    padded = family.training_collate(bundle)
    whole, whole_grads = total([pairs], padded)
    halves, halves_grads = total([pairs[:2], pairs[2:]], padded)
    packed, packed_grads = total([pairs], family.training_collate(bundle, packed=True))
    for loss, grads in ((halves, halves_grads), (packed, packed_grads)):
        torch.testing.assert_close(loss, whole, rtol=1e-4, atol=1e-5)
        for got, want in zip(grads, whole_grads, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-6)
    assert PairCollate(padded)(pairs)[PAIRS] == len(pairs)


@pytest.mark.parametrize("name", ["qwen2_5_vl", "minicpm_v2"])
def test_kto_loss_and_gradient_equal_a_direct_computation(name, family_twin, pair_rows):
    """kto's rows: each row's sample (here a pair's chosen answer) then its KL sample (another answer to the
    same prompt), labelled desirable or not; the loss measured against the KL samples' mean log-ratio."""
    family, bundle, model = loaded(family_twin, name)
    settings = PreferenceSettings("kto", beta=0.5, desirable_weight=1.0, undesirable_weight=1.5)
    rows = [
        dataclasses.replace(p, label=k % 2 == 0)
        for k, p in enumerate(encoded_pairs(family, bundle, pair_rows[:4]))
    ]
    trainable = [p for p in model.parameters() if p.requires_grad]
    objective = PreferenceLoss(
        family.sequence_logps, settings, NoAdapterReference(family.sequence_logps, lambda m: m)
    )
    assert objective.stat_counts["rewards/chosen"] == "desirable"
    out = objective.sums(model, PairCollate(family.eval_collate(bundle))(rows))
    grads = torch.autograd.grad(out.loss_sum, trainable)

    policy, reference = policy_and_reference(family, bundle, model, rows)
    n = len(rows)
    ratio = policy - reference
    kl = ratio[n:].detach().mean().clamp(min=0)
    desirable = torch.tensor([r.label for r in rows])
    good = 1.0 * (1 - torch.sigmoid(0.5 * (ratio[:n] - kl)))
    bad = 1.5 * (1 - torch.sigmoid(0.5 * (kl - ratio[:n])))
    expected = torch.where(desirable, good, bad).sum()
    expected_grads = torch.autograd.grad(expected, trainable)

    torch.testing.assert_close(out.loss_sum, expected, rtol=1e-4, atol=1e-5)
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-6)
    rewards = 0.5 * ratio[:n].detach()
    torch.testing.assert_close(out.stats["rewards/chosen"], rewards[desirable].sum(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.stats["rewards/rejected"], rewards[~desirable].sum(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.stats["kl"], kl * n, rtol=1e-4, atol=1e-5)
    assert float(out.stats["desirable"]) == 2 and float(out.stats["undesirable"]) == 2
