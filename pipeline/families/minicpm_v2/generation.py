"""Text generation for MiniCPM-V-2 from input embeddings: greedy or sampled, batched with left padding.

A preallocated KV cache holds the prompt (text and image queries) after one prefill; each step then feeds
one token per row. `use_cache=False` recomputes the whole sequence each step (the reference the cached
path is tested against).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence

import torch

from pipeline.families.generation_settings import GenerationSettings
from pipeline.families.sampling import next_tokens

from .kv_cache import KVCache
from .modeling import MiniCPMV, positions_and_mask

__all__ = ["GenerationSettings", "generate", "next_tokens"]


class StaticDecoder:
    """One decode step with fixed shapes over a preallocated cache, optionally replayed as a CUDA graph.

    The step attends over the whole cache buffer with a mask that admits the prompt's real tokens and the
    tokens generated so far, so no shape changes from step to step; on CUDA the step is captured once and
    replayed, which removes the per-kernel launch cost that dominates decoding at small batch sizes.

    A decoder (its cache, its input tensors and its graph) serves every batch of at most its rows and cache
    length: `held` keeps the model's last one (in HELD, which holds no model alive), and `start` points it at
    the next batch's prompt, so a file of batches captures one graph, not one a batch, and a smaller last
    batch or a server's batches of every size replay it too. Rows past a batch's decode throwaway tokens over
    a one-slot mask; the cache's slots past a prompt keep the previous batch's keys until overwritten, and the
    mask never admits them.
    """

    def __init__(self, model: MiniCPMV, cache: KVCache, use_graph: bool) -> None:
        b, device = cache.keys[0].shape[0], cache.keys[0].device
        self.model = weakref.proxy(model)
        self.cache = cache
        self.use_graph = use_graph
        self.rows = b  # the current batch's rows (the first of the decoder's)
        self.cur = 0  # next cache slot to write
        # each row's next slot to write, as the graph reads it
        self.index = torch.zeros(b, dtype=torch.long, device=device)
        self.mask = torch.zeros(b, 1, 1, cache.max_length, dtype=torch.bool, device=device)
        self.pos = torch.zeros(b, 1, dtype=torch.long, device=device)  # next position id per row
        self.tok = torch.zeros(b, 1, dtype=torch.long, device=device)
        self.graph = None
        self.out = None

    def fits(self, rows: int, length: int, dtype: torch.dtype, device: torch.device, use_graph: bool) -> bool:
        """Returns whether a batch of `rows` rows over `length` cache slots can run on this decoder."""
        keys = self.cache.keys[0]
        return (
            rows <= keys.shape[0]
            and length <= self.cache.max_length
            and (keys.dtype, keys.device, self.use_graph) == (dtype, device, use_graph)
        )

    @classmethod
    def held(
        cls,
        model: MiniCPMV,
        rows: int,
        length: int,
        dtype: torch.dtype,
        device: torch.device,
        use_graph: bool,
    ) -> StaticDecoder:
        """Returns a decoder for `rows` rows over a cache of at least `length` slots, its cache emptied for a
        prefill: the model's last one where the batch fits it, else a new one (which replaces it) large enough
        for both, so that a server's decoder grows to its largest batch and then stays."""
        held = HELD.get(model)
        if held is None or not held.fits(rows, length, dtype, device, use_graph):
            rows = 1 << (rows - 1).bit_length()  # a power of two: a server's batch sizes share few graphs
            if held is not None and held.fits(1, 1, dtype, device, use_graph):  # grown, not replaced
                rows = max(rows, held.cache.keys[0].shape[0])
                length = max(length, held.cache.max_length)
            HELD.pop(model, None)  # the old cache and graph go before the new ones are allocated
            held = None
            cfg = model.config
            cache = KVCache(
                cfg.num_hidden_layers, rows, cfg.num_key_value_heads, length, cfg.head_dim, dtype, device
            )
            held = cls(model, cache, use_graph)
            HELD[model] = held
        held.cache.static_index = None
        held.cache.length = 0
        return held

    def start(self, prompt_mask: torch.Tensor) -> None:
        """Points the decoder at a batch whose prompts [B, T] (left-padded) the cache's first B rows hold after
        prefill; captures the graph on the first batch."""
        self._point_at(prompt_mask)
        if self.use_graph and self.graph is None:
            self._capture()
            self._point_at(prompt_mask)  # the warm-up steps moved the slot, the mask and the positions

    def _point_at(self, prompt_mask: torch.Tensor) -> None:
        b, t = prompt_mask.shape
        self.rows = b
        self.cur = t
        self.index.fill_(t)
        self.cache.static_index = self.index
        self.mask.zero_()
        self.mask[:b, 0, 0, :t] = prompt_mask.bool()
        self.mask[b:, 0, 0, 0] = True  # rows past the batch: any finite attention, never read
        self.pos.zero_()
        self.pos[:b] = prompt_mask.long().sum(-1, keepdim=True)

    def _forward(self) -> torch.Tensor:
        # One step, all on the device (so that the graph holds it whole): admit the slot `index` in the mask,
        # write the token's keys there, then advance the slot and the positions.
        # A row's slot stops at the last one (rows no request holds run on; they never reach it otherwise).
        llm = self.model.llm
        self.mask.scatter_(3, self.index.view(-1, 1, 1, 1), True)
        embeds = llm.model.embed_tokens(self.tok) * self.model.config.scale_emb
        hidden = llm.model(embeds, self.pos, self.mask, self.cache)
        logits = llm.logits(hidden[:, -1])
        self.index.add_(1).clamp_(max=self.cache.max_length - 1)
        self.pos += 1
        return logits

    def capture_empty(self) -> None:
        """Captures the graph (once) before any row is placed: the warm-up steps write only slot 0."""
        if self.use_graph and self.graph is None:
            self._point_at(torch.ones(self.mask.shape[0], 1, dtype=torch.long, device=self.mask.device))
            self._capture()

    def place(self, slots: list[int], prefilled: KVCache, prompt_mask: torch.Tensor) -> None:
        """Puts prompts prefilled alone (`prefilled`: their cache, [n] rows of T slots; `prompt_mask` [n, T],
        left-padded) into the rows `slots`, at slots 0..T-1 as a batch of their own would hold them; each
        row then decodes from its own slot and position."""
        t = prompt_mask.shape[1]
        rows = torch.tensor(slots, dtype=torch.long, device=self.mask.device)
        for layer, (keys, values) in enumerate(zip(self.cache.keys, self.cache.values, strict=True)):
            keys[rows, :, :t] = prefilled.keys[layer][:, :, :t]
            values[rows, :, :t] = prefilled.values[layer][:, :, :t]
        mask = torch.zeros(len(slots), self.cache.max_length, dtype=torch.bool, device=self.mask.device)
        mask[:, :t] = prompt_mask.bool()
        self.mask[rows, 0, 0] = mask
        self.pos[rows] = prompt_mask.long().sum(-1, keepdim=True)
        self.index[rows] = t
        self.cache.static_index = self.index

    def take_rows(self, old: StaticDecoder) -> None:
        """Copies every row of a smaller decoder (cache, mask, slot, position, token) into this one's first."""
        b, length = old.mask.shape[0], old.cache.max_length
        for new_k, new_v, k, v in zip(
            self.cache.keys, self.cache.values, old.cache.keys, old.cache.values, strict=True
        ):
            new_k[:b, :, :length] = k
            new_v[:b, :, :length] = v
        self.mask[:b, :, :, :length] = old.mask
        self.index[:b] = old.index
        self.pos[:b] = old.pos
        self.tok[:b] = old.tok
        self.cache.static_index = self.index

    def replay(self) -> torch.Tensor:
        """Returns fp32 logits [rows, V] of one step of every row (each its token in `tok`)."""
        if self.graph is not None:
            self.graph.replay()
            return self.out
        return self._forward()

    def _capture(self) -> None:
        # Warm-up writes land in the slots the first real steps overwrite, and are masked until then.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._forward()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = self._forward()

    def step(self, tok: torch.Tensor) -> torch.Tensor:
        """Returns fp32 logits [B, V] for feeding `tok` [B] at the next slot."""
        if self.cur >= self.cache.max_length:
            raise RuntimeError(f"KV cache overflow: slot {self.cur} >= max_length {self.cache.max_length}")
        self.tok[: self.rows].copy_(tok[:, None])
        if self.graph is not None:
            self.graph.replay()
            logits = self.out
        else:
            logits = self._forward()
        self.cur += 1
        return logits[: self.rows]


# each model's last decoder (StaticDecoder.held)
HELD: weakref.WeakKeyDictionary[MiniCPMV, StaticDecoder] = weakref.WeakKeyDictionary()

# a static cache's length is the prompt's plus the tokens to generate, rounded up to this: batches of nearby
# prompt lengths share one decoder (one CUDA graph)
STATIC_LENGTH_MULTIPLE = 64
# the static decode asks whether every row has ended only every this many steps: each question waits for the
# device, which otherwise runs ahead of the host (steps past the end write pads and are cut off the result)
FINISH_CHECK_EVERY = 8


@torch.no_grad()
def generate(
    model: MiniCPMV,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    pixel_values: list[list[torch.Tensor]] | None = None,
    image_bound: list[torch.Tensor] | None = None,
    settings: GenerationSettings | None = None,
    eos_token_id: int | list[int] = 2,
    pad_token_id: int = 0,
    on_step: Callable[[torch.Tensor], None] | None = None,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    use_cache: bool = True,
    static: bool | None = None,
    cuda_graph: bool | None = None,
) -> torch.Tensor:
    """Returns the new tokens [B, n] (rows that ended early are filled with pad_token_id after their eos).

    `on_step` receives each step's tokens [B] as soon as they are chosen (for streaming). `generator` may be
    a list with one generator per row, so that a row samples the same alone or in a batch. `static` decodes
    with fixed shapes (default: on CUDA), `cuda_graph` replays that step as a CUDA graph (default: on CUDA).
    """
    settings = settings or GenerationSettings()
    device = model.llm.lm_head.weight.device
    on_cuda = device.type == "cuda"
    static = on_cuda if static is None else static
    cuda_graph = (on_cuda and static) if cuda_graph is None else cuda_graph
    input_ids = input_ids.to(device)
    b, t = input_ids.shape
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device)
    eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id), device=device)
    embed_scale = model.config.scale_emb
    embeds = model.embed(input_ids, pixel_values, image_bound)
    dtype = embeds.dtype
    cache = decoder = None
    if use_cache and static and settings.max_new_tokens > 1:
        length = -(-(t + settings.max_new_tokens) // STATIC_LENGTH_MULTIPLE) * STATIC_LENGTH_MULTIPLE
        decoder = StaticDecoder.held(model, b, length, dtype, device, cuda_graph)
        cache = decoder.cache
        cache.rows = b
    elif use_cache:
        cfg = model.config
        cache = KVCache(
            cfg.num_hidden_layers,
            b,
            cfg.num_key_value_heads,
            t + settings.max_new_tokens,
            cfg.head_dim,
            dtype,
            device,
        )
    n_max = settings.max_new_tokens
    out = torch.full((b, n_max), pad_token_id, dtype=torch.long, device=device)
    finished = torch.zeros(b, dtype=torch.bool, device=device)
    check_every = FINISH_CHECK_EVERY if decoder is not None and on_step is None else 1
    steps = 0
    # Prefill (and every step without a cache or without static shapes) goes through the plain forward.
    pos, attn = positions_and_mask(mask, t, dtype)
    hidden = model.llm.model(embeds, pos.to(device), attn, cache)
    logits = model.llm.logits(hidden[:, -1])
    if decoder is not None:
        decoder.start(mask)
    past = t
    for step in range(n_max):
        tok = next_tokens(logits, out[:, :step], settings, generator)
        tok = torch.where(finished, torch.full_like(tok, pad_token_id), tok)
        out[:, step] = tok
        steps = step + 1
        if on_step is not None:
            on_step(tok)
        finished = finished | torch.isin(tok, eos)
        if step == n_max - 1 or ((step + 1) % check_every == 0 and bool(finished.all())):
            break
        if decoder is not None:
            logits = decoder.step(tok)
            continue
        mask = torch.cat([mask, torch.ones(b, 1, dtype=mask.dtype, device=device)], dim=1)
        new_embeds = model.llm.model.embed_tokens(tok[:, None]) * embed_scale
        if use_cache:
            step_embeds = new_embeds
        else:
            embeds = torch.cat([embeds, new_embeds], dim=1)
            step_embeds, past = embeds, 0
        pos, attn = positions_and_mask(mask, step_embeds.shape[1], dtype, past=past)
        hidden = model.llm.model(step_embeds, pos.to(device), attn, cache)
        logits = model.llm.logits(hidden[:, -1])
        if use_cache:
            past = cache.length
    return _through_last_end(out[:, :steps], eos)


def _through_last_end(generated: torch.Tensor, eos: torch.Tensor) -> torch.Tensor:
    """Returns `generated` [B, n] up to the step at which its last row ended (its first end id), or whole
    where a row never ended: the steps a decode ran past that are pads only."""
    ended = torch.isin(generated, eos)
    if generated.shape[1] == 0 or not bool(ended.any(1).all()):
        return generated
    return generated[:, : int(ended.int().argmax(1).max()) + 1]
