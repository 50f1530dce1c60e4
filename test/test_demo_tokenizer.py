"""The demo tokenizer: Gemma 4's special tokens, deterministic build, action text round trip, token
boundaries where the action grammar's free choices begin, and the chat-format prompt."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from gemma4_agent.demo.tokenizer import SPECIAL_TOKENS, build_tokenizer
from gemma4_agent.model.tokenizer import PromptBuilder

ROOT = Path(__file__).resolve().parents[1]
ACTION_TEXTS = [
    '{"action":"move","linear_x":0.30,"angular_z":-0.25}',
    '{"action":"move","linear_x":0.00,"angular_z":0.60}',
    '{"action":"move","linear_x":-0.20,"angular_z":1.00}',
    '{"action":"move","linear_x":0.50,"angular_z":-1.00}',
    '{"action":"stop"}',
]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def test_special_tokens_have_fixed_ids(tok):
    assert SPECIAL_TOKENS == ["<pad>", "<eos>", "<bos>", "<|turn>", "<turn|>", "<|image>", "<|image|>", "<image|>"]
    for i, token in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(token) == i
    assert 300 <= tok.get_vocab_size() <= 1000


def test_build_is_deterministic(tok):
    assert build_tokenizer().to_str() == tok.to_str()


@pytest.mark.parametrize("text", ACTION_TEXTS + ["go to the yellow cylinder", "turn left 90°, then stop!"])
def test_round_trip(tok, text):
    ids = tok.encode(text, add_special_tokens=False).ids
    assert tok.decode(ids, skip_special_tokens=False) == text


def test_digits_and_signs_are_single_tokens(tok):
    tokens = tok.encode('{"action":"move","linear_x":0.30,"angular_z":-0.25}', add_special_tokens=False).tokens
    assert tokens[-6:] == ["-", "0", ".", "2", "5", "}"]
    for d in "0123456789-.":
        assert tok.token_to_id(d) is not None


@pytest.mark.parametrize("text", ACTION_TEXTS)
def test_tokens_split_where_the_grammar_chooses(tok, text):
    whole = tok.encode(text, add_special_tokens=False).ids
    # number characters are free choices: a token never spans a digit/sign and a forced literal
    tokens = tok.encode(text, add_special_tokens=False).tokens
    for t in tokens:
        if any(c in t for c in "-0123456789"):
            assert len(t) == 1, f"token {t!r} joins a number character with something else"
    # the text is the concatenation of its pieces' tokenizations
    pieces = re.split(r"(-|\d|\.)", text)
    joined = [i for p in pieces if p for i in tok.encode(p, add_special_tokens=False).ids]
    assert joined == whole
    # and the action name is a token of its own after the forced '{"action":"'
    name = re.match(r'\{"action":"([a-z_]+)"', text).group(1)
    assert tok.token_to_id(name) in whole


def test_all_instructions_tokenize_to_the_same_length(tok):
    from gemma4_agent.sim.world import COLOURS, SHAPES

    lengths = {len(tok.encode(f"go to the {c} {s}", add_special_tokens=False).ids) for c in COLOURS for s in SHAPES}
    assert lengths == {5}


def test_prompt_builder_works_with_it(tok):
    prompts = PromptBuilder(tok)
    assert (prompts.bos_id, prompts.boi_id, prompts.image_id, prompts.eoi_id) == (2, 5, 6, 7)
    prefix = prompts.prefix("go to the red ball")
    assert prompts.decode(prefix) == "<bos><|turn>user\ngo to the red ball\n"
    ids = prefix + prompts.image(63) + prompts.suffix()
    assert ids.count(prompts.image_id) == 63
    assert prompts.decode(prompts.suffix()) == "<turn|>\n<|turn>model\n"
    prompt = prompts.single_turn("go to the red ball", [63])
    assert sum(prompt.mm_token_type_ids) == 63
    with_system = prompts.prefix("go to the red ball", system="You control a mobile robot.")
    assert prompts.decode(with_system).startswith("<bos><|turn>system\nYou control a mobile robot.<turn|>\n")


def test_shipped_tokenizer_is_the_built_one(tok):
    from gemma4_agent.model.tokenizer import load_tokenizer

    shipped = ROOT / "engines" / "demo" / "tokenizer.json"
    if not shipped.is_file():
        pytest.skip("engines/demo not built")
    assert load_tokenizer(shipped).to_str() == tok.to_str()
