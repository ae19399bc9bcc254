"""The MiniCPM-V-2 tokenizer: a thin, exact wrapper around the checkpoint's sentencepiece model.

Encoding rule. Text is split on the special-token strings (``<unk>``, ``<s>``, ``</s>``, ``<image>`` ...
``</slice>``) and on the chat markers ``<用户>`` and ``<AI>``; every plain chunk in between is encoded by
sentencepiece exactly as it would encode a fresh text. This is what the checkpoint's legacy Llama tokenizer
does around its added tokens, and what the official fine-tuning code does when it encodes the role
marker and each message separately. If the sentencepiece model adds a dummy-prefix "▁", every chunk gets
one, and decoding strips it per chunk again, so ``decode(encode(x)) == x`` holds either way.

Chat markers. In the official ``tokenizer.model`` the strings ``<用户>`` and ``<AI>`` are NOT single pieces:
sentencepiece splits them into three ordinary pieces each (``<`` ``用户`` ``>``), and the model was trained
on those ids. ``user_ids`` / ``ai_ids`` therefore hold whatever ids the marker string encodes to: one id
when the model has the marker as a piece (as the tiny test tokenizer does), several otherwise.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import sentencepiece as spm

from pipeline.families.tiny_corpus import tiny_corpus
from pipeline.utils.io import atomic_write_bytes, atomic_write_json

TOKENIZER_MODEL = "tokenizer.model"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"

# The checkpoint's special tokens and their ids (tokenizer_config.json "added_tokens_decoder").
SPECIAL_TOKENS: dict[str, int] = {
    "<unk>": 0,
    "<s>": 1,
    "</s>": 2,
    "<image>": 101,
    "</image>": 102,
    "<ref>": 103,
    "</ref>": 104,
    "<box>": 105,
    "</box>": 106,
    "<quad>": 107,
    "</quad>": 108,
    "<point>": 109,
    "</point>": 110,
    "<slice>": 111,
    "</slice>": 112,
}
ADDITIONAL_SPECIAL_TOKENS = [t for t in SPECIAL_TOKENS if t not in ("<unk>", "<s>", "</s>")]
USER_MARKER = "<用户>"
AI_MARKER = "<AI>"


def _token_entry(content: str) -> dict[str, object]:
    """Returns the official added-token record for ``content``."""
    return {
        "content": content,
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
        "special": True,
    }


def official_tokenizer_config() -> dict[str, object]:
    """Returns tokenizer_config.json's content in the format the official MiniCPM-V-2 checkpoint ships."""
    return {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": {str(i): _token_entry(t) for t, i in SPECIAL_TOKENS.items()},
        "additional_special_tokens": list(ADDITIONAL_SPECIAL_TOKENS),
        "auto_map": {"AutoTokenizer": ["modeling_minicpmv.LlamaTokenizerWrapper", None]},
        "bos_token": "<s>",
        "clean_up_tokenization_spaces": False,
        "eos_token": "</s>",
        "legacy": True,
        "model_max_length": 2048,
        "pad_token": "<unk>",
        "padding_side": "right",
        "sp_model_kwargs": {},
        "spaces_between_special_tokens": False,
        "tokenizer_class": "LlamaTokenizerWrapper",
        "truncation_side": "right",
        "unk_token": "<unk>",
        "use_default_system_prompt": False,
    }


def official_special_tokens_map() -> dict[str, object]:
    """Returns special_tokens_map.json's content in the Hugging Face Llama format."""

    def entry(content: str) -> dict[str, object]:
        return {k: v for k, v in _token_entry(content).items() if k != "special"}

    return {
        "additional_special_tokens": list(ADDITIONAL_SPECIAL_TOKENS),
        "bos_token": entry("<s>"),
        "eos_token": entry("</s>"),
        "pad_token": entry("<unk>"),
        "unk_token": entry("<unk>"),
    }


def _special_ids_from_config(config_path: Path, sp: spm.SentencePieceProcessor) -> dict[str, int]:
    """Returns the id of every special token, from ``added_tokens_decoder`` or else the sentencepiece vocab."""
    config: dict = {}
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{config_path}: not valid JSON ({e})") from e
    decoder = config.get("added_tokens_decoder") or {}
    from_config: dict[str, int] = {}
    for key, entry in decoder.items():
        content = entry.get("content") if isinstance(entry, dict) else None
        if not isinstance(content, str) or not key.isdigit():
            raise ValueError(
                f"{config_path}: added_tokens_decoder[{key!r}] must map a numeric id to "
                f'{{"content": "<token>", ...}}, got {entry!r}'
            )
        from_config[content] = int(key)
    ids: dict[str, int] = {}
    for token in SPECIAL_TOKENS:
        if token in from_config:
            ids[token] = from_config[token]
            continue
        piece_id = sp.piece_to_id(token)
        if piece_id == sp.unk_id() and token != "<unk>":
            raise ValueError(
                f"{config_path.parent / TOKENIZER_MODEL}: special token {token!r} is neither in "
                f"{config_path.name} added_tokens_decoder nor a piece of the sentencepiece vocab"
            )
        ids[token] = piece_id
    return ids


class MiniCPMVTokenizer:
    """Encodes and decodes MiniCPM-V-2 text with the checkpoint's sentencepiece model (see module docstring)."""

    def __init__(
        self, model_proto: bytes, special_ids: dict[str, int] | None = None, source: str = "<memory>"
    ):
        self._model_proto = model_proto
        self._source = source
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        if special_ids is None:
            special_ids = {t: self.sp.piece_to_id(t) for t in SPECIAL_TOKENS}
        self.special_ids = dict(special_ids)
        self.special_tokens = {i: t for t, i in self.special_ids.items()}
        self.vocab_size: int = max(self.sp.get_piece_size(), max(self.special_ids.values()) + 1)

        self.unk_id: int = self.special_ids["<unk>"]
        self.bos_id: int = self.special_ids["<s>"]
        self.eos_id: int = self.special_ids["</s>"]
        self.pad_id: int = self.unk_id
        self.im_start_id: int = self.special_ids["<image>"]
        self.im_end_id: int = self.special_ids["</image>"]
        self.slice_start_id: int = self.special_ids["<slice>"]
        self.slice_end_id: int = self.special_ids["</slice>"]

        self.user_ids: list[int] = self._marker_ids(USER_MARKER)
        self.ai_ids: list[int] = self._marker_ids(AI_MARKER)
        self._split_ids: dict[str, list[int]] = {t: [i] for t, i in self.special_ids.items()}
        self._split_ids[USER_MARKER] = self.user_ids
        self._split_ids[AI_MARKER] = self.ai_ids
        # Longest first so that no token string shadows a longer one that starts with it.
        alternatives = sorted(self._split_ids, key=len, reverse=True)
        self._split_re = re.compile("(" + "|".join(re.escape(t) for t in alternatives) + ")")
        self.newline_ids: list[int] = self.encode("\n")

    def _marker_ids(self, marker: str) -> list[int]:
        """Returns the id(s) ``marker`` encodes to: its piece id if it is one piece, else sentencepiece's split."""
        piece_id = self.sp.piece_to_id(marker)
        if piece_id != self.sp.unk_id():
            return [piece_id]
        ids = self.sp.encode(marker, out_type=int)
        if not ids or self.sp.unk_id() in ids:
            raise ValueError(
                f"{self._source}: the sentencepiece model can neither find {marker!r} as a piece nor encode it "
                "without <unk>; a MiniCPM-V tokenizer needs it (a piece, or byte_fallback)"
            )
        return ids

    @property
    def newline_id(self) -> int:
        """Returns the single id of "\\n"; raises when this vocab needs several ids for it (use newline_ids)."""
        if len(self.newline_ids) != 1:
            raise ValueError(f"{self._source}: '\\n' encodes to {self.newline_ids}, use newline_ids")
        return self.newline_ids[0]

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> MiniCPMVTokenizer:
        """Returns the tokenizer stored in ``folder`` (tokenizer.model, optionally tokenizer_config.json)."""
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"tokenizer folder {folder} does not exist or is not a directory")
        model_path = folder / TOKENIZER_MODEL
        if not model_path.is_file():
            raise FileNotFoundError(
                f"{model_path} is missing: a MiniCPM-V tokenizer folder must hold the sentencepiece model "
                f"{TOKENIZER_MODEL} (and normally {TOKENIZER_CONFIG})"
            )
        proto = model_path.read_bytes()
        try:
            sp = spm.SentencePieceProcessor(model_proto=proto)
        except RuntimeError as e:
            raise ValueError(f"{model_path}: not a sentencepiece model ({e})") from e
        special_ids = _special_ids_from_config(folder / TOKENIZER_CONFIG, sp)
        return cls(proto, special_ids, source=str(model_path))

    def save_pretrained(self, folder: str | Path) -> None:
        """Returns nothing; writes tokenizer.model, tokenizer_config.json and special_tokens_map.json."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(folder / TOKENIZER_MODEL, self._model_proto)
        config = official_tokenizer_config()
        config["added_tokens_decoder"] = {str(i): _token_entry(t) for t, i in self.special_ids.items()}
        atomic_write_json(folder / TOKENIZER_CONFIG, config)
        atomic_write_json(folder / SPECIAL_TOKENS_MAP, official_special_tokens_map())

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str) -> list[int]:
        """Returns the ids of ``text`` without BOS/EOS; special-token strings and chat markers map to their ids."""
        ids: list[int] = []
        for i, chunk in enumerate(self._split_re.split(text)):
            if i % 2 == 1:  # re.split puts the captured separators at odd positions
                ids.extend(self._split_ids[chunk])
            elif chunk:
                ids.extend(self.sp.encode(chunk, out_type=int))
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Returns the text of ``ids``; special tokens are dropped, or written out when skip_special_tokens is False."""
        parts: list[str] = []
        run: list[int] = []
        for raw in ids:
            i = int(raw)
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is outside the vocabulary [0, {self.vocab_size})")
            if i in self.special_tokens:
                if run:
                    parts.append(self.sp.decode(run))
                    run = []
                if not skip_special_tokens:
                    parts.append(self.special_tokens[i])
            else:
                run.append(i)
        if run:
            parts.append(self.sp.decode(run))
        return "".join(parts)

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        """Returns the vocabulary piece of every id (special tokens as their strings)."""
        out = []
        for raw in ids:
            i = int(raw)
            if i in self.special_tokens:
                out.append(self.special_tokens[i])
            elif 0 <= i < self.sp.get_piece_size():
                out.append(self.sp.id_to_piece(i))
            else:
                raise ValueError(f"token id {i} is outside the vocabulary [0, {self.vocab_size})")
        return out


def train_tiny_tokenizer(
    folder: str | Path,
    vocab_size: int = 1024,
    extra_texts: Iterable[str] = (),
    *,
    chat_markers_as_pieces: bool = True,
) -> MiniCPMVTokenizer:
    """Returns a small, deterministic tokenizer with the checkpoint's special-token ids, saved into ``folder``.

    The model is a byte-fallback BPE (so any text encodes) with identity normalisation, no dummy prefix and
    whitespace kept, trained offline on a built-in corpus plus ``extra_texts``. Filler pieces
    ``<reserved_3>`` ... ``<reserved_100>`` put ``<image>`` ... ``</slice>`` at ids 101..112, as in the
    checkpoint. ``<用户>`` and ``<AI>`` are single user-defined pieces unless ``chat_markers_as_pieces`` is
    False, which mimics the official vocab where each marker encodes to several ordinary pieces.
    """
    folder = Path(folder)
    special = [t for t, i in sorted(SPECIAL_TOKENS.items(), key=lambda kv: kv[1]) if i > 2]
    fillers = [f"<reserved_{i}>" for i in range(3, SPECIAL_TOKENS[special[0]])]
    user_defined = fillers + special + ([USER_MARKER, AI_MARKER] if chat_markers_as_pieces else [])
    minimum = 3 + len(user_defined) + 256  # meta pieces + byte pieces, before any learned piece
    if vocab_size < minimum + 32:
        raise ValueError(
            f"train_tiny_tokenizer: vocab_size must be at least {minimum + 32}, got {vocab_size}"
        )
    sentences = tiny_corpus() + [t for t in extra_texts if t]
    buffer = io.BytesIO()
    spm.set_random_generator_seed(0)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=buffer,
        model_type="bpe",
        vocab_size=vocab_size,
        hard_vocab_limit=False,  # a corpus too small for vocab_size gives fewer pieces instead of failing
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        user_defined_symbols=user_defined,
        byte_fallback=True,
        split_digits=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        allow_whitespace_only_pieces=True,
        num_threads=1,
        minloglevel=2,
    )
    proto = buffer.getvalue()
    sp = spm.SentencePieceProcessor(model_proto=proto)
    expected = {"<unk>": 0, "<s>": 1, "</s>": 2, **{t: i for i, t in enumerate(user_defined, start=3)}}
    wrong = {t: sp.piece_to_id(t) for t, i in expected.items() if sp.piece_to_id(t) != i}
    if wrong:
        raise RuntimeError(f"train_tiny_tokenizer: sentencepiece placed pieces at unexpected ids: {wrong}")
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = MiniCPMVTokenizer(proto, dict(SPECIAL_TOKENS), source=str(folder / TOKENIZER_MODEL))
    tokenizer.save_pretrained(folder)
    return MiniCPMVTokenizer.from_pretrained(folder)
