"""MiniCPM-V-2 as a transformers PreTrainedModel: vision tower + resampler + MiniCPM LLM.

Module names follow the official checkpoint (`llm.*`, `vpm.*`, `resampler.*`), so `from_pretrained` reads
the official folder and `save_pretrained` writes the same keys.

Batch format (see pipeline/families/minicpm_v2/collate.py): `input_ids` [B, T]; `attention_mask` [B, T] or None;
`pixel_values` a list (per sample) of lists of [3, H, W] tensors; `image_bound` a list (per sample) of
[n, 2] tensors with [start, end) of each image's placeholder run. Images of equal size go through the vision
tower and the resampler together, which equals the original one-image-at-a-time loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from pipeline.families import chunked_loss
from pipeline.families.base import IGNORE_INDEX
from pipeline.families.sharding import gathers_weights, most_over_ranks

from .configuration import MiniCPMVConfig
from .llm import MiniCPMForCausalLM, MiniCPMRMSNorm
from .resampler import Resampler
from .vision import build_vision_tower, patch_grid, vision_tower_features

# Rows of supervised positions whose logits are materialised at once (bounds the fp32 logits' memory).
LOSS_CHUNK_ROWS = 4096


@dataclass
class MiniCPMVOutput:
    loss: torch.Tensor | None = None  # mean cross-entropy over supervised tokens
    loss_sum: torch.Tensor | None = None  # summed cross-entropy (for exact averaging over accumulation)
    num_tokens: torch.Tensor | None = None  # supervised tokens in the batch
    num_correct: torch.Tensor | None = None  # supervised tokens predicted right by argmax
    logits: torch.Tensor | None = None  # fp32 [B, T, V], only when asked for
    # each sample's summed cross-entropy and supervised tokens [samples], only when asked for (sample_sums)
    sample_loss_sum: torch.Tensor | None = None
    sample_tokens: torch.Tensor | None = None
    # one [query_num, hidden] tensor per image of the batch, in order (what the vision tower and resampler
    # made of them); None without images
    image_queries: list[torch.Tensor] | None = None


class MiniCPMV(PreTrainedModel):
    config_class = MiniCPMVConfig
    base_model_prefix = "minicpmv"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _no_split_modules = ["MiniCPMDecoderLayer", "Block"]

    def __init__(self, config: MiniCPMVConfig) -> None:
        super().__init__(config)
        self.llm = MiniCPMForCausalLM(config)
        self.vpm = build_vision_tower(config)
        self.resampler = Resampler(
            num_queries=config.query_num,
            embed_dim=config.hidden_size,
            num_heads=config.resampler_num_heads,
            kv_dim=self.vpm.embed_dim,
        )
        self.post_init()

    # ----- initialisation (random weights: the tiny twin and benchmarks; a checkpoint overwrites them)
    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            module.weight.normal_(mean=0.0, std=std)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            module.weight.fill_(1.0)
            module.bias.zero_()
        elif isinstance(module, MiniCPMRMSNorm):
            module.weight.fill_(1.0)
        elif isinstance(module, nn.MultiheadAttention):
            module.in_proj_weight.normal_(mean=0.0, std=std)
            module.in_proj_bias.zero_()
        elif isinstance(module, Resampler):
            module.query.normal_(mean=0.0, std=0.02)
            module.proj.normal_(mean=0.0, std=module.embed_dim**-0.5)
            module.reset_query_pos_embed()
        elif module is self.vpm:
            module.pos_embed.normal_(mean=0.0, std=0.02)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.llm.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.llm.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.llm.lm_head

    # ----- gradient checkpointing in the LLM and the vision tower
    def gradient_checkpointing_enable(
        self, gradient_checkpointing_kwargs: dict | None = None, llm_layers: int | None = None
    ) -> None:
        """Checkpoints the vision tower's blocks and the first `llm_layers` of the LLM's decoder layers (None:
        all of them)."""
        self.llm.model.gradient_checkpointing = True
        layers = len(self.llm.model.layers)
        self.llm.model.checkpointed_layers = layers if llm_layers is None else min(llm_layers, layers)
        self.vpm.set_grad_checkpointing(True)

    def vision_checkpointing_enable(self) -> None:
        """Checkpoints the vision tower's blocks only (model.gradient_checkpointing=vision)."""
        self.llm.model.gradient_checkpointing = False
        self.vpm.set_grad_checkpointing(True)

    def gradient_checkpointing_disable(self) -> None:
        self.llm.model.gradient_checkpointing = False
        self.vpm.set_grad_checkpointing(False)

    def compile_blocks(self, mode: str | None = None) -> None:
        """Compiles every LLM decoder layer and vision block in place with torch.compile (GPU speed-up).

        Block by block rather than the whole model: shapes vary with each batch's length and image count,
        and per-block graphs stay valid under gradient checkpointing and PEFT's injected LoRA layers.
        """
        self.llm.model.compile_layers(mode)
        for block in self.vpm.blocks:
            # No CUDA graphs here: timm's checkpointed block sequence reuses outputs across replays.
            block.compile(dynamic=True)

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.llm.model.gradient_checkpointing

    # ----- vision
    def encode_images(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        """Returns one [query_num, hidden] tensor per [3, H, W] image, in input order. A tensor given more than
        once (a preference pair's images, shared by its two answers) goes through the tower once."""
        dtype = self.vpm.pos_embed.dtype
        device = self.vpm.pos_embed.device
        first: dict[int, int] = {}  # id(tensor) -> its first index
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, img in enumerate(images):
            if first.setdefault(id(img), i) == i:
                by_size.setdefault(tuple(img.shape[-2:]), []).append(i)
        out: list[torch.Tensor | None] = [None] * len(images)
        patch = self.vpm.patch_embed.patch_size[0]
        for idx in by_size.values():
            # to the device one by one (asynchronous from pinned memory), then stacked and cast there
            pixels = torch.stack([images[i].to(device, non_blocking=True) for i in idx]).to(dtype)
            feats = vision_tower_features(self.vpm, pixels)
            queries = self.resampler(feats, patch_grid(pixels, patch))
            for j, i in enumerate(idx):
                out[i] = queries[j]
        return [out[first[id(img)]] for img in images]  # type: ignore[misc]

    def _dummy_vision_term(self, like: torch.Tensor) -> torch.Tensor:
        # A blank image through the vision path, added as 0 x its mean: no effect on the result, but the
        # tower's parameters take part (a gradient for each under DDP; their gathering under FSDP).
        blank = torch.zeros(3, 224, 224)
        return self.encode_images([blank])[0].mean().to(like.dtype) * 0.0

    def _blank_vision_passes(self, images: list[torch.Tensor]) -> int:
        """How many blank passes through the tower this batch needs besides its own images.

        One process (or DDP): one for a text-only training batch when the tower trains, so that every
        trainable parameter gets a gradient. FSDP or ZeRO-3 (the tower's weights are sharded): each pass
        gathers every block's shards collectively, so every process must make as many passes as the
        process with the most (one per distinct image size), in training and in evaluation alike, or the
        processes' collectives pair up wrongly. That count is agreed on with one all-reduce.
        """
        passes = len({tuple(img.shape[-2:]) for img in images})
        if gathers_weights(self.vpm.blocks[0]):
            return most_over_ranks(passes, self.llm.lm_head.weight.device) - passes
        trains_tower = any(p.requires_grad for p in self.vpm.parameters())
        return int(not images and self.training and torch.is_grad_enabled() and trains_tower)

    def embed(
        self,
        input_ids: torch.Tensor,
        pixel_values: list[list[torch.Tensor]] | None,
        image_bound: list[torch.Tensor] | None,
    ) -> torch.Tensor:
        """Returns input embeddings: scaled text embeddings with the (unscaled) image queries written in."""
        return self.embed_with_queries(input_ids, pixel_values, image_bound)[0]

    def embed_with_queries(
        self,
        input_ids: torch.Tensor,
        pixel_values: list[list[torch.Tensor]] | None,
        image_bound: list[torch.Tensor] | None,
        queries: list[torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """Returns the input embeddings (embed) and the images' queries (encode_images of pixel_values' images
        in order; None without images). `queries`: those of an earlier pass over the same images, written in
        without running the vision tower."""
        embeds = self.llm.model.embed_tokens(input_ids) * self.config.scale_emb
        flat = [img for sample in (pixel_values or []) for img in sample]
        for _ in range(self._blank_vision_passes([] if queries is not None else flat)):
            embeds = embeds + self._dummy_vision_term(embeds)
        if not flat:
            return embeds, None
        if queries is None:
            queries = self.encode_images(flat)
        elif len(queries) != len(flat):
            raise ValueError(f"{len(queries)} image queries given for {len(flat)} images")
        rows, cols, values = [], [], []
        k = 0
        q = self.config.query_num
        for b, sample in enumerate(pixel_values or []):
            bounds = image_bound[b] if image_bound is not None else None
            n_bounds = 0 if bounds is None else len(bounds)
            if n_bounds != len(sample):
                raise ValueError(
                    f"sample {b}: {len(sample)} image tensors but {n_bounds} image placeholders in the text"
                )
            for start, end in bounds.tolist() if bounds is not None else []:
                if end - start != q:
                    raise ValueError(f"sample {b}: image placeholder [{start}, {end}) is not {q} tokens long")
                rows.append(torch.full((q,), b, dtype=torch.long))
                cols.append(torch.arange(start, end))
                values.append(queries[k])
                k += 1
        if rows:
            index = (torch.cat(rows).to(embeds.device), torch.cat(cols).to(embeds.device))
            embeds = embeds.index_put(index, torch.cat(values).to(embeds.dtype))
        return embeds, queries

    # ----- training / scoring forward
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: list[list[torch.Tensor]] | None = None,
        image_bound: list[torch.Tensor] | None = None,
        labels: torch.Tensor | None = None,
        return_logits: bool = False,
        position_ids: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        sample_sums: bool = False,
        loss_chunking: str = "off",
        image_queries: list[torch.Tensor] | None = None,
        **_: object,
    ) -> MiniCPMVOutput:
        """Scores a right-padded batch, or a packed one (`segment_ids` and `position_ids` from
        collate_packed: attention stays within each sample); `sample_sums` adds each sample's summed loss;
        `loss_chunking`: model.chunked_loss (position_losses); `image_queries`: the images' queries from an
        earlier pass (MiniCPMVOutput.image_queries), in place of running the vision tower."""
        embeds, queries = self.embed_with_queries(input_ids, pixel_values, image_bound, image_queries)
        if segment_ids is not None:
            if position_ids is None:
                raise ValueError("a packed batch (segment_ids) needs its position_ids")
            attn_mask = packed_attention_mask(segment_ids.to(embeds.device))
        else:
            if attention_mask is not None and is_right_padded(attention_mask):
                # Causal attention already keeps real tokens from seeing right padding: the fused kernel.
                attention_mask = None
            position_ids, attn_mask = positions_and_mask(attention_mask, input_ids.shape[1], embeds.dtype)
        hidden = self.llm.model(embeds, position_ids.to(embeds.device), attn_mask)
        out = MiniCPMVOutput(image_queries=queries)
        if return_logits:
            out.logits = self.llm.logits(hidden)
        if labels is not None and sample_sums:
            owners = segment_ids if segment_ids is not None else torch.arange(len(labels))[:, None]
            out.sample_loss_sum, out.sample_tokens = self.sample_loss(
                hidden, labels, owners.expand_as(labels), loss_chunking
            )
        elif labels is not None:
            out.loss_sum, out.num_tokens, out.num_correct = self.lm_loss(hidden, labels, loss_chunking)
            out.loss = out.loss_sum / out.num_tokens.clamp(min=1)
        return out

    def sample_loss(
        self, hidden: torch.Tensor, labels: torch.Tensor, owners: torch.Tensor, chunking: str = "off"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns each sample's summed CE and supervised token count over shifted labels; `owners` [B, T]
        numbers the sample of every token (the row, or a packed row's segment). Logits as in lm_loss."""
        shift_labels = labels[:, 1:].to(hidden.device)
        keep = shift_labels != IGNORE_INDEX
        owner = owners[:, 1:].to(hidden.device)[keep]
        losses, _, connected = self.position_losses(hidden[:, :-1][keep], shift_labels[keep], chunking)
        samples = int(owners.max()) + 1 if owners.numel() else 0
        sums = hidden.new_zeros(samples, dtype=torch.float32).index_add(0, owner, losses) + connected
        tokens = torch.zeros(samples, device=hidden.device).index_add(
            0, owner, torch.ones_like(losses, dtype=torch.float)
        )
        return sums, tokens

    def lm_loss(
        self, hidden: torch.Tensor, labels: torch.Tensor, chunking: str = "off"
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (summed CE, supervised token count, correct count) over shifted labels.

        Logits are computed only at supervised positions and a slice of them at a time (position_losses),
        so the [B, T, vocab] fp32 tensor is never materialised.
        """
        shift_labels = labels[:, 1:].to(hidden.device)
        keep = shift_labels != IGNORE_INDEX
        losses, correct, connected = self.position_losses(hidden[:, :-1][keep], shift_labels[keep], chunking)
        return losses.sum() + connected, keep.sum(), correct

    def position_losses(
        self, h: torch.Tensor, y: torch.Tensor, chunking: str = "off"
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns the CE of each supervised position [N] (fp32; hidden states `h` [N, D], labels `y` [N]),
        the count of correct predictions and a zero that keeps the graph connected (to the hidden states
        when N is 0, and to the extra head calls of a sharded head) for the caller to add to its sum.

        model.chunked_loss (`chunking`, passed by the family; "off" when called directly): auto scores
        positions whose fp32 logits would exceed chunked_loss.LOGITS_BYTES a chunk at a time, each chunk
        recomputed in the backward, so one chunk's logits exist at a time; otherwise the logits are computed
        LOSS_CHUNK_ROWS positions at a time and each slice's kept for the backward (the same sums)."""
        zero = h.sum().float() * 0.0 if h.shape[0] == 0 else h.new_zeros((), dtype=torch.float32)
        vocab = self.llm.lm_head.out_features
        chunk = chunked_loss.chunk_positions(chunking, h.shape[0], vocab, gathers_weights(self.llm.lm_head))
        if chunk:
            losses, correct = chunked_loss.scored_in_chunks(self.llm.logits, h, y, chunk)
            return losses, correct, zero
        if gathers_weights(self.llm.lm_head):
            # ZeRO-3 gathers lm_head's weight in each call: every process makes as many calls as the one
            # with the most slices (the extra ones on no rows), so that the processes' gathering pairs up
            slices = -(-h.shape[0] // LOSS_CHUNK_ROWS)
            for _ in range(most_over_ranks(slices, h.device) - slices):
                zero = zero + self.llm.logits(h[:0]).sum() * 0.0
        losses, correct = [], torch.zeros((), dtype=torch.long, device=h.device)
        for start in range(0, h.shape[0], LOSS_CHUNK_ROWS):
            logits = self.llm.logits(h[start : start + LOSS_CHUNK_ROWS])
            target = y[start : start + LOSS_CHUNK_ROWS]
            losses.append(F.cross_entropy(logits, target, reduction="none"))
            correct = correct + (logits.argmax(-1) == target).sum()
        return (torch.cat(losses) if losses else h.new_zeros(0, dtype=torch.float32)), correct, zero


def packed_attention_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """Returns the SDPA boolean mask [B, 1, T, T] of packed rows: causal, and within the query's segment
    (tail padding, segment -1, attends to padding only, so no row of the mask is empty)."""
    t = segment_ids.shape[-1]
    causal = torch.ones(t, t, dtype=torch.bool, device=segment_ids.device).tril()
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return (same & causal)[:, None]


def is_right_padded(attention_mask: torch.Tensor) -> bool:
    """Returns True when every row is real tokens followed only by padding (no padding on the left)."""
    return bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all())


def positions_and_mask(
    attention_mask: torch.Tensor | None, length: int, dtype: torch.dtype, past: int = 0
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Returns position ids [B, T] and an SDPA boolean mask [B, 1, T, past+T] (None when no padding).

    Right padding needs no mask (causal attention never looks right, and padded labels are ignored);
    left padding (batched generation) shifts positions so that every row's first real token is 0.
    """
    if attention_mask is None or bool(attention_mask[:, : past + length].all()):
        pos = torch.arange(past, past + length).unsqueeze(0)
        if attention_mask is not None:
            pos = pos.expand(attention_mask.shape[0], -1)
        return pos, None
    mask = attention_mask[:, : past + length].bool()
    pos_all = (mask.long().cumsum(-1) - 1).clamp(min=0)
    pos = pos_all[:, past : past + length]
    total = past + length
    causal = torch.ones(length, total, dtype=torch.bool, device=mask.device).tril(diagonal=past)
    attn = causal[None, None] & mask[:, None, None, :]
    # A padding query sees only padding keys, which would give NaN: let every query also see itself.
    eye = torch.zeros(length, total, dtype=torch.bool, device=mask.device)
    eye[torch.arange(length), torch.arange(past, total)] = True
    attn = attn | eye[None, None]
    return pos, attn
