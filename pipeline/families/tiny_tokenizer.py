"""An offline byte-level BPE tokenizer for the tiny twins of HF-native families.

Trained with the `tokenizers` library on the built-in corpus the MiniCPM-V-2 twin also uses, with a
pre-tokenizer that splits like the Qwen2 family's (letters, digits one by one, punctuation, newlines), and
the family's special tokens added as atomic tokens after the learned vocabulary.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from pipeline.families.tiny_corpus import tiny_corpus

# The Qwen2 pre-tokenizer's split rule (a published fact of that tokenizer's format).
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def train_bpe_tokenizer(
    special_tokens: Mapping[str, str],
    extra_special_tokens: Mapping[str, str],
    additional_tokens: Sequence[str] = (),
    vocab_size: int = 512,
    chat_template: str | None = None,
) -> PreTrainedTokenizerFast:
    """Returns a fast tokenizer trained offline, with `special_tokens` (bos/eos/pad/unk roles) and
    `extra_special_tokens` (named roles such as image_token) registered as in the family's own config."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(tiny_corpus(), trainer=trainer)
    specials = list(
        dict.fromkeys([*special_tokens.values(), *extra_special_tokens.values(), *additional_tokens])
    )
    tokenizer.add_special_tokens(specials)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        extra_special_tokens=dict(extra_special_tokens),
        **special_tokens,
    )
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast
