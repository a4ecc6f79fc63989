"""Byte-level BPE tokenizer trained on the dataset's text.

The special tokens come first in the vocabulary, in a fixed order, so their ids are the same for every trained
tokenizer: ``<|pad|>`` 0, ``<|startoftext|>`` 1, ``<|endoftext|>`` 2, ``<|mask|>`` 3, ``<|spe|>`` 4, ``<|unk|>`` 5.

The saved directory holds ``tokenizer.json`` (loadable with ``tokenizers.Tokenizer.from_file``) and the
``transformers`` files (``tokenizer_config.json``, ``special_tokens_map.json``), so
``AutoTokenizer.from_pretrained(dir, local_files_only=True)`` works offline with the special tokens registered.

No post-processor is set: encoding a text adds no BOS/EOS; callers add ``<|startoftext|>``/``<|endoftext|>`` (ids 1
and 2) themselves where their model wants them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

__all__ = [
    "BOS_TOKEN",
    "EOS_TOKEN",
    "MASK_TOKEN",
    "PAD_TOKEN",
    "SPECIAL_TOKENS",
    "SPE_TOKEN",
    "UNK_TOKEN",
    "bpe_vocab_size",
    "build_bpe",
    "train_bpe",
]

PAD_TOKEN = "<|pad|>"
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MASK_TOKEN = "<|mask|>"
SPE_TOKEN = "<|spe|>"
UNK_TOKEN = "<|unk|>"
# Order matters: BpeTrainer assigns ids to special tokens first, in list order.
SPECIAL_TOKENS: tuple[str, ...] = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, MASK_TOKEN, SPE_TOKEN, UNK_TOKEN)


def build_bpe(texts: Iterable[str], vocab_size: int = 1000, min_frequency: int = 2) -> Tokenizer:
    """Train a lowercasing byte-level BPE on ``texts`` and return the ``tokenizers.Tokenizer``.

    Args:
        texts: Training texts.
        vocab_size: Upper bound on the vocabulary (special tokens + 256 byte symbols + merges); a small corpus may
            stop earlier when no pair reaches ``min_frequency``.
        min_frequency: Minimum count for a pair to be merged.

    Returns:
        The trained tokenizer.

    Raises:
        ValueError: If ``vocab_size`` cannot hold the special tokens and the byte alphabet.
    """
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(SPECIAL_TOKENS) + len(alphabet):
        raise ValueError(f"vocab_size must be >= {len(SPECIAL_TOKENS) + len(alphabet)}, got {vocab_size}")
    tokenizer = Tokenizer(models.BPE(unk_token=UNK_TOKEN))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    # Prefix space: a word gets the same token whether it starts the text or not, so a class name on its own
    # ("circle") shares its token with the same word inside captions (" circle"). Decoding strips that space again.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tokenizer.decoder = decoders.Sequence([decoders.ByteLevel(), decoders.Strip(content=" ", left=1, right=0)])
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        # The full byte alphabet up front: any input, including unseen characters, encodes without <|unk|>.
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    for expected_id, token in enumerate(SPECIAL_TOKENS):
        actual = tokenizer.token_to_id(token)
        if actual != expected_id:  # a changed library default would silently shift every id downstream
            raise RuntimeError(f"special token {token} got id {actual}, expected {expected_id}")
    return tokenizer


def train_bpe(texts: Iterable[str], out_dir: str | os.PathLike, vocab_size: int = 1000) -> Path:
    """Train a byte-level BPE on ``texts`` and save it to ``out_dir``.

    Args:
        texts: Training texts (for condmoe: all train-split captions plus the class names).
        out_dir: Directory to write (created if needed; existing tokenizer files are replaced).
        vocab_size: Upper bound on the vocabulary size.

    Returns:
        ``out_dir`` as a ``Path``: pass it to ``AutoTokenizer.from_pretrained`` or read ``out_dir/tokenizer.json``.
    """
    # transformers is heavy to import and only needed to write its config files.
    from transformers import PreTrainedTokenizerFast

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_bpe(texts, vocab_size=vocab_size)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=PAD_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        mask_token=MASK_TOKEN,
        unk_token=UNK_TOKEN,
        additional_special_tokens=[SPE_TOKEN],
    )
    wrapped.save_pretrained(str(out_dir))
    _normalise_config(out_dir)
    return out_dir


def _normalise_config(out_dir: Path) -> None:
    # transformers 5 records its internal backend class ("TokenizersBackend") and "extra_special_tokens", and no
    # longer writes special_tokens_map.json. Writing the portable class name plus the 4.x-style keys lets both major
    # versions load the directory with the same special tokens.
    config_path = out_dir / "tokenizer_config.json"
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    special = {
        "pad_token": PAD_TOKEN,
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "mask_token": MASK_TOKEN,
        "unk_token": UNK_TOKEN,
        "additional_special_tokens": [SPE_TOKEN],
    }
    config.update(special)
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    with open(config_path, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
    with open(out_dir / "special_tokens_map.json", "w", encoding="utf-8") as f:
        json.dump(special, f, indent=2, sort_keys=True)
        f.write("\n")


def bpe_vocab_size(tokenizer_dir: str | os.PathLike) -> int:
    """Vocabulary size (including special tokens) of a tokenizer saved by :func:`train_bpe`."""
    return Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json")).get_vocab_size()
