"""Text side of the tokenizers: BPE strings -> padded id tensors with Uni-Perceiver's special tokens.

Accepts the BPE directory that ``condmoe-prep`` trains beside the shards, or any local Hugging Face tokenizer
directory (e.g. a saved CLIP tokenizer); special tokens missing from it are added, so ``vocab_size`` may exceed the
base vocabulary. Nothing is downloaded (``local_files_only``).
"""

from pathlib import Path

import torch
from transformers import AutoTokenizer

SPE_TOKEN = "<|spe|>"
SPECIAL_TOKENS = {
    "pad_token": "<|pad|>",
    "bos_token": "<|startoftext|>",
    "eos_token": "<|endoftext|>",
    "mask_token": "<|mask|>",
    "unk_token": "<|unk|>",
}


class TextTokenizer:
    """Encodes text as ``<|spe|> tokens... <|endoftext|> <|pad|>...``, truncated to ``max_length``.

    The ``<|spe|>`` output at position 0 is the sequence representation, so it is the first token of every sequence.
    """

    def __init__(self, path: str | Path, max_length: int = 32):
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"tokenizer directory not found: {path}")
        if max_length < 3:
            raise ValueError(f"max_length must be >= 3 (spe, one token, end), got {max_length}")
        self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        missing = {k: v for k, v in SPECIAL_TOKENS.items() if getattr(self.tokenizer, k, None) is None}
        if missing:
            self.tokenizer.add_special_tokens(missing)
        if SPE_TOKEN not in self.tokenizer.get_vocab():
            self.tokenizer.add_special_tokens({"additional_special_tokens": [SPE_TOKEN]})
        self.max_length = max_length
        self.spe_id = self.tokenizer.convert_tokens_to_ids(SPE_TOKEN)
        self.eos_id = self.tokenizer.eos_token_id
        self.pad_id = self.tokenizer.pad_token_id
        self.mask_id = self.tokenizer.mask_token_id

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def __call__(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(ids [N, max_length] long, mask [N, max_length] bool)``; mask is True on real tokens."""
        body = self.tokenizer(list(texts), add_special_tokens=False, truncation=True,
                              max_length=self.max_length - 2)["input_ids"]
        ids = torch.full((len(body), self.max_length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(body), self.max_length), dtype=torch.bool)
        for i, tokens in enumerate(body):
            seq = [self.spe_id, *tokens, self.eos_id]
            ids[i, :len(seq)] = torch.tensor(seq)
            mask[i, :len(seq)] = True
        return ids, mask

    def decode(self, ids: torch.Tensor | list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)
