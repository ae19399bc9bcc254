"""The family interface on every family's tiny twin: labels, LoRA presets, training, merge, generation, limits."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from peft import PeftModel
from PIL import Image
from torch import nn
from transformers import AutoModelForImageTextToText, AutoProcessor

from pipeline.families import FAMILIES, get_family
from pipeline.families.base import IGNORE_INDEX, FamilyError, messages_from_row
from pipeline.families.minicpm_v2.collate import encode_example

HF_FAMILIES = ("qwen2_5_vl", "minicpm_v4_6", "qwen3_vl")
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "<image>What is this?"},
    {"role": "assistant", "content": "A red circle."},
    {"role": "user", "content": "How many squares?"},
    {"role": "assistant", "content": "There are 3 squares."},
]


def picture(height: int = 40, width: int = 56, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 255, (height, width, 3), dtype=np.uint8))


def nonzero_adapter(family, model: nn.Module, preset: str, seed: int) -> PeftModel:
    """Returns `model` with a seeded rank-4 LoRA adapter of `preset` whose B matrices are not zero (so that
    the adapter changes the outputs)."""
    torch.manual_seed(seed)
    peft = family.apply_lora(model, family.lora_config(model, preset, r=4, alpha=8, dropout=0.0))
    for n, p in peft.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
    return peft


@pytest.fixture(scope="module")
def twins(family_twin) -> dict:
    """Returns {family name: (family, folder)} over the session's tiny twins of every family."""
    return {name: (get_family(name), family_twin(name)) for name in FAMILIES}


@pytest.fixture(scope="module")
def loaded(twins) -> dict:
    return {name: (family, *family.load(folder)) for name, (family, folder) in twins.items()}


def test_registry_names_every_family_and_refuses_unknown_ones():
    assert set(FAMILIES) >= {"minicpm_v2", "minicpm_v4_6", "qwen2_5_vl"}
    with pytest.raises(FamilyError, match=r"model.family=llava is not a known family; valid: minicpm_v2"):
        get_family("llava")


@pytest.mark.parametrize("name", HF_FAMILIES)
def test_tiny_twin_is_a_native_folder_with_the_family_template(twins, name):
    family, folder = twins[name]
    assert json.loads((folder / "config.json").read_text())["model_type"] == family.model_type
    processor = AutoProcessor.from_pretrained(folder)
    assert processor.chat_template == family.chat_template
    model = AutoModelForImageTextToText.from_pretrained(folder)
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    # the family refuses a folder of another family before reading any weight
    other = next(n for n in HF_FAMILIES if n != name)
    with pytest.raises(FamilyError, match=f"model.family={name} expects"):
        family.load(twins[other][1])


def _expected(tokenizer, pieces: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
    """Returns ids and labels of the layout written piece by piece: (text, labelled)."""
    ids, labels = [], []
    for text, labelled in pieces:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if labelled else [IGNORE_INDEX] * len(piece)
    return ids, labels


def _qwen_layout(sample, tokenizer) -> list[tuple[str, bool]]:
    n_image = int(sample.pixel_inputs["image_grid_thw"][0].prod()) // 4
    return [
        ("<|im_start|>system\nBe brief.<|im_end|>\n", False),
        ("<|im_start|>user\n<|vision_start|>" + "<|image_pad|>" * n_image + "<|vision_end|>", False),
        ("What is this?<|im_end|>\n<|im_start|>assistant\n", False),
        ("A red circle.<|im_end|>", True),
        ("\n<|im_start|>user\nHow many squares?<|im_end|>\n<|im_start|>assistant\n", False),
        ("There are 3 squares.<|im_end|>", True),
        ("\n", False),
    ]


def _qwen3_layout(sample, tokenizer) -> list[tuple[str, bool]]:
    n_image = int(sample.pixel_inputs["image_grid_thw"][0].prod()) // 4
    return [
        ("<|im_start|>system\nBe brief.<|im_end|>\n", False),
        ("<|im_start|>user\n<|vision_start|>" + "<|image_pad|>" * n_image + "<|vision_end|>", False),
        ("What is this?<|im_end|>\n<|im_start|>assistant\n", False),
        ("A red circle.<|im_end|>", True),
        ("\n<|im_start|>user\nHow many squares?<|im_end|>\n<|im_start|>assistant\n", False),
        ("There are 3 squares.<|im_end|>", True),
        ("\n", False),
    ]


def _minicpm_layout(sample, tokenizer) -> list[tuple[str, bool]]:
    sizes = sample.pixel_inputs["target_sizes"]
    assert len(sizes) == 1, "a small image is not sliced"
    n_image = int(sizes[0].prod()) // 16
    no_think = "<think>\n\n</think>\n\n"
    return [
        ("<|im_start|>system\nBe brief.<|im_end|>\n", False),
        ("<|im_start|>user\n<image_id>0</image_id><image>" + "<|image_pad|>" * n_image + "</image>", False),
        (f"What is this?<|im_end|>\n<|im_start|>assistant\n{no_think}", False),
        ("A red circle.<|im_end|>", True),
        (f"\n<|im_start|>user\nHow many squares?<|im_end|>\n<|im_start|>assistant\n{no_think}", False),
        ("There are 3 squares.<|im_end|>", True),
        ("\n", False),
    ]


@pytest.mark.parametrize(
    ("name", "layout"), [("qwen2_5_vl", _qwen_layout), ("minicpm_v4_6", _minicpm_layout)]
)
def test_labels_are_the_assistant_turns_token_by_token(loaded, name, layout):
    family, _, processor = loaded[name]
    sample = family.encode(processor, CONVERSATION, [picture()])
    ids, labels = _expected(processor.tokenizer, layout(sample, processor.tokenizer))
    assert sample.input_ids == ids
    assert sample.labels == labels
    # the processor's own rendering of the family's template gives the same ids
    hf_messages = [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A red circle."}]},
        {"role": "user", "content": [{"type": "text", "text": "How many squares?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "There are 3 squares."}]},
    ]
    direct = processor.apply_chat_template(hf_messages, tokenize=False, **family.template_kwargs)
    assert list(processor(text=[direct], images=[[picture()]])["input_ids"][0]) == sample.input_ids


@pytest.mark.parametrize("name", FAMILIES)
def test_last_round_labels_the_final_answer_alone(loaded, name):
    family, _, processor = loaded[name]
    every = family.encode(processor, CONVERSATION, [picture()])
    last = family.encode(processor, CONVERSATION, [picture()], last_round=True)
    assert last.input_ids == every.input_ids
    supervised = [k for k, label in enumerate(every.labels) if label != IGNORE_INDEX]
    kept = [k for k, label in enumerate(last.labels) if label != IGNORE_INDEX]
    # the same labels where it keeps any, on the last unbroken run of the first's (the final answer's turn)
    assert all(last.labels[k] == every.labels[k] for k in kept)
    run_start = max(k for k in supervised if k - 1 not in supervised)
    assert kept == [k for k in supervised if k >= run_start] and 0 < len(kept) < len(supervised)
    answer = processor.tokenizer.decode([every.input_ids[k] for k in kept])
    assert answer.startswith("There are 3 squares.") and "red circle" not in answer


def test_a_cut_that_leaves_the_final_answer_nothing_keeps_no_row_under_last_round(loaded):
    # MiniCPM-V-2 truncates (dataset.truncation=truncate): the cut falls inside the long last query, so every
    # answer's loss keeps the history's answer, the final answer's loss keeps nothing and validation says so
    from pipeline.data.images import ImageFiles
    from pipeline.data.rows import Row

    family, model, processor = loaded["minicpm_v2"]
    bundle = family.load_bundle(processor.folder)
    row = Row("and now? " + "word " * 80, "yes", [("hi", "hello there")], [], None, "rows.jsonl:3")
    every = family.token_counter(bundle, 48, "truncate", ImageFiles())(row)
    final = family.token_counter(bundle, 48, "truncate", ImageFiles(), last_round=True)(row)
    assert every == 48 and final > 48  # kept at the cut, against its whole length (over max_length)
    kept = family.dataset(bundle, [row], 48, "truncate", ImageFiles())[0]
    assert len(kept.input_ids) == 48 and any(label != IGNORE_INDEX for label in kept.labels)


GENERATION_PROMPT = {
    "qwen2_5_vl": "<|im_end|>\n<|im_start|>assistant\n",
    "minicpm_v4_6": "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n",
    "qwen3_vl": "<|im_end|>\n<|im_start|>assistant\n",
}


@pytest.mark.parametrize("name", HF_FAMILIES)
def test_generation_prompt_ends_with_the_assistant_opening_and_has_no_labels(loaded, name):
    family, _, processor = loaded[name]
    sample = family.encode(processor, CONVERSATION, [picture()], generation=True)
    assert all(label == IGNORE_INDEX for label in sample.labels)
    text = processor.tokenizer.decode(sample.input_ids)
    assert "There are 3 squares" not in text and text.endswith(GENERATION_PROMPT[name])
    assert "How many squares?" in text


@pytest.mark.parametrize("name", HF_FAMILIES)
def test_several_images_are_placed_at_their_tags(loaded, name):
    family, _, processor = loaded[name]
    conversation = [
        {"role": "user", "content": "Left <image> right <image> compare."},
        {"role": "assistant", "content": "The same."},
    ]
    sample = family.encode(processor, conversation, [picture(seed=1), picture(100, 140, seed=2)])
    text = processor.tokenizer.decode(sample.input_ids, skip_special_tokens=False)
    image = processor.tokenizer.image_token
    assert (
        text.index("Left")
        < text.index(image)
        < text.index("right")
        < text.rindex(image)
        < text.index("compare")
    )
    batch = family.collate_for_training(processor, [sample])
    assert torch.equal(batch["labels"][0] != IGNORE_INDEX, torch.tensor(sample.labels) != IGNORE_INDEX)


def _lora_names(model: nn.Module) -> set[str]:
    return {
        n.replace("base_model.model.", "", 1).rsplit(".lora_A", 1)[0]
        for n, _ in model.named_modules()
        if n.endswith(".lora_A")
    }


QKV_EXPECTED = {
    # two full-attention layers, q/k/v each
    "qwen2_5_vl": {f"model.language_model.layers.{i}.self_attn.{p}_proj" for i in (0, 1) for p in "qkv"},
    # layer 0 full attention (q/k/v), layer 1 linear attention (its fused q/k/v projection)
    "minicpm_v4_6": {f"model.language_model.layers.0.self_attn.{p}_proj" for p in "qkv"}
    | {"model.language_model.layers.1.linear_attn.in_proj_qkv"},
    "minicpm_v2": {f"llm.model.layers.{i}.self_attn.{p}_proj" for i in (0, 1) for p in "qkv"},
    "qwen3_vl": {f"model.language_model.layers.{i}.self_attn.{p}_proj" for i in (0, 1) for p in "qkv"},
}
VISION_AND_PROJECTOR = {
    "qwen2_5_vl": ("model.visual.blocks.", "model.visual.merger."),
    "minicpm_v4_6": ("model.vision_tower.", "model.merger."),
    "minicpm_v2": ("vpm.", "resampler."),
    "qwen3_vl": ("model.visual.blocks.", "model.visual.deepstack_merger_list."),
}


@pytest.mark.parametrize("name", list(QKV_EXPECTED))
def test_lora_presets_target_the_intended_modules(twins, name):
    family, folder = twins[name]
    model, _ = family.load(folder)
    qkv = family.apply_lora(model, family.lora_config(model, "qkv", r=4, alpha=8, dropout=0.0))
    assert _lora_names(qkv) == QKV_EXPECTED[name]
    assert all("lora_" in n for n, p in qkv.named_parameters() if p.requires_grad)

    model, _ = family.load(folder)
    explicit = family.lora_config(model, "all", r=4, alpha=8, dropout=0.0, target_modules=["q_proj"])
    # a bare name matches every layer that ends with it, as ms-swift's target_modules do
    queries = {n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.endswith(".q_proj")}
    assert {n for n, _ in model.named_modules() if re.fullmatch(explicit.target_modules, n)} == queries
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    hit = _lora_names(family.apply_lora(model, family.lora_config(model, "all", r=4, alpha=8, dropout=0.0)))
    vision, projector = VISION_AND_PROJECTOR[name]
    assert any(n.startswith(vision) for n in hit) and any(n.startswith(projector) for n in hit)
    assert QKV_EXPECTED[name] < hit and not any(n.endswith("lm_head") for n in hit)
    if (
        name != "minicpm_v2"
    ):  # every linear layer but lm_head (MiniCPM-V-2's exclusions: pipeline/families/minicpm_v2/lora.py)
        assert hit == linears - {"lm_head"}


@pytest.mark.parametrize("name", list(QKV_EXPECTED))
def test_full_finetune_freeze_groups(twins, name):
    family, folder = twins[name]
    model, _ = family.load(folder)
    family.set_full_finetune(model, frozen=("vision",))
    vision, projector = VISION_AND_PROJECTOR[name]
    params = dict(model.named_parameters())
    assert not any(p.requires_grad for n, p in params.items() if n.startswith(vision))
    assert any(p.requires_grad for n, p in params.items() if n.startswith(projector))
    assert all(p.requires_grad for n, p in params.items() if n in {f"{q}.weight" for q in QKV_EXPECTED[name]})
    with pytest.raises(FamilyError, match="leaves nothing to train|trains nothing"):
        family.set_full_finetune(model, frozen=("vision", "projector", "llm"))
    with pytest.raises(FamilyError, match="unknown freeze group"):
        family.set_full_finetune(model, frozen=("tower",))


def _batch(family, processor):
    samples = [
        family.encode(processor, CONVERSATION, [picture()]),
        family.encode(
            processor,
            [{"role": "user", "content": "Two plus two?"}, {"role": "assistant", "content": "4."}],
            [],
        ),
    ]
    return family.collate_for_training(processor, samples)


@pytest.mark.parametrize("name", list(QKV_EXPECTED))
def test_a_few_lora_steps_lower_the_loss(twins, name):
    family, folder = twins[name]
    model, processor = family.load(folder)
    torch.manual_seed(0)
    model = family.apply_lora(model, family.lora_config(model, "all", r=8, alpha=16, dropout=0.0))
    batch = _batch(family, processor)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    model.train()
    losses = []
    for _ in range(6):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses


@pytest.mark.parametrize("name", HF_FAMILIES)
def test_merge_round_trips_through_plain_auto_classes(twins, tmp_path, name):
    family, folder = twins[name]
    model, processor = family.load(folder)
    peft = nonzero_adapter(family, model, "all", seed=1)  # merging changes the weights
    peft.eval()
    batch = _batch(family, processor)
    with torch.no_grad():
        expected = peft(**batch).logits
        base = peft.get_base_model()
        with peft.disable_adapter():
            plain = base(**batch).logits
    assert not torch.allclose(expected, plain, atol=1e-3)
    peft.save_pretrained(tmp_path / "adapter")
    fresh, _ = family.load(folder)
    with torch.no_grad():
        adapted = family.load_adapter(fresh, tmp_path / "adapter").eval()
        torch.testing.assert_close(adapted(**batch).logits, expected, atol=1e-5, rtol=1e-5)
    out = family.merge(peft, processor, tmp_path / "merged")
    merged = AutoModelForImageTextToText.from_pretrained(out).eval()
    reloaded = AutoProcessor.from_pretrained(out)
    assert not isinstance(merged, PeftModel) and not (out / "adapter_config.json").exists()
    again = family.collate_for_training(reloaded, [family.encode(reloaded, CONVERSATION, [picture()])])
    assert again["input_ids"][0].tolist() == batch["input_ids"][0, : again["input_ids"].shape[1]].tolist()
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", list(QKV_EXPECTED))
def test_generation_returns_the_decoded_new_text(loaded, name):
    family, model, processor = loaded[name]
    prompts = [
        family.encode(processor, CONVERSATION[:2], [picture()], generation=True),
        family.encode(processor, [{"role": "user", "content": "Two plus two?"}], [], generation=True),
    ]
    batch = family.collate_for_generation(processor, prompts)
    texts = family.generate(model, processor, batch, max_new_tokens=4)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    # one prompt alone gives the same greedy text as in the left-padded batch
    alone = family.generate(
        model, processor, family.collate_for_generation(processor, prompts[1:]), max_new_tokens=4
    )
    assert alone == texts[1:]


def test_minicpm_v4_6_generation_puts_only_the_last_position_through_its_head(loaded, monkeypatch):
    """MiniCPM-V 4.6's forward has no logits_to_keep: generation hooks its head to the last position of every
    forward (prefill included), with the same greedy answers as the full logits."""
    from pipeline.families import hf_native

    family, model, processor = loaded["minicpm_v4_6"]
    prompts = [
        family.encode(processor, CONVERSATION[:2], [picture()], generation=True),
        family.encode(processor, [{"role": "user", "content": "Two plus two?"}], [], generation=True),
    ]
    batch = family.collate_for_generation(processor, prompts)
    seen = []
    handle = model.get_output_embeddings().register_forward_hook(lambda m, a, out: seen.append(a[0].shape[1]))
    try:
        hooked = family.generate(model, processor, batch, max_new_tokens=4)
        assert seen and set(seen) == {1}
        seen.clear()
        monkeypatch.setattr(hf_native, "selects_positions", lambda model: None)
        full = family.generate(model, processor, batch, max_new_tokens=4)
    finally:
        handle.remove()
    assert seen[0] == batch["input_ids"].shape[1]  # without the hook the prefill takes every position
    assert hooked == full


def test_minicpm_v2_encodes_exactly_as_the_project_template(loaded):
    family, _, processor = loaded["minicpm_v2"]
    image = picture(80, 120)
    sample = family.encode(processor, CONVERSATION, [image])
    reference = encode_example(
        processor.tokenizer,
        processor.image_processor,
        "How many squares?",
        "There are 3 squares.",
        history=[("What is this?", "A red circle.")],
        system="Be brief.",
        image=image,
    )
    assert sample.input_ids == reference.input_ids and sample.labels == reference.labels
    assert sample.pixel_inputs["image_bound"] == reference.image_bound
    row = messages_from_row(
        "How many squares?", "There are 3 squares.", [("What is this?", "A red circle.")], "Be brief."
    )
    assert family.encode(processor, row, [image]).input_ids == reference.input_ids
    with pytest.raises(FamilyError, match="the image goes at the start of the first user message"):
        family.encode(
            processor,
            [{"role": "user", "content": "Look <image>"}, {"role": "assistant", "content": "ok"}],
            [image],
        )


@pytest.mark.parametrize(
    ("name", "limit"), [("minicpm_v2", 1), ("qwen2_5_vl", 16), ("minicpm_v4_6", 16), ("qwen3_vl", 16)]
)
def test_image_count_limit_is_enforced_before_encoding(twins, name, limit):
    family, _ = twins[name]
    assert family.limits().max_images == limit
    images = [picture()] * (limit + 1)
    conversation = [{"role": "user", "content": "Describe."}, {"role": "assistant", "content": "Pictures."}]
    with pytest.raises(
        FamilyError, match=rf"{name}: {limit + 1} images in one conversation; .* at most {limit} image"
    ):
        family.check_conversation(conversation, images)
    with pytest.raises(FamilyError, match=r"2 <image> tag\(s\) but 1 image\(s\)"):
        family.check_conversation([{"role": "user", "content": "<image><image>"}], [picture()])
    with pytest.raises(FamilyError, match="two user messages in a row"):
        family.check_conversation([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], [])


@pytest.mark.parametrize(
    ("option", "family", "settings"),
    [
        ("minicpm_v2", "minicpm_v2", {"max_slice_nums": 9, "slice_mode": True}),
        ("minicpm_v4_6", "minicpm_v4_6", {"max_slice_nums": 9}),
        ("qwen2_5_vl_3b", "qwen2_5_vl", {"min_pixels": 3136, "max_pixels": 1003520}),
        ("qwen2_5_vl_7b", "qwen2_5_vl", {"min_pixels": 3136, "max_pixels": 1003520}),
        ("qwen2_5_vl_tiny", "qwen2_5_vl", {}),
        ("qwen3_vl_4b", "qwen3_vl", {}),
    ],
)
def test_model_configs_select_their_family_and_settings(compose, option, family, settings):
    from pipeline.config import validate
    from pipeline.families import family_from_config

    cfg = compose([f"model={option}", "stages=[]"])
    validate(cfg)
    chosen = family_from_config(cfg.model)
    assert chosen.name == family and chosen.settings == settings


def test_every_family_runs_the_stages_and_bad_family_settings_are_refused_before_any_work(compose):
    from pipeline.config import ConfigError, validate

    for name in ("qwen3_vl_tiny", "qwen2_5_vl_tiny", "minicpm_v4_6_tiny", "minicpm_v2_tiny"):
        validate(compose([f"model={name}"]))  # every registered family runs the stages
    with pytest.raises(ConfigError, match=r"model.family=llava is not a valid choice; valid: minicpm_v2"):
        validate(compose(["model.family=llava", "stages=[]"]))
    with pytest.raises(ConfigError, match=r"model.processor_kwargs is for transformers-native families"):
        validate(compose(["+model.processor_kwargs.max_pixels=100", "stages=[]"]))


def test_unknown_processor_settings_are_refused_naming_the_valid_ones(twins):
    with pytest.raises(
        FamilyError, match=r"qwen2_5_vl: unknown processor setting\(s\) max_pixelz; valid: min_pixels"
    ):
        get_family("qwen2_5_vl", {"max_pixelz": 10})
    family, folder = twins["qwen2_5_vl"]
    _, processor = get_family("qwen2_5_vl", {"max_pixels": 16 * 16 * 4}).load(folder)
    small = family.encode(processor, CONVERSATION, [picture(64, 64)])
    _, default = family.load(folder)
    large = family.encode(default, CONVERSATION, [picture(64, 64)])
    assert len(small) < len(large)  # the setting reaches the processor: fewer image tokens


def test_minicpm_v2_merge_writes_the_official_layout_with_equal_logits(twins, tmp_path):
    family, folder = twins["minicpm_v2"]
    model, processor = family.load(folder)
    peft = nonzero_adapter(family, model, "qkv", seed=2)
    peft.eval()
    batch = _batch(family, processor)
    with torch.no_grad():
        expected = peft(**batch).logits
    out = family.merge(peft, processor, tmp_path / "merged")
    assert (out / "tokenizer.model").is_file() and (out / "preprocessor_config.json").is_file()
    merged, reloaded = family.load(out)
    again = family.encode(reloaded, CONVERSATION, [picture()])
    assert again.input_ids == family.encode(processor, CONVERSATION, [picture()]).input_ids
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", list(QKV_EXPECTED))
def test_bad_paths_and_open_conversations_are_refused_clearly(twins, tmp_path, name):
    family, _ = twins[name]
    with pytest.raises(ValueError, match="is not a local folder and downloads are off"):
        family.base_folder("someone/Some-VLM")
    with pytest.raises(ValueError, match="does not exist"):
        family.base_folder(str(tmp_path / "missing" / "model"))
    with pytest.raises(FamilyError, match="a training conversation must end with an assistant message"):
        family.prepare_messages([{"role": "user", "content": "Hi"}], [], generation=False)


@pytest.mark.parametrize("name", ["qwen2_5_vl", "qwen3_vl"])
@pytest.mark.parametrize("settings", [{}, {"min_pixels": 16 * 16 * 4, "max_pixels": 16 * 16 * 12}])
def test_counts_from_image_sizes_equal_the_encoded_lengths(twins, tmp_path, name, settings):
    """The Qwen VLs count a row from its text and its images' header sizes (no pixels decoded): the count
    equals the encoded row's length for every size, resolution setting, image count and round count."""
    from pipeline.data.images import ImageFiles
    from pipeline.data.rows import Row
    from pipeline.families.base import Bundle, row_images

    family = get_family(name, settings)
    assert family.counts_from_sizes
    model, processor = family.load(twins[name][1])
    paths = []
    for k, (w, h) in enumerate([(13, 200), (640, 480), (37, 41), (300, 90)]):
        Image.new("RGB", (w, h), (10 * k, 80, 160)).save(tmp_path / f"{k}.png")
        paths.append(str(tmp_path / f"{k}.png"))

    def row(query, response, images=(), history=(), system=None):
        return Row(query, response, list(history), list(images), system, "rows.jsonl:1")

    rows = [
        row("What is this?", "A tile.", [paths[0]]),
        row("<image>and<image>: which is wider?", "The first one.", paths[1:3]),
        row("Next?<image>", "Blue.", paths[2:], history=[("<image>Colour?", "Teal.")], system="Be brief."),
        row("No image here.", "Fine."),
    ]
    bundle = Bundle(model, processor, twins[name][1], "base")
    images = ImageFiles()
    count = family.token_counter(bundle, max_length=100_000, truncation="delete", images=images)
    encoded = [family._encode_row(processor, r, row_images(r, images), generation=False) for r in rows]
    assert [count(r) for r in rows] == [len(sample) for sample in encoded]
    # a row too long to keep gets its full length, which validation reports as over max_length
    assert family.token_counter(bundle, max_length=8, truncation="delete", images=images)(rows[1]) == count(
        rows[1]
    )


@pytest.mark.parametrize("name", HF_FAMILIES)
def test_varlen_vision_attention_equals_sdpa_in_one_call_per_layer(twins, tmp_path, name):
    """model.vision_attention=varlen: the tower attends over all its images (windows) in one call per layer,
    with transformers' SDPA results; the language model keeps SDPA and saved configs never name it."""
    from transformers import AttentionInterface

    from pipeline.families import vision_attention

    _, folder = twins[name]
    plain_family, varlen_family = (
        get_family(name, vision_attention="sdpa"),
        get_family(name, vision_attention="varlen"),
    )
    plain, processor = plain_family.load(folder)
    model, _ = varlen_family.load(folder)
    assert vision_attention.implementation(plain) != vision_attention.VARLEN
    assert vision_attention.implementation(model) == vision_attention.VARLEN
    assert (
        model.config.get_text_config()._attn_implementation
        == plain.config.get_text_config()._attn_implementation
    )
    calls = []

    def spy(module, query, key, value, attention_mask, **kwargs):
        calls.append(len(kwargs["cu_seq_lens_q"]) - 1)
        return vision_attention.varlen_attention(module, query, key, value, attention_mask, **kwargs)

    samples = [
        plain_family.encode(processor, CONVERSATION, [picture(96, 120, seed=1)]),
        plain_family.encode(
            processor, messages_from_row("<image><image>Compare.", "Alike."), [picture(), picture(seed=2)]
        ),
    ]
    batch = plain_family.collate_for_training(processor, samples)
    AttentionInterface.register(vision_attention.VARLEN, spy)
    try:
        with torch.no_grad():
            got, want = model(**batch).logits, plain(**batch).logits
    finally:
        vision_attention.register()
    assert calls and max(calls) >= 3, calls  # three images (or more windows) in one call
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    varlen_family.save(model, processor, tmp_path / "saved")
    assert vision_attention.VARLEN not in (tmp_path / "saved" / "config.json").read_text()
    again = AutoModelForImageTextToText.from_pretrained(tmp_path / "saved").eval()
    assert vision_attention.implementation(again) != vision_attention.VARLEN
    with torch.no_grad():
        torch.testing.assert_close(again(**batch).logits, want, atol=1e-5, rtol=1e-5)


def test_a_family_newer_than_the_installed_transformers_is_refused_naming_the_version(twins):
    family, folder = twins["minicpm_v4_6"]
    with pytest.raises(FamilyError, match=r"minicpm_v4_6 needs transformers>=5\.19 .*has 5\.17\.0"):
        family.check_transformers("5.17.0")
    family.check_transformers()  # the installed one is new enough
    get_family("qwen2_5_vl").check_transformers("5.17.0")  # no floor of its own


@pytest.mark.parametrize("name", HF_FAMILIES)
def test_loss_sums_on_the_supervised_positions_equal_the_full_logits(twins, monkeypatch, name):
    """Only the supervised positions go through lm_head (the Qwen VLs: logits_to_keep; MiniCPM-V 4.6, whose
    forward has no such argument: a pre-hook on its head); the sums and the gradients equal the full-logit
    computation's, and the mean equals transformers' own loss."""
    from pipeline.families import hf_native

    family, folder = twins[name]
    model, processor = family.load(folder)
    model = nonzero_adapter(family, model, "qkv", seed=0)
    samples = [
        family.encode(processor, CONVERSATION, [picture()]),
        family.encode(processor, messages_from_row("Two plus two?", "Four, as always."), []),
    ]
    batch = family.collate_for_training(processor, samples)
    assert hf_native.selects_positions(model) == ("hook" if name == "minicpm_v4_6" else "kwarg")
    head = model.get_output_embeddings()
    shapes = []
    handle = head.register_forward_hook(lambda module, args, out: shapes.append(args[0].shape[1]))

    def sums_and_grads():
        model.zero_grad()
        out = family.loss_outputs(model, batch)
        out.loss_sum.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        return out, grads

    kept, kept_grads = sums_and_grads()
    monkeypatch.setattr(hf_native, "selects_positions", lambda model: None)
    full, full_grads = sums_and_grads()
    handle.remove()
    assert shapes[0] < shapes[1] == batch["input_ids"].shape[1]  # the head saw the kept positions only
    assert kept.num_tokens.item() == full.num_tokens.item() > 10
    assert kept.num_correct.item() == full.num_correct.item()
    torch.testing.assert_close(kept.loss_sum, full.loss_sum, rtol=1e-5, atol=1e-5)
    for n in full_grads:
        torch.testing.assert_close(kept_grads[n], full_grads[n], rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        own = model(**batch).loss
    torch.testing.assert_close(full.loss_sum / full.num_tokens, own, rtol=1e-5, atol=1e-5)


def test_prefetched_generation_of_another_family_gives_the_same_answers_and_names_a_bad_row(twins, tmp_path):
    """Eval and infer of an HF-native family load and encode the next batches on threads (the GPU default):
    the same answers as one batch after the other; a row whose image fails in a later batch is named."""
    from pipeline.apps.generation import generate_for_rows, generation_settings
    from pipeline.data.images import ImageLoadError
    from pipeline.data.rows import Row

    family, folder = twins["qwen2_5_vl"]
    bundle = family.load_bundle(str(folder))
    paths = []
    for k in range(7):
        paths.append(tmp_path / f"{k}.png")
        picture(seed=k).save(paths[-1])
    rows = [
        Row(f"<image>Colour {k}?", "", [], [str(p)], None, f"rows.jsonl:{k + 1}") for k, p in enumerate(paths)
    ]
    settings = generation_settings({"max_new_tokens": 5})
    plain = generate_for_rows(family, bundle, rows, settings, batch_size=2, prefetch=False)
    assert len(plain) == 7
    assert generate_for_rows(family, bundle, rows, settings, batch_size=2, prefetch=True) == plain
    broken = tmp_path / "cut.png"
    broken.write_bytes(paths[0].read_bytes()[:100])
    bad = Row("<image>Colour?", "", [], [str(broken)], None, "rows.jsonl:7")
    with pytest.raises(ImageLoadError, match="rows.jsonl:7: .*cut.png"):
        generate_for_rows(family, bundle, [*rows[:-1], bad], settings, batch_size=2, prefetch=True)


def test_vision_attention_auto_picks_the_kernel_only_where_it_runs(monkeypatch):
    from pipeline.families import vision_attention as va

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert va.resolve("auto", cpu, torch.bfloat16) is False  # no kernel on a CPU
    assert va.resolve("varlen", cpu, torch.float32) is True  # forced: the per-piece computation
    assert va.resolve("sdpa", cuda, torch.bfloat16) is False
    monkeypatch.setattr(va, "_ampere_or_newer", lambda index: True)
    assert va.resolve("auto", cuda, torch.bfloat16) is (va._kernel() is not None)
    assert va.resolve("auto", cuda, torch.float32) is False  # FlashAttention takes half precision only
    monkeypatch.setattr(va, "_ampere_or_newer", lambda index: False)  # a V100 or T4
    assert va.resolve("auto", cuda, torch.float16) is False
    with pytest.raises(ValueError, match="model.vision_attention=flash is not a valid choice"):
        va.resolve("flash", cpu, torch.float32)


@pytest.mark.parametrize("name", FAMILIES)
def test_a_model_folder_tells_its_parameter_count_before_loading(loaded, twins, tmp_path, name):
    """The plan sizes full fine-tuning's token budget from the base folder's parameter count, read from the
    safetensors headers: every parameter of the loaded model, tied weights once."""
    from pipeline.families.checkpoints import parameters_in_folder

    model = loaded[name][1]
    assert parameters_in_folder(twins[name][1]) == sum(p.numel() for p in model.parameters())
    assert parameters_in_folder(tmp_path) is None and parameters_in_folder("org/not-downloaded") is None
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{broken")
    assert (
        parameters_in_folder(tmp_path) is None
    )  # the model's loader names a damaged file; the plan does without


def test_fp32_weights_under_bf16_autocast_attend_by_the_kernel_of_their_compute_dtype(twins, monkeypatch):
    """Full fine-tuning loads fp32 weights, and a quantized base loads on the CPU: for both
    model.vision_attention=auto resolved to transformers' loop at load. The sft stage tells the model the dtype
    its training computes in, and a quantized load resolves again on its device; auto resolves by them."""
    from pipeline.families import vision_attention as va

    family, folder = twins["qwen2_5_vl"]
    cuda = torch.device("cuda")
    # the kernel "runs" on a CUDA device in half precision; the model stays on the CPU but says it is on CUDA
    monkeypatch.setattr(
        va, "kernel_runs", lambda device, dtype: device.type == "cuda" and dtype.itemsize == 2
    )
    monkeypatch.setattr(type(family), "device_of", lambda self, bundle: cuda)
    bundle = family.load_bundle(str(folder))  # fp32: its own copy, the attention setting is changed below
    assert family.vision_attention_of(bundle) == "sdpa"
    family.attend_in(bundle, torch.float32)  # no autocast: the loop stays
    assert family.vision_attention_of(bundle) == "sdpa"
    family.attend_in(bundle, torch.bfloat16)
    assert family.vision_attention_of(bundle) == "varlen"

    monkeypatch.setattr(type(family), "quantize", lambda self, bundle, choice, dtype, device: 0)
    quantized = family.load_quantized(str(folder), quantization="nf4", dtype=torch.bfloat16, device=cuda)
    assert family.vision_attention_of(quantized) == "varlen"  # loaded on the CPU, resolved again on CUDA

    sdpa_only = get_family("qwen2_5_vl", vision_attention="sdpa")  # the switch that turns the lever off
    other = sdpa_only.load_bundle(str(folder))
    sdpa_only.attend_in(other, torch.bfloat16)
    assert sdpa_only.vision_attention_of(other) == "sdpa"
