"""model.gradient_checkpointing=vision and a share of the layers on the tiny twins (CPU, fp32): the vision
tower's blocks are recomputed in the backward and the language model's layers are not (vision), or only its
first ones are (a share), and the loss and every gradient under lora=all equal those of the run without
checkpointing and of the run that checkpoints every block."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from pipeline.data.demo import ensure_demo
from pipeline.data.images import ImageFiles
from pipeline.data.sources import read_custom_file
from pipeline.families import get_family
from tests.helpers import LORA_ALL

# (the first norm of the first language-model decoder layer, the first norm of the first vision block) under
# each family's unwrapped model: a norm inside the block, because transformers checkpoints a layer's forward
# (its own hooks run once) and a recompute stops once it has what the backward needs
WATCHED = {
    "minicpm_v2": ("llm.model.layers.0.input_layernorm", "vpm.blocks.0.norm1"),
    "qwen2_5_vl": ("model.language_model.layers.0.input_layernorm", "model.visual.blocks.0.norm1"),
    "minicpm_v4_6": (
        "model.language_model.layers.0.input_layernorm",
        "model.vision_tower.encoder.layers.0.layer_norm1",
    ),
}


# the language model's decoder layers under each family's unwrapped model
LAYERS = {
    "minicpm_v2": "llm.model.layers",
    "qwen2_5_vl": "model.language_model.layers",
    "minicpm_v4_6": "model.language_model.layers",
}


@pytest.fixture(scope="module")
def demo_rows(tmp_path_factory) -> list:
    folder = ensure_demo(tmp_path_factory.mktemp("demo") / "demo", n=8)
    rows, problems = read_custom_file(folder / "train.jsonl")
    assert not problems
    return [row for row in rows if row.images][:3]


def run_step(family, folder, rows, checkpointing, watch=None) -> tuple[torch.Tensor, dict, Counter]:
    """One lora=all training step's summed loss, its gradients and how often the watched norms ran (`watch`:
    part -> module path; the family's WATCHED as llm and vision by default)."""
    bundle = family.load_bundle(folder)
    torch.manual_seed(0)
    model = family.prepare_training(bundle, LORA_ALL, checkpointing, str(bundle.base_path)).train()
    with torch.no_grad():  # LoRA's B starts at zero: move it, so that every adapter matrix gets a gradient
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05)
    calls: Counter = Counter()
    core = bundle.model
    watch = watch or dict(zip(("llm", "vision"), WATCHED[family.name], strict=True))
    for part, path in watch.items():
        core.get_submodule(path).register_forward_pre_hook(lambda *_, part=part: calls.update([part]))
    samples = family.dataset(bundle, rows, 4096, "delete", ImageFiles())
    batch = family.training_collate(bundle)([samples[i] for i in range(len(rows))])
    out = family.loss_outputs(model, batch)
    out.loss_sum.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return out.loss_sum.detach(), grads, calls


@pytest.mark.parametrize("name", sorted(WATCHED))
def test_vision_checkpointing_recomputes_the_tower_only_and_keeps_loss_and_gradients(
    family_twin, demo_rows, name
):
    family = get_family(name)
    folder = family_twin(name)
    plain_loss, plain, plain_calls = run_step(family, folder, demo_rows, False)
    every_loss, every, every_calls = run_step(family, folder, demo_rows, True)
    vision_loss, vision, vision_calls = run_step(family, folder, demo_rows, "vision")

    # a checkpointed block runs again in the backward: the tower's twice, the language model's once
    assert plain_calls["llm"] == plain_calls["vision"] == 1
    assert every_calls == Counter(llm=2, vision=2)
    assert vision_calls == Counter(llm=1, vision=2)

    vision_grads = [
        n for n in plain if "lora_" in n and any(k in n for k in ("vpm.", "visual.", "vision_tower."))
    ]
    assert vision_grads and len(plain) > len(vision_grads)
    for loss, grads in ((every_loss, every), (vision_loss, vision)):
        assert_same(loss, grads, plain_loss, plain)


def assert_same(loss, grads, plain_loss, plain) -> None:
    torch.testing.assert_close(loss, plain_loss, rtol=1e-5, atol=1e-5)
    assert grads.keys() == plain.keys()
    for n in plain:
        scale = float(plain[n].abs().max()) + 1e-8
        torch.testing.assert_close(
            grads[n], plain[n], rtol=1e-4, atol=1e-4 * scale, msg=lambda m, n=n: f"{n}: {m}"
        )


@pytest.mark.parametrize("name", sorted(WATCHED))
def test_a_share_recomputes_the_tower_and_the_first_layers_only_and_keeps_loss_and_gradients(
    family_twin, demo_rows, name
):
    family = get_family(name)
    folder = family_twin(name)
    count = len(family.load_bundle(folder).model.get_submodule(LAYERS[name]))
    assert count >= 2
    first, last = (f"{LAYERS[name]}.{i}.input_layernorm" for i in (0, count - 1))
    watch = {"first": first, "last": last, "vision": WATCHED[name][1]}
    plain_loss, plain, plain_calls = run_step(family, folder, demo_rows, False, watch)
    share_loss, share, share_calls = run_step(family, folder, demo_rows, 0.5, watch)

    assert plain_calls == Counter(first=1, last=1, vision=1)
    # the first layer is checkpointed (its forward runs again in the backward), the last keeps its activations
    assert share_calls == Counter(first=2, last=1, vision=2)
    assert any("lora_" in n and any(k in n for k in ("vpm.", "visual.", "vision_tower.")) for n in plain)
    assert_same(share_loss, share, plain_loss, plain)
