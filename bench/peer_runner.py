"""One peer trainer's run, in its own process and on its own packages: TRL's `SFTTrainer` or ms-swift's
`swift sft` (bench/peers.py), or TRL's `DPOTrainer` (bench/dpo_bench.py), called in this process on a model folder and rows written by bench/entry_bench.py, so that this
process can time the optimizer steps and read the peak GPU memory.

    python -m bench.peer_runner SPEC.json      # SPEC written by bench/peers.py; the result goes to spec["out"]

bench/peers.py puts the peer's packages first on PYTHONPATH. Nothing here imports pipeline/: ms-swift pins
older transformers/peft/trl than the project's, and its run must see only its own.

What it records, the same way for both peers (a callback and a forward pre-hook added to every transformers
`Trainer` built in this process, which both peers' trainers are):
- the wall time of each optimizer step, from the end of the previous step (or the start of training) to the
  end of this one, CUDA synchronised at each end: data loading, forward, backward, optimizer and logging, as
  the project's own `samples_per_s` counts a step;
- the real and padded tokens the model was given during that step (attention_mask's sum and input_ids' size;
  without an attention mask, as in a padding-free batch, both are the packed length);
- the loss the trainer logs at each step (`logging_steps=1`);
- `torch.cuda.max_memory_allocated()` at the end (GiB, as the project's `peak_memory_gb`).
A failure is written as `error` with the exception's last line, so a row is never lost silently.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch


class StepRecorder:
    """Collects step times, tokens and losses from the trainer's callbacks and a forward pre-hook."""

    def __init__(self) -> None:
        self.step_seconds: list[float] = []
        self.step_tokens: list[int] = []
        self.step_padded: list[int] = []
        self.losses: list[float] = []
        self._last: float | None = None
        self._real: Any = 0
        self._padded = 0
        self.trainable_params: int | None = None
        self.out: Path | None = (
            None  # where each step's record so far goes (a run cut by a time limit keeps it)
        )
        self.result: dict[str, Any] = {}

    def record(self) -> dict[str, Any]:
        """Returns the result with the steps so far and the peak GPU memory so far."""
        return {
            **self.result,
            "step_seconds": self.step_seconds,
            "step_tokens": self.step_tokens,
            "step_padded": self.step_padded,
            "losses": self.losses,
            "trainable_params": self.trainable_params,
            "peak_gb": round(torch.cuda.max_memory_allocated() / 1024**3, 3)
            if torch.cuda.is_available()
            else None,
        }

    def write(self) -> None:
        """Writes `record()` to `out` atomically."""
        if self.out is None:
            return
        tmp = self.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.record(), indent=2) + "\n")
        os.replace(tmp, self.out)

    def count(self, module, args, kwargs) -> None:
        """Forward pre-hook (with_kwargs): adds the batch's real and padded tokens without a host sync."""
        ids = kwargs.get("input_ids")
        if ids is None:
            return
        mask = kwargs.get("attention_mask")
        self._padded += ids.numel()
        self._real = self._real + (mask.sum() if mask is not None and mask.dim() == 2 else ids.numel())

    def mark(self, first: bool = False) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        now = time.perf_counter()
        if not first and self._last is not None:
            self.step_seconds.append(now - self._last)
            self.step_tokens.append(int(self._real))
            self.step_padded.append(self._padded)
        self._last, self._real, self._padded = now, 0, 0
        if not first:
            self.write()

    def callback(self):
        from transformers import TrainerCallback

        recorder = self

        class Timer(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                recorder.mark(first=True)

            def on_step_end(self, args, state, control, **kwargs):
                recorder.mark()

            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs and "loss" in logs:
                    recorder.losses.append(float(logs["loss"]))

        return Timer()

    def install(self) -> None:
        """Adds the timer callback and the token hook to every transformers Trainer built from now on."""
        import transformers

        original = transformers.Trainer.__init__
        recorder = self

        @functools.wraps(original)  # the signature stays visible: ms-swift inspects it for its keywords
        def init(trainer, *args, **kwargs):
            original(trainer, *args, **kwargs)
            trainer.add_callback(recorder.callback())
            recorder.trainable_params = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
            trainer.model.register_forward_pre_hook(recorder.count, with_kwargs=True)

        transformers.Trainer.__init__ = init


def read_rows(spec: dict) -> list[dict]:
    lines = Path(spec["rows"]).read_text().splitlines()
    return [json.loads(line) for line in lines[: spec["n_rows"]] if line.strip()]


# ----- TRL
def run_trl(spec: dict, result: dict[str, Any]) -> None:
    """SFTTrainer on a conversational dataset ("messages" + "images", TRL's vision format) with a PEFT LoRA
    config; the settings come from the spec (bench/peers.py says which are TRL's and which are ours)."""
    from datasets import Dataset, Image, List
    from peft import LoraConfig
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from trl import SFTConfig, SFTTrainer

    settings = spec["settings"]
    rows = read_rows(spec)
    dataset = Dataset.from_list(
        [
            {
                "messages": [
                    {"role": "user", "content": row["query"]},
                    {"role": "assistant", "content": row["response"]},
                ],
                "images": row["images"],
            }
            for row in rows
        ]
    ).cast_column("images", List(Image()))
    dtype = torch.float32 if spec["tiny"] else torch.bfloat16
    model = AutoModelForImageTextToText.from_pretrained(
        spec["model"], dtype=dtype, attn_implementation=settings["attn_implementation"]
    )
    processor = AutoProcessor.from_pretrained(spec["model"])
    lora = spec["lora"]
    peft_config = LoraConfig(
        r=lora["r"],
        lora_alpha=lora["alpha"],
        lora_dropout=lora["dropout"],
        target_modules=lora["target_regex"],
        bias="none",
        task_type="CAUSAL_LM",
    )
    config = SFTConfig(
        output_dir=str(Path(spec["work"]) / "output"),
        max_steps=spec["steps"],
        per_device_train_batch_size=settings["per_device_train_batch_size"],
        gradient_accumulation_steps=settings["gradient_accumulation_steps"],
        gradient_checkpointing=settings["gradient_checkpointing"],
        bf16=not spec["tiny"],
        use_cpu=spec["tiny"],
        max_length=settings["max_length"],
        padding_free=settings["padding_free"],
        learning_rate=settings["learning_rate"],
        weight_decay=settings["weight_decay"],
        warmup_steps=settings["warmup_steps"],
        lr_scheduler_type=settings["lr_scheduler_type"],
        max_grad_norm=settings["max_grad_norm"],
        dataloader_num_workers=0 if spec["tiny"] else settings["dataloader_num_workers"],
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        seed=0,
    )
    trainer = SFTTrainer(
        model=model, args=config, train_dataset=dataset, processing_class=processor, peft_config=peft_config
    )
    trainer.train()


# ----- TRL's DPO
def run_trl_dpo(spec: dict, result: dict[str, Any]) -> None:
    """DPOTrainer on pairs in TRL's conversational vision layout (prompt with an image part, chosen, rejected,
    images) with a PEFT LoRA config: its reference is the model with the adapter disabled, as ours."""
    from datasets import Dataset, Image, List
    from peft import LoraConfig
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from trl import DPOConfig, DPOTrainer

    settings = spec["settings"]

    def answer(text: str) -> list[dict]:
        return [{"role": "assistant", "content": [{"type": "text", "text": text}]}]

    dataset = Dataset.from_list(
        [
            {
                "prompt": [
                    {
                        "role": "user",
                        "content": [{"type": "image"}, {"type": "text", "text": row["query"]}],
                    }
                ],
                "chosen": answer(row["response"]),
                "rejected": answer(row["rejected_response"]),
                "images": row["images"],
            }
            for row in read_rows(spec)
        ]
    ).cast_column("images", List(Image()))
    dtype = torch.float32 if spec["tiny"] else torch.bfloat16
    model = AutoModelForImageTextToText.from_pretrained(
        spec["model"], dtype=dtype, attn_implementation=settings["attn_implementation"]
    )
    processor = AutoProcessor.from_pretrained(spec["model"])
    lora = spec["lora"]
    peft_config = LoraConfig(
        r=lora["r"],
        lora_alpha=lora["alpha"],
        lora_dropout=lora["dropout"],
        target_modules=lora["target_regex"],
        bias="none",
        task_type="CAUSAL_LM",
    )
    config = DPOConfig(
        output_dir=str(Path(spec["work"]) / "output"),
        max_steps=spec["steps"],
        beta=settings["beta"],
        loss_type=settings["loss_type"],
        per_device_train_batch_size=settings["per_device_train_batch_size"],
        gradient_accumulation_steps=settings["gradient_accumulation_steps"],
        gradient_checkpointing=settings["gradient_checkpointing"],
        bf16=not spec["tiny"],
        use_cpu=spec["tiny"],
        max_length=settings["max_length"],
        learning_rate=settings["learning_rate"],
        weight_decay=settings["weight_decay"],
        warmup_steps=settings["warmup_steps"],
        lr_scheduler_type=settings["lr_scheduler_type"],
        max_grad_norm=settings["max_grad_norm"],
        dataloader_num_workers=0 if spec["tiny"] else settings["dataloader_num_workers"],
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        seed=0,
    )
    trainer = DPOTrainer(
        model=model, args=config, train_dataset=dataset, processing_class=processor, peft_config=peft_config
    )
    trainer.train()


# ----- ms-swift
def swift_dataset(spec: dict) -> Path:
    """Writes the rows as ms-swift's jsonl: `messages` with an `<image>` tag in the user turn, and `images`."""
    path = Path(spec["work"]) / "swift_rows.jsonl"
    lines = []
    for row in read_rows(spec):
        tags = "<image>" * len(row.get("images", []))
        messages = [
            {"role": "user", "content": tags + row["query"]},
            {"role": "assistant", "content": row["response"]},
        ]
        lines.append(json.dumps({"messages": messages, "images": row.get("images", [])}))
    path.write_text("\n".join(lines) + "\n")
    return path


def swift_arguments(spec: dict, dataset: Path) -> list[str]:
    """Returns `swift sft`'s command-line arguments for the spec."""
    settings = dict(spec["settings"])
    if spec["tiny"]:
        settings.update(torch_dtype="float32", dataloader_num_workers=0)
    lora = spec["lora"]
    args = {
        "model": spec["model"],
        "model_type": spec["swift_model_type"],
        "template": spec[
            "swift_model_type"
        ],  # a folder's name cannot pick it: the same name is several types
        "dataset": str(dataset),
        "output_dir": str(Path(spec["work"]) / "output"),
        "max_steps": spec["steps"],
        "lora_rank": lora["r"],
        "lora_alpha": lora["alpha"],
        "lora_dropout": lora["dropout"],
        "target_regex": lora["target_regex"],
        "logging_steps": 1,
        "save_strategy": "no",
        "eval_strategy": "no",
        "split_dataset_ratio": 0,
        "report_to": "none",
        "seed": 0,
        **settings,
    }
    out = []
    for key, value in args.items():
        if value is None:
            continue
        out += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    return out


def tiny_pixel_bounds(folder: Path) -> None:
    """ms-swift resizes Qwen images itself (qwen_vl_utils, bounds from MAX_PIXELS / MIN_PIXELS, its defaults
    made for the real towers); a tiny twin's processor allows far fewer pixels, so the smoke run passes the
    twin's own bounds. The full-size folders carry the real bounds, which swift's defaults cover."""
    config = folder / "processor_config.json"
    if not config.is_file():
        return
    size = json.loads(config.read_text()).get("image_processor", {}).get("size", {})
    if "longest_edge" in size:
        os.environ["MAX_PIXELS"] = str(size["longest_edge"])
        os.environ["MIN_PIXELS"] = str(size.get("shortest_edge", 0))


def folder_placeholder_ids(folder: Path, result: dict[str, Any]) -> None:
    """ms-swift's Qwen2-VL family of templates (Qwen2.5-VL's and Qwen3-VL's) find the image and video
    placeholders by the published vocabulary's ids (class attributes, 151655 / 151656) to expand them to one
    token per merged patch; the bench's random-weight folders have their own tokenizer, whose placeholders
    sit at other ids (the folder's config.json names them). Without this the rows kept one placeholder token
    each: Qwen3-VL failed ("Image features and image tokens do not match") and Qwen2.5-VL trained on ~91
    tokens a row instead of ~480 (2026-12-05). The templates are told the folder's ids; nothing else changes."""
    from swift.template.templates import qwen

    config = json.loads((folder / "config.json").read_text())
    ids = {key: config[key] for key in ("image_token_id", "video_token_id") if key in config}
    if not ids:
        return
    for key, value in ids.items():
        setattr(qwen.Qwen2VLTemplate, key, value)
    result["resolved"] = {**result.get("resolved", {}), "placeholder_ids": ids}


def run_swift(spec: dict, result: dict[str, Any]) -> None:
    import importlib.util

    from swift.pipelines import sft_main

    if spec["settings"].get("use_liger_kernel") and importlib.util.find_spec("liger_kernel") is None:
        spec["settings"]["use_liger_kernel"] = False
        result["resolved"] = {"use_liger_kernel": "off: liger-kernel is not installed"}
    if spec["tiny"]:
        tiny_pixel_bounds(Path(spec["model"]))
    if spec["swift_model_type"] in ("qwen2_5_vl", "qwen3_vl"):
        folder_placeholder_ids(Path(spec["model"]), result)
    result["arguments"] = swift_arguments(spec, swift_dataset(spec))
    sft_main(result["arguments"])


RUNNERS = {"trl": run_trl, "trl_dpo": run_trl_dpo, "swift": run_swift}
VERSIONS = {"trl": "trl", "trl_dpo": "trl", "swift": "ms-swift"}


def versions(peer: str) -> dict[str, str]:
    names = [VERSIONS[peer], "transformers", "peft", "accelerate", "datasets"]
    found = {"torch": torch.__version__}
    for name in names:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "absent"
    return found


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    Path(spec["work"]).mkdir(parents=True, exist_ok=True)
    peer = spec["peer"]
    recorder = StepRecorder()
    result: dict[str, Any] = {"peer": peer, "versions": versions(peer)}
    recorder.out, recorder.result = Path(spec["out"]), result
    try:
        recorder.install()
        RUNNERS[peer](spec, result)
    except BaseException as err:  # SystemExit too: argument parsers exit on a bad flag
        result["error"] = f"{type(err).__name__}: {' '.join(str(err).split())}"[:2000]
        traceback.print_exc()
    result = recorder.record()
    recorder.write()
    print(json.dumps({k: v for k, v in result.items() if k != "arguments"}), flush=True)
    if "error" in result:
        sys.exit(1)


if __name__ == "__main__":
    main()
