"""Tokenizer (the checkpoint's tokenizer.json, through the `tokenizers` library) and the Gemma 4
chat-format prompt builder. Each image is `<|image>` + N x `<|image|>` + `<image|>`.

A streaming prompt is cut in three so the engine can cache the first part:
    prefix  = <bos><|turn>system\n{system}<turn|>\n<|turn>user\n{instruction}\n
    frame   = <|image><|image|>...<|image|><image|>
    suffix  = <turn|>\n<|turn>model\n
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from ..errors import one_line

TURN_START, TURN_END = "<|turn>", "<turn|>"
BOI, IMAGE, EOI = "<|image>", "<|image|>", "<image|>"
BOS = "<bos>"


def load_tokenizer(path: str | Path) -> Tokenizer:
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no tokenizer.json at {file}")
    try:
        return Tokenizer.from_file(str(file))
    except Exception as exc:  # tokenizers raises a bare Exception for a malformed file
        raise ValueError(f"{file} is not a readable tokenizer ({one_line(exc)})") from exc


@dataclass(frozen=True)
class Prompt:
    ids: list[int]
    mm_token_type_ids: list[int]  # 1 on image soft tokens, 0 elsewhere (transformers' convention)


class PromptBuilder:
    """Builds token ids for Gemma 4's chat format from a `tokenizers.Tokenizer`."""

    def __init__(self, tokenizer: Tokenizer, image_token_id: int | None = None, boi_token_id: int | None = None,
                 eoi_token_id: int | None = None):
        self.tokenizer = tokenizer
        self.image_id = image_token_id if image_token_id is not None else self._special(IMAGE)
        self.boi_id = boi_token_id if boi_token_id is not None else self._special(BOI)
        self.eoi_id = eoi_token_id if eoi_token_id is not None else self._special(EOI)
        self.bos_id = self._special(BOS)

    def _special(self, token: str) -> int:
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise ValueError(f"tokenizer has no {token!r} token: not a Gemma 4 tokenizer")
        return token_id

    def text(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def prefix(self, instruction: str, system: str = "") -> list[int]:
        head = f"{TURN_START}system\n{system}{TURN_END}\n" if system else ""
        return [self.bos_id] + self.text(f"{head}{TURN_START}user\n{instruction}\n")

    def image(self, num_tokens: int) -> list[int]:
        return [self.boi_id] + [self.image_id] * num_tokens + [self.eoi_id]

    def suffix(self) -> list[int]:
        return self.text(f"{TURN_END}\n{TURN_START}model\n")

    def next_turn(self) -> list[int]:
        """Closes the model's answer and opens the next user turn (window mode: the next frame)."""
        return self.text(f"{TURN_END}\n{TURN_START}user\n")

    def single_turn(self, instruction: str, image_tokens: list[int], system: str = "") -> Prompt:
        """A whole prompt with the given images (soft-token counts), each on its own line before the text."""
        ids = [self.bos_id]
        if system:
            ids += self.text(f"{TURN_START}system\n{system}{TURN_END}\n")
        ids += self.text(f"{TURN_START}user\n")
        for n in image_tokens:
            ids += self.image(n) + self.text("\n")
        ids += self.text(instruction) + self.suffix()
        return Prompt(ids, [1 if t == self.image_id else 0 for t in ids])

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)
