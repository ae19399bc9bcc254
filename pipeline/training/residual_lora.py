"""LoRA initialised from the base weights (lora.init_weights=pissa | pissa_niter_N | olora): PEFT's PiSSA and
OLoRA put the r principal directions of each adapted weight W into the adapter (B0, A0) and train on the
residual W - s * B0 @ A0 (s: the adapter's scaling). Such an adapter only means something on that residual
base, so every checkpoint stores it converted to a plain LoRA of rank 2r on the original base:

    W_res + s * B @ A  =  W + s * [B, -B0] @ [A; A0]

with lora_alpha chosen so that the scaling stays s (2 * alpha; alpha * sqrt(2) with rank-stabilised scaling).
Eval, merge, infer, serve and other tools then read it as any LoRA checkpoint of the original model. The
checkpoint also records the rank it trains at (`residual_lora.json`), from which a resumed run takes the
trained half back and rebuilds the residual base from the initial half: exactly the weights it stopped with.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pipeline.families.checkpoints import ADAPTER_CONFIG, ADAPTER_WEIGHTS, CheckpointError, read_json_file
from pipeline.families.lora_init import normal_init

MARKER = "residual_lora.json"


def _is_lora_weight(key: str) -> bool:
    return key.endswith((".lora_A.weight", ".lora_B.weight"))


@dataclass
class ResidualAdapter:
    """The adapter's initial half (PEFT's saved names of the lora_A / lora_B weights -> their value at
    initialisation, on the CPU) and the settings it trains at."""

    init: str
    r: int
    alpha: float
    rslora: bool
    initial: dict[str, torch.Tensor] = field(repr=False)

    @classmethod
    def snapshot(cls, model, init: str) -> ResidualAdapter:
        """Records the initial adapter of a PEFT model that PEFT has just initialised from its base."""
        from peft import get_peft_model_state_dict

        config = model.peft_config["default"]
        saved = get_peft_model_state_dict(model, save_embedding_layers=False)
        initial = {k: v.detach().to("cpu", copy=True) for k, v in saved.items() if _is_lora_weight(k)}
        if not initial:
            raise ValueError("lora.init_weights: the model has no LoRA weights to record")
        return cls(
            normal_init(init), int(config.r), float(config.lora_alpha), bool(config.use_rslora), initial
        )

    @property
    def saved_alpha(self) -> float:
        """lora_alpha of the rank-2r checkpoint: the one whose scaling equals the training adapter's."""
        return self.alpha * (math.sqrt(2.0) if self.rslora else 2.0)

    def convert(self, folder: Path) -> None:
        """Rewrites the PEFT adapter in `folder` (as `save_pretrained` wrote it: rank r, for the residual base)
        as a plain LoRA of rank 2r on the original base, and records the training rank beside it."""
        weights_file, config_file = folder / ADAPTER_WEIGHTS, folder / ADAPTER_CONFIG
        trained = load_file(str(weights_file))
        missing = sorted(set(self.initial) - set(trained))
        if missing:
            raise CheckpointError(f"{weights_file}: the adapter lacks {missing[:3]} of its initial weights")
        for key, start in self.initial.items():
            now = trained[key]
            if key.endswith(".lora_A.weight"):  # [A; A0]
                trained[key] = torch.cat([now, start.to(now.dtype)], dim=0).contiguous()
            else:  # [B, -B0]
                trained[key] = torch.cat([now, -start.to(now.dtype)], dim=1).contiguous()
        save_file(trained, str(weights_file), metadata={"format": "pt"})
        config = json.loads(config_file.read_text())
        config.update(r=2 * self.r, lora_alpha=self.saved_alpha, init_lora_weights=True)
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        marker = {"init_weights": self.init, "r": self.r, "lora_alpha": self.alpha, "use_rslora": self.rslora}
        (folder / MARKER).write_text(json.dumps(marker, indent=2) + "\n")

    @classmethod
    def restore(cls, model, ckpt: Path) -> ResidualAdapter:
        """On a PEFT model wrapped with a fresh adapter of the checkpoint's training rank, over the original base:
        subtracts s * B0 @ A0 from every adapted base weight (the residual the run trained on, as PEFT computed
        it), puts the adapter back at its initial half, and returns that half for the run's next checkpoints.
        The trained half is loaded with the optimizer's state (`trained_half`)."""
        settings = residual_settings(ckpt)
        if settings is None:
            raise CheckpointError(
                f"{ckpt}: no {MARKER}, so its adapter was not initialised from the base weights, and the config "
                "asks lora.init_weights=pissa/olora; resume with the run's lora.init_weights, or start anew "
                "(trainer.resume=never or another run folder)"
            )
        r = int(settings["r"])
        saved = load_file(str(ckpt / ADAPTER_WEIGHTS))
        modules = dict(model.named_modules())
        initial: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for key_a in sorted(k for k in saved if k.endswith(".lora_A.weight")):
                key_b = key_a[: -len("lora_A.weight")] + "lora_B.weight"
                a0, b0 = saved[key_a][r:], -saved[key_b][:, r:]
                layer = _lora_layer(modules, key_a)
                base = layer.get_base_layer()
                weight = base.weight
                scale = layer.scaling["default"]
                a0_, b0_ = a0.to(weight.device, torch.float32), b0.to(weight.device, torch.float32)
                base.weight.data = (weight.data.to(torch.float32) - scale * b0_ @ a0_).to(weight.dtype)
                # the adapter as it started too, so that the model is the starting model until the trained half
                # loads (a reference computed from it before training is the original model's)
                for part, value in ((layer.lora_A["default"], a0), (layer.lora_B["default"], b0)):
                    part.weight.data = value.to(part.weight.device, part.weight.dtype).clone()
                initial[key_a], initial[key_b] = a0.clone(), b0.clone()
        return cls(
            normal_init(settings["init_weights"]),
            r,
            float(settings["lora_alpha"]),
            bool(settings.get("use_rslora", False)),
            initial,
        )


def _lora_layer(modules: dict, saved_key: str):
    """Returns the LoRA layer of a PEFT model that a saved key (adapter name left out) belongs to."""
    name = saved_key[: -len(".lora_A.weight")]
    layer = modules.get(name)
    if layer is None or not hasattr(layer, "get_base_layer"):
        raise CheckpointError(f"the checkpoint's adapter weight {saved_key} has no LoRA layer in this model")
    return layer


def residual_settings(ckpt: Path) -> dict | None:
    """Returns what a checkpoint of an adapter initialised from the base records (init_weights, r, lora_alpha,
    use_rslora: the settings it trains at), or None for a plain adapter."""
    marker = Path(ckpt) / MARKER
    if not marker.is_file():
        return None
    return read_json_file(marker, "the residual adapter's training settings")


def trained_half(ckpt: Path, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Returns a checkpoint's saved adapter tensors as the run trains them: for a residual adapter the first r
    rows of each lora_A and columns of each lora_B (the rest is the initial half), else as they are."""
    settings = residual_settings(ckpt)
    if settings is None:
        return weights
    r = int(settings["r"])
    out = {}
    for key, value in weights.items():
        if key.endswith(".lora_A.weight"):
            value = value[:r]
        elif key.endswith(".lora_B.weight"):
            value = value[:, :r]
        out[key] = value.contiguous()  # a slice of B has gaps: broadcast to other processes needs it whole
    return out
