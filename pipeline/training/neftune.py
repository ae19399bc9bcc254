"""NEFTune (trainer.neftune_noise_alpha): uniform noise on the text embeddings while training.

Each token's embedding gets noise drawn uniformly from [-s, s] in every dimension, s = alpha / sqrt(L x d),
d the hidden size and L the length of the sample the token belongs to: each row's own tokens in a padded
batch (transformers' NEFTune takes the padded length), each sample's in a packed row, so that packing does not
change the noise. Padding gets none, and so does anything outside training (evaluation, generation).

The loop says which sample lengths the next forward has (`lengths`, from Family.token_sample_lengths); the
hook on the model's input embeddings adds the noise to their output.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


class EmbeddingNoise:
    """NEFTune's noise on `embeddings` (the model's input embedding module) at `alpha`."""

    def __init__(self, embeddings: nn.Module, alpha: float) -> None:
        if alpha <= 0:
            raise ValueError(f"trainer.neftune_noise_alpha={alpha}: the noise needs an alpha > 0")
        self.alpha = float(alpha)
        self._lengths: torch.Tensor | None = None
        self._handle = embeddings.register_forward_hook(self._add)

    @contextlib.contextmanager
    def lengths(self, lengths: torch.Tensor) -> Iterator[None]:
        """Within: the embeddings of a batch whose tokens belong to samples of `lengths` [B, T] (0 on
        padding) get the noise."""
        self._lengths = lengths
        try:
            yield
        finally:
            self._lengths = None

    def _add(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        lengths = self._lengths
        if lengths is None or not module.training:
            return None
        if tuple(lengths.shape) != tuple(output.shape[:-1]):
            raise RuntimeError(
                f"NEFTune (trainer.neftune_noise_alpha): the embeddings are {tuple(output.shape)} for sample "
                f"lengths of {tuple(lengths.shape)}"
            )
        length = lengths.to(device=output.device, dtype=torch.float32)
        bound = torch.where(length > 0, self.alpha / (length.clamp(min=1) * output.shape[-1]).sqrt(), 0.0)
        noise = torch.empty_like(output).uniform_(-1.0, 1.0)
        return output + noise * bound.unsqueeze(-1).to(output.dtype)

    def remove(self) -> None:
        """Takes the hook off the embeddings."""
        self._handle.remove()
