"""The demo model's tokenizer: a small byte-level BPE built with `tokenizers`, deterministically.

Ids 0..7 are the special tokens Gemma 4's chat format needs (PromptBuilder looks them up by
string); then the 256 byte symbols; then merges learned from a fixed corpus of chat-format text,
instructions and action JSON. Digits and "-" are split one per token before BPE, so a number such
as `-0.25` is `-`, `0`, `.`, `2`, `5`: few, free, regular tokens.

Token boundaries fall where the action grammar's free choices begin, so the canonical action text
tokenizes exactly as the grammar's jump-forward pieces do (`{"action":"` | `move` | `","linear_x":`
| `-` | `0` | `.` | ...): a model trained on whole texts decodes the same tokens under the grammar.

Byte-level means any text round-trips, and xgrammar recognises the vocabulary as BYTE_LEVEL.
"""
from __future__ import annotations

import itertools
import os
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from ..model.tokenizer import BOI, BOS, EOI, IMAGE, TURN_END, TURN_START

PAD, EOS = "<pad>", "<eos>"
SPECIAL_TOKENS = [PAD, EOS, BOS, TURN_START, TURN_END, BOI, IMAGE, EOI]  # ids 0..7, in this order
VOCAB_SIZE = 512

COLOURS = ["red", "green", "blue", "yellow", "orange", "purple", "white", "black", "cyan", "magenta", "pink",
           "brown", "grey", "gray"]
SHAPES = ["ball", "cube", "box", "cylinder", "cone", "sphere", "block", "pyramid", "object", "target"]
VERBS = ["go to the", "drive to the", "move to the", "find the", "approach the", "navigate to the",
         "turn toward the", "stop at the", "look for the", "head to the"]
ACTION_NAMES = ["move", "stop", "turn", "forward", "rotate", "wait"]
FIELDS = ["linear_x", "angular_z", "linear", "angular", "speed", "duration", "angle", "distance"]
CHAT_WORDS = ["system", "user", "model"]


def _number(i: int) -> str:
    """Deterministic numbers in the canonical 2-decimal form (signs included)."""
    value = ((i * 37) % 201 - 100) / 100.0
    return f"{value:.2f}"


def corpus() -> list[str]:
    """The fixed training corpus. Changing it changes the vocabulary (and invalidates trained weights)."""
    lines: list[str] = []
    for verb, colour, shape in itertools.product(VERBS, COLOURS, SHAPES):
        instruction = f"{verb} {colour} {shape}"
        lines.append(f"{TURN_START}user\n{instruction}\n")
        lines.append(f"{TURN_START}system\nYou control a mobile robot.{TURN_END}\n{TURN_START}user\n{instruction}\n")
        lines.append(instruction.capitalize() + ".")
    lines += [f"{TURN_END}\n{TURN_START}model\n"] * 50
    lines += [f"{TURN_START}{word}\n" for word in CHAT_WORDS] * 20
    for i in range(400):
        name = ACTION_NAMES[i % len(ACTION_NAMES)]
        fields = FIELDS[(i // 7) % len(FIELDS)], FIELDS[(i // 3) % len(FIELDS)]
        lines.append('{"action":"move","linear_x":%s,"angular_z":%s}' % (_number(i), _number(i + 11)))
        lines.append('{"action":"stop"}')
        lines.append('{"action":"%s","%s":%s,"%s":%s}' % (name, fields[0], _number(i + 3), fields[1], _number(i + 5)))
        lines.append('{"action": "%s", "%s": %s}' % (name, fields[0], _number(i + 7)))
    lines += ["You control a mobile robot. Reply with one action as JSON.", "true", "false", "null"] * 10
    return lines


def build_tokenizer(vocab_size: int = VOCAB_SIZE) -> Tokenizer:
    """Train the byte-level BPE on `corpus()`. Same inputs, same tokenizer.json."""
    os.environ.setdefault("RAYON_RS_NUM_CPUS", "1")  # single-threaded counting: no ordering surprises
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split("-", behavior="isolated"),  # a sign never merges with the forced '":' before it
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus(), trainer=trainer)
    for i, token in enumerate(SPECIAL_TOKENS):
        if tokenizer.token_to_id(token) != i:
            raise RuntimeError(f"special token {token!r} got id {tokenizer.token_to_id(token)}, expected {i}")
    return tokenizer


def save_tokenizer(tokenizer: Tokenizer, folder: str | Path) -> Path:
    path = Path(folder) / "tokenizer.json"
    tokenizer.save(str(path), pretty=True)
    return path
