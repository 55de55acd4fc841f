"""A Hugging Face tokenizer behind the interface of :class:`vespo_megatron.tokenizer.Tokenizer`.

Loaded with ``transformers.AutoTokenizer`` from local files only; prompts can be rendered with the
model's chat template; stop tokens come from generation_config.json / config.json (docs/models.md).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def has_tokenizer(hf_path) -> bool:
    """True when the folder holds tokenizer files transformers can load."""
    return any((Path(hf_path) / name).is_file() for name in TOKENIZER_FILES)


def _stop_ids(path: Path, tokenizer) -> list[int]:
    """eos ids from generation_config.json (a list or one id), else the config's, else the tokenizer's."""
    for name in ("generation_config.json", "config.json"):
        file = path / name
        if file.is_file():
            value = json.loads(file.read_text()).get("eos_token_id")
            if value is not None:
                return [int(v) for v in (value if isinstance(value, list) else [value])]
    if tokenizer.eos_token_id is None:
        raise ValueError(f"{path}: no eos_token_id in generation_config.json, config.json or the tokenizer; "
                         "the rollout needs a stop token")
    return [int(tokenizer.eos_token_id)]


class HFTokenizer:
    """A transformers tokenizer (local files only) with the interface of :class:`vespo_megatron.tokenizer.Tokenizer`.

    ``eos_id`` is the first stop id and ``stop_ids`` all of them (generation_config.json may list several);
    ``pad_id`` falls back to ``eos_id`` and ``bos_id`` is None when the model has no bos (Qwen).
    ``encode_prompt`` renders the chat template when ``chat_template`` is set.
    """

    def __init__(self, path, chat_template: bool = False):
        from transformers import AutoTokenizer

        self.path = Path(path)
        if not has_tokenizer(self.path):
            raise FileNotFoundError(f"{self.path} has none of the tokenizer files {list(TOKENIZER_FILES)}")
        self._tok = AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
        self.chat_template = chat_template
        if chat_template and not self._tok.chat_template:
            raise ValueError(f"task.chat_template=true but the tokenizer in {self.path} has no chat template "
                             "(tokenizer_config.json / chat_template.jinja); set task.chat_template=false")
        self.stop_ids = _stop_ids(self.path, self._tok)

    @property
    def vocab_size(self) -> int:
        return len(self._tok)

    @property
    def bos_id(self) -> Optional[int]:
        return self._tok.bos_token_id

    @property
    def eos_id(self) -> int:
        return self.stop_ids[0]

    @property
    def pad_id(self) -> int:
        return self._tok.pad_token_id if self._tok.pad_token_id is not None else self.eos_id

    @property
    def unk_id(self) -> Optional[int]:
        return self._tok.unk_token_id

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False))

    def encode_prompt(self, text: str) -> list[int]:
        """The chat template's user turn plus generation prompt, or bos (when there is one) then the text."""
        if self.chat_template:
            rendered = self._tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                     add_generation_prompt=True)
            return self.encode(rendered)
        return ([self.bos_id] if self.bos_id is not None else []) + self.encode(text)

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size}) of {self.path}")
        return self._tok.decode(ids, skip_special_tokens=True)

    def id_to_piece(self, token_id: int) -> str:
        return self._tok.convert_ids_to_tokens(int(token_id))

    def __repr__(self) -> str:
        return f"HFTokenizer({str(self.path)!r}, vocab_size={self.vocab_size}, stop_ids={self.stop_ids})"
