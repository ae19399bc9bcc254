"""The MiniCPM-V-2 model: official key/shape list, checkpoint round trip, numerics and generation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pipeline.families.base import IGNORE_INDEX
from pipeline.families.checkpoints import CheckpointError
from pipeline.families.minicpm_v2.checkpoint import check_checkpoint, load_model, save_checkpoint
from pipeline.families.minicpm_v2.configuration import MiniCPMVConfig
from pipeline.families.minicpm_v2.generation import GenerationSettings, generate
from pipeline.families.minicpm_v2.modeling import MiniCPMV
from pipeline.families.minicpm_v2.resampler import sincos_2d
from pipeline.families.minicpm_v2.tiny import TINY_SIZES
from pipeline.families.minicpm_v2.vision import vision_tower_features

# Every tensor of the official checkpoint (key, shape), as listed by its safetensors index.
REFERENCE_TSV = Path(__file__).resolve().parent / "minicpm_v2_state_dict.tsv"
Q = 16  # query_num of the small config below


def small_config(**overrides) -> MiniCPMVConfig:
    """The tiny twin's sizes with a small vocabulary (no tokenizer needed here)."""
    return MiniCPMVConfig(**{**TINY_SIZES, "vocab_size": 300, **overrides})


def loss_and_grads(model: MiniCPMV) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Returns the loss of the standard batch and every parameter's gradient after backward."""
    ids, pixels, bounds, labels = batch()
    model.zero_grad()
    loss = model(ids, pixel_values=pixels, image_bound=bounds, labels=labels).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture(scope="module")
def model() -> MiniCPMV:
    torch.manual_seed(0)
    return MiniCPMV(small_config()).eval()


def batch(seed: int = 0):
    """Two samples: one 112x112 image, one 98x140 image (another patch grid), text around them."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 290, (2, 40), generator=g)
    ids[:, 5] = 101
    ids[:, 6 : 6 + Q] = 0
    ids[:, 6 + Q] = 102
    pixels = [[torch.randn(3, 112, 112, generator=g)], [torch.randn(3, 98, 140, generator=g)]]
    bounds = [torch.tensor([[6, 6 + Q]]), torch.tensor([[6, 6 + Q]])]
    labels = ids.clone()
    labels[:, :25] = IGNORE_INDEX
    return ids, pixels, bounds, labels


def test_full_size_config_matches_official_keys_shapes_and_count():
    with torch.device("meta"):
        model = MiniCPMV(MiniCPMVConfig())
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    reference = {}
    for line in REFERENCE_TSV.read_text().splitlines():
        key, shape = line.split("\t")
        reference[key] = json.loads(shape)
    assert ours == reference
    assert sum(v.numel() for v in model.state_dict().values()) == 3_434_965_792
    parts = {
        p: sum(v.numel() for k, v in model.state_dict().items() if k.startswith(p))
        for p in ("llm.", "vpm.", "resampler.")
    }
    assert parts == {"llm.": 3_007_703_808, "vpm.": 397_747_744, "resampler.": 29_514_240}


def test_official_config_json_round_trips(tmp_path):
    official = {
        "architectures": ["MiniCPMV"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "dim_model_base": 256,
        "drop_vision_last_layer": True,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": 2304,
        "image_size": 448,
        "initializer_range": 0.1,
        "intermediate_size": 5760,
        "max_position_embeddings": 4096,
        "max_slice_nums": 9,
        "mm_use_im_start_end": True,
        "model_type": "minicpmv",
        "num_attention_heads": 36,
        "num_hidden_layers": 40,
        "num_key_value_heads": 36,
        "patch_size": 14,
        "pretraining_tp": 1,
        "query_num": 64,
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "rope_theta": 10000.0,
        "scale_depth": 1.4,
        "scale_emb": 12,
        "scale_resolution": 448,
        "slice_mode": True,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vision_encoder": "vit_so400m_patch14_siglip_384.webli",
        "vocab_size": 122753,
    }
    (tmp_path / "config.json").write_text(json.dumps(official))
    config = MiniCPMVConfig.from_pretrained(tmp_path)
    written = config.to_dict()
    for key, value in official.items():
        if key not in ("torch_dtype", "architectures"):
            assert written[key] == value, key
    assert "vision_config" not in written


def test_chunked_loss_equals_full_cross_entropy(model, monkeypatch):
    ids, pixels, bounds, labels = batch()
    monkeypatch.setattr("pipeline.families.minicpm_v2.modeling.LOSS_CHUNK_ROWS", 7)
    out = model(ids, pixel_values=pixels, image_bound=bounds, labels=labels, return_logits=True)
    ref = F.cross_entropy(out.logits[:, :-1].reshape(-1, 300), labels[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, ref)
    assert int(out.num_tokens) == int((labels[:, 1:] != IGNORE_INDEX).sum())
    acc = (out.logits[:, :-1].argmax(-1) == labels[:, 1:])[labels[:, 1:] != IGNORE_INDEX].sum()
    assert int(out.num_correct) == int(acc)


def test_image_queries_replace_placeholders_unscaled(model):
    ids, pixels, bounds, _ = batch()
    embeds = model.embed(ids, pixels, bounds)
    queries = model.encode_images([pixels[0][0]])[0]
    torch.testing.assert_close(embeds[0, 6 : 6 + Q], queries)
    text = model.llm.model.embed_tokens(ids[0, :6]) * model.config.scale_emb
    torch.testing.assert_close(embeds[0, :6], text)


def test_batched_vision_equals_one_image_at_a_time(model):
    g = torch.Generator().manual_seed(1)
    images = [
        torch.randn(3, 112, 112, generator=g),
        torch.randn(3, 70, 98, generator=g),
        torch.randn(3, 112, 112, generator=g),
    ]
    together = model.encode_images(images)
    for img, q in zip(images, together, strict=True):
        torch.testing.assert_close(model.encode_images([img])[0], q, rtol=1e-5, atol=1e-5)


def test_placeholder_count_mismatch_is_refused(model):
    ids, pixels, bounds, _ = batch()
    with pytest.raises(ValueError, match="image placeholders"):
        model.embed(ids, [pixels[0] * 2, pixels[1]], bounds)


def test_save_load_round_trip_gives_identical_logits(model, tmp_path):
    ids, pixels, bounds, _ = batch()
    folder = save_checkpoint(model, tmp_path / "ckpt", max_shard_bytes=400_000)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards_of = {}
    for key, shard in index["weight_map"].items():
        shards_of.setdefault(key.split(".")[0], set()).add(shard)
    assert not shards_of["llm"] & (shards_of["vpm"] | shards_of["resampler"])  # LLM shards come first
    loaded = load_model(folder)
    ref = model(ids, pixel_values=pixels, image_bound=bounds, return_logits=True).logits
    got = loaded(ids, pixel_values=pixels, image_bound=bounds, return_logits=True).logits
    assert torch.equal(ref, got)
    via_hf = MiniCPMV.from_pretrained(folder).eval()
    assert torch.equal(ref, via_hf(ids, pixel_values=pixels, image_bound=bounds, return_logits=True).logits)
    assert not loaded.resampler.pos_embed.requires_grad


def test_mismatched_checkpoint_is_refused_naming_keys(model, tmp_path):
    folder = save_checkpoint(model, tmp_path / "ckpt")
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] = 512
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"shape mismatches.*mlp.gate_proj.weight"):
        load_model(folder)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="downloads are off"):
        load_model("openbmb/MiniCPM-V-2")


def test_missing_keys_are_named(model, tmp_path):
    folder = save_checkpoint(model, tmp_path / "ckpt")
    config = MiniCPMVConfig.from_pretrained(folder)
    config.num_hidden_layers = 3
    with pytest.raises(CheckpointError, match=r"missing keys.*llm.model.layers.2"):
        check_checkpoint(folder, config)


def test_gradient_checkpointing_gives_same_loss_and_grads():
    torch.manual_seed(0)
    model = MiniCPMV(small_config()).train()
    plain_loss, plain = loss_and_grads(model)
    model.gradient_checkpointing_enable()
    assert model.vpm.grad_checkpointing
    ckpt_loss, ckpt = loss_and_grads(model)
    torch.testing.assert_close(plain_loss, ckpt_loss)
    assert plain.keys() == ckpt.keys()
    for name in plain:
        torch.testing.assert_close(plain[name], ckpt[name], rtol=1e-4, atol=1e-6, msg=name)


def test_text_only_training_batch_gives_every_parameter_a_gradient():
    torch.manual_seed(0)
    model = MiniCPMV(small_config()).train()
    ids = torch.randint(3, 290, (2, 12))
    model(ids, labels=ids).loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert no_grad == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_forward_runs_in_each_dtype(dtype):
    torch.manual_seed(0)
    model = MiniCPMV(small_config()).to(dtype).eval()
    ids, pixels, bounds, labels = batch()
    out = model(ids, pixel_values=pixels, image_bound=bounds, labels=labels)
    assert torch.isfinite(out.loss)


def test_cached_generation_equals_uncached_with_left_padding(model):
    ids, pixels, bounds, _ = batch()
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # row 1 is left padded by 3
    settings = GenerationSettings(max_new_tokens=6)
    cached = generate(model, ids, mask, pixels, bounds, settings)
    uncached = generate(model, ids, mask, pixels, bounds, settings, use_cache=False)
    assert torch.equal(cached, uncached)
    alone = generate(model, ids[1:, 3:], None, pixels[1:], [bounds[1] - 3], settings)
    assert torch.equal(alone[0], cached[1])


def test_sampling_is_reproducible_with_a_seeded_generator(model):
    ids, pixels, bounds, _ = batch()
    settings = GenerationSettings(
        max_new_tokens=5, do_sample=True, temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.1
    )
    a = generate(model, ids, None, pixels, bounds, settings, generator=torch.Generator().manual_seed(3))
    b = generate(model, ids, None, pixels, bounds, settings, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_generation_stops_at_eos_and_pads_finished_rows(model):
    ids, pixels, bounds, _ = batch()
    settings = GenerationSettings(max_new_tokens=4)
    first = generate(model, ids, None, pixels, bounds, settings)
    eos = int(first[0, 0])
    out = generate(model, ids, None, pixels, bounds, settings, eos_token_id=eos, pad_token_id=0)
    assert int(out[0, 0]) == eos
    assert (out[0, 1:] == 0).all()


def test_sincos_layout_puts_columns_in_first_half():
    table = sincos_2d(8, 2, 3)  # 2 rows x 3 columns, row-major
    # Moving one column changes the first half; moving one row changes the second half only.
    assert not (table[1, :4] == table[0, :4]).all()
    assert (table[1, 4:] == table[0, 4:]).all()
    assert (table[3, :4] == table[0, :4]).all()
    assert table.dtype.name == "float32"


def test_static_shape_decoding_equals_growing_cache(model):
    ids, pixels, bounds, _ = batch()
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    settings = GenerationSettings(max_new_tokens=7)
    growing = generate(model, ids, mask, pixels, bounds, settings, static=False)
    static = generate(model, ids, mask, pixels, bounds, settings, static=True, cuda_graph=False)
    assert torch.equal(growing, static)


def test_static_decoding_that_checks_for_the_end_every_few_steps_stops_where_the_growing_cache_does(model):
    # the static decode asks whether every row has ended only every FINISH_CHECK_EVERY steps; what it runs
    # past the last end is cut, so the answer (and its length) is the growing cache's
    from pipeline.families.minicpm_v2.generation import FINISH_CHECK_EVERY

    ids, pixels, bounds, _ = batch()
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    n = 3 * FINISH_CHECK_EVERY
    free = generate(model, ids, mask, pixels, bounds, GenerationSettings(max_new_tokens=n), static=False)
    ends = [int(free[0, 1]), int(free[1, 2])]  # row 0 ends by its 2nd token, row 1 by its 3rd
    settings = GenerationSettings(max_new_tokens=n)
    growing = generate(model, ids, mask, pixels, bounds, settings, eos_token_id=ends, static=False)
    static = generate(
        model, ids, mask, pixels, bounds, settings, eos_token_id=ends, static=True, cuda_graph=False
    )
    assert torch.equal(growing, static)
    assert static.shape[1] <= 3 < FINISH_CHECK_EVERY


def test_one_static_decoder_serves_the_batches_that_fit_it(model):
    """The static decoder (cache, inputs, on CUDA its graph) is kept for the next batch of at most its rows
    and cache length: other batches, with other padding, a shorter prompt or fewer rows (a file's last batch,
    a server's smaller batch), answer as the growing cache; a batch that does not fit grows it."""
    from pipeline.families.minicpm_v2.generation import HELD

    settings = GenerationSettings(max_new_tokens=5)
    decoders = []
    for seed, cut, padded, rows in ((0, 0, 2, 1), (1, 0, 3, 2), (2, 1, 0, 2), (3, 0, 0, 1), (4, 0, 4, 1)):
        ids, pixels, bounds, _ = batch(seed)
        ids = ids[:rows, : ids.shape[1] - cut]  # a shorter prompt, within the same rounded cache length
        pixels, bounds = pixels[:rows], bounds[:rows]
        mask = torch.ones_like(ids)
        mask[seed % rows, :padded] = 0
        if seed == 0:
            HELD.pop(model, None)  # from no decoder: the first is of one row
        growing = generate(model, ids, mask, pixels, bounds, settings, static=False)
        static = generate(model, ids, mask, pixels, bounds, settings, static=True, cuda_graph=False)
        assert torch.equal(growing, static)
        decoders.append(HELD[model])
    assert decoders[0].cache.keys[0].shape[0] == 1
    assert all(d is decoders[1] for d in decoders[1:])  # grown once, for two rows, then kept
    ids, pixels, bounds, _ = batch(5)
    longer = GenerationSettings(max_new_tokens=100)  # past the held cache's length: a larger decoder
    growing = generate(model, ids[:1], None, pixels[:1], bounds[:1], longer, static=False)
    static = generate(model, ids[:1], None, pixels[:1], bounds[:1], longer, static=True, cuda_graph=False)
    assert torch.equal(growing, static)
    grown = HELD[model]
    assert grown is not decoders[1]
    assert grown.cache.keys[0].shape[0] == 2  # it keeps the rows of the one it replaced
    assert grown.cache.max_length > decoders[1].cache.max_length


def test_right_padding_changes_nothing_for_the_real_tokens(model):
    ids, pixels, bounds, labels = batch()
    padded = torch.cat([ids, torch.zeros(2, 5, dtype=torch.long)], dim=1)
    padded_labels = torch.cat([labels, torch.full((2, 5), IGNORE_INDEX)], dim=1)
    mask = torch.cat([torch.ones_like(ids), torch.zeros(2, 5, dtype=torch.long)], dim=1)
    plain = model(ids, pixel_values=pixels, image_bound=bounds, labels=labels, return_logits=True)
    pad = model(
        padded,
        attention_mask=mask,
        pixel_values=pixels,
        image_bound=bounds,
        labels=padded_labels,
        return_logits=True,
    )
    torch.testing.assert_close(pad.logits[:, : ids.shape[1]], plain.logits)
    torch.testing.assert_close(pad.loss, plain.loss)


def test_compiled_layers_give_the_same_loss_and_gradients():
    torch.manual_seed(0)
    model = MiniCPMV(small_config()).train()
    model.gradient_checkpointing_enable()
    ids, pixels, bounds, labels = batch()
    eager_loss, eager = loss_and_grads(model)
    keys = set(model.state_dict())
    torch._dynamo.reset()
    model.compile_blocks()
    compiled_loss, compiled = loss_and_grads(model)
    # the checkpointed layers traced whole (a break there ran them eager, under dynamic shapes)
    assert not torch._dynamo.utils.counters["graph_break"], list(torch._dynamo.utils.counters["graph_break"])
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-6)
    for name in eager:
        torch.testing.assert_close(compiled[name], eager[name], rtol=1e-3, atol=1e-5, msg=name)
    assert set(model.state_dict()) == keys  # compiling adds no checkpoint keys
    model.gradient_checkpointing_disable()
    torch.testing.assert_close(
        model(ids, pixel_values=pixels, image_bound=bounds, labels=labels).loss,
        eager_loss,
        rtol=1e-5,
        atol=1e-6,
    )  # compiled layers without checkpointing
    model.eval()
    with torch.no_grad():  # evaluation runs the plain layers
        torch.testing.assert_close(
            model(ids, pixel_values=pixels, image_bound=bounds, labels=labels).loss,
            eager_loss,
            rtol=1e-5,
            atol=1e-6,
        )


def test_vision_features_go_through_the_tower_call_without_a_head(model):
    # sharding engines gather weights in module hooks, which only the module call fires
    pixels = torch.randn(2, 3, 112, 112)
    calls = []
    handle = model.vpm.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape))
    try:
        feats = vision_tower_features(model.vpm, pixels)
    finally:
        handle.remove()
    assert calls == [pixels.shape]
    assert torch.equal(feats, model.vpm.forward_features(pixels))
