"""Prompt cleaning and tokenisation as HeliosPyramidPipeline does it, with the `tokenizers` library
only (no transformers at run time)."""

from __future__ import annotations

import html
from pathlib import Path

import ftfy
import numpy as np
import regex as re


def prompt_clean(text: str) -> str:
    """ftfy + double HTML unescape + whitespace folding (the pipeline's basic_clean/whitespace_clean)."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return re.sub(r"\s+", " ", text).strip()


class PromptTokenizer:
    """Pads to ``length`` and truncates (keeping the closing </s>), like the pipeline's call
    ``tokenizer(prompt, padding="max_length", max_length=length, truncation=True, add_special_tokens=True)``."""

    def __init__(self, folder: Path, length: int):
        from tokenizers import Tokenizer

        self.length = length
        self.tokenizer = Tokenizer.from_file(str(Path(folder) / "tokenizer.json"))
        pad = self._special(folder, "pad_token", "<pad>")
        pad_id = self.tokenizer.token_to_id(pad)
        self.tokenizer.enable_truncation(max_length=length)
        self.tokenizer.enable_padding(length=length, pad_id=pad_id if pad_id is not None else 0, pad_token=pad)

    @staticmethod
    def _special(folder: Path, key: str, default: str) -> str:
        import json

        cfg = Path(folder) / "tokenizer_config.json"
        value = json.loads(cfg.read_text()).get(key, default) if cfg.is_file() else default
        return value["content"] if isinstance(value, dict) else (value or default)

    def __call__(self, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, attention_mask), int64 [B, length]."""
        enc = self.tokenizer.encode_batch([prompt_clean(p) for p in prompts], add_special_tokens=True)
        ids = np.array([e.ids for e in enc], dtype=np.int64)
        mask = np.array([e.attention_mask for e in enc], dtype=np.int64)
        return ids, mask
