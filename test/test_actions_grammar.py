"""Grammar-constrained decoding with xgrammar: real (small) tokenizers built here, random logits."""
from __future__ import annotations

import json
import random

import pytest
import torch
import xgrammar as xgr
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from gemma4_agent.actions import GrammarSelector, GreedySelector, TokenSelector, load_action_spec, parse_action
from gemma4_agent.actions.grammar import compiled_grammar, detect_vocab_type
from gemma4_agent.actions.selectors import run_decode_loop
from gemma4_agent.actions.spec import ActionSpec

SPEC = load_action_spec()
WORDS = ("the robot moves forward then turns left and stops near the red ball while the camera sees a "
         "wall door chair table person go slow fast action linear angular move stop").split()


def corpus(n=300, seed=0):
    rnd = random.Random(seed)
    out = []
    for _ in range(n):
        if rnd.random() < 0.2:
            out.append(SPEC.format_action({"action": "stop"}))
        else:
            out.append(SPEC.format_action({"action": "move", "linear_x": rnd.uniform(-0.2, 0.5),
                                           "angular_z": rnd.uniform(-1, 1)}))
        out.append(" ".join(rnd.choice(WORDS) for _ in range(8)))
    return out


def byte_level_bpe():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus(), trainers.BpeTrainer(
        vocab_size=700, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<pad>", "<eos>"]))
    return tok


def byte_fallback_bpe():
    """Gemma-style: spaces as U+2581, <0xNN> byte pieces, byte_fallback, specials."""
    base = Tokenizer(models.BPE())
    base.normalizer = normalizers.Replace(" ", "\u2581")
    base.pre_tokenizer = pre_tokenizers.Split("\u2581", behavior="merged_with_next")
    base.train_from_iterator(corpus(seed=1), trainers.BpeTrainer(vocab_size=500, special_tokens=["<pad>", "<eos>", "<bos>"]))
    data = json.loads(base.to_str())
    vocab = data["model"]["vocab"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    data["model"]["vocab"] = vocab
    data["model"]["byte_fallback"] = True
    data["decoder"] = {"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
        {"type": "ByteFallback"}, {"type": "Fuse"}]}
    return Tokenizer.from_str(json.dumps(data))


def char_level():
    chars = [chr(c) for c in range(32, 127)]
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(chars)}, merges=[]))
    tok.decoder = decoders.Fuse()
    return tok


TOKENIZERS = {"byte_level": byte_level_bpe, "byte_fallback": byte_fallback_bpe, "char_level": char_level}
_BUILT = {}


def get_tok(name):
    if name not in _BUILT:
        _BUILT[name] = TOKENIZERS[name]()
    return _BUILT[name]


def decode_random(sel, vocab, gen, scale=3.0):
    """The contract's decode loop with random logits. Returns (text, steps)."""
    sel.reset()
    tokens, steps = run_decode_loop(sel, torch.randn(vocab, generator=gen) * scale,
                                    lambda chunk: torch.randn(vocab, generator=gen) * scale)
    return tokens, steps


def test_vocab_type_detection():
    assert detect_vocab_type(get_tok("byte_level"))[0] == xgr.VocabType.BYTE_LEVEL
    assert detect_vocab_type(get_tok("byte_fallback"))[0] == xgr.VocabType.BYTE_FALLBACK
    assert detect_vocab_type(get_tok("char_level"))[0] == xgr.VocabType.RAW


@pytest.mark.parametrize("name", list(TOKENIZERS))
def test_random_logits_always_give_valid_actions(name):
    tok = get_tok(name)
    vocab = tok.get_vocab_size(with_added_tokens=True)
    sel = GrammarSelector(SPEC, tok, vocab_size=vocab)
    assert isinstance(sel, TokenSelector)
    gen = torch.Generator().manual_seed(0)
    seen, forced_total, free_total = set(), 0, 0
    for i in range(220):
        tokens, steps = decode_random(sel, vocab, gen)
        assert sel.done()
        text = tok.decode(tokens)
        assert text == sel.text()
        r = parse_action(text, SPEC)
        assert r.ok, (text, r)
        assert SPEC.format_action(r.action) == text      # exactly the canonical form
        assert steps <= sel.free_tokens + 1              # acceptance 2
        assert sel.free_tokens + sel.forced_tokens == len(tokens)
        forced_total += sel.forced_tokens
        free_total += sel.free_tokens
        seen.add(r.action["action"])
    assert seen == {"move", "stop"}
    assert forced_total > 0
    if name != "byte_fallback":  # (that one has merges spanning whole keys: free tokens cover them)
        assert forced_total > free_total  # keys and punctuation are forced
    assert sel.stats()["mask_calls"] == free_total


@pytest.mark.parametrize("name", ["byte_level", "byte_fallback"])
def test_jump_forward_saves_decode_steps(name):
    tok = get_tok(name)
    vocab = tok.get_vocab_size(with_added_tokens=True)
    res = {}
    for jf in (True, False):
        sel = GrammarSelector(SPEC, tok, vocab_size=vocab, jump_forward=jf)
        gen = torch.Generator().manual_seed(1)
        steps_total, texts = 0, []
        for _ in range(50):
            tokens, steps = decode_random(sel, vocab, gen)
            steps_total += steps
            texts.append(tok.decode(tokens))
            assert parse_action(texts[-1], SPEC).ok
            if jf:
                assert steps <= sel.free_tokens + 1
            else:
                assert sel.forced_tokens == 0 and steps == len(tokens) - 1
        res[jf] = steps_total
    assert res[True] < res[False], res
    if name == "byte_level":
        assert res[True] * 2 < res[False], res


def test_forced_prefix_before_prefill():
    """An engine may call forced() right after reset() and append the opening tokens to the prefill."""
    tok = get_tok("byte_level")
    sel = GrammarSelector(SPEC, tok)
    sel.reset()
    opening = sel.forced()
    assert opening and tok.decode(opening) == '{"action":"'
    gen = torch.Generator().manual_seed(3)
    vocab = tok.get_vocab_size(with_added_tokens=True)
    tokens, steps = run_decode_loop(sel, torch.randn(vocab, generator=gen), lambda c: torch.randn(vocab, generator=gen))
    assert parse_action(tok.decode(opening + tokens), SPEC).ok
    assert steps <= sel.free_tokens - 1 + 1


def test_logits_longer_than_tokenizer_vocab():
    tok = get_tok("byte_fallback")
    n = tok.get_vocab_size(with_added_tokens=True)
    model_vocab = n + 77
    sel = GrammarSelector(SPEC, tok, vocab_size=model_vocab)
    gen = torch.Generator().manual_seed(4)

    def logits():
        x = torch.randn(model_vocab, generator=gen)
        x[n:] = 1e9  # padding ids must never be chosen
        return x
    for _ in range(30):
        sel.reset()
        tokens, _ = run_decode_loop(sel, logits(), lambda c: logits())
        assert max(tokens) < n
        assert parse_action(tok.decode(tokens), SPEC).ok
    # built for the tokenizer's size but given longer logits: the extra ids are masked too
    sel2 = GrammarSelector(SPEC, tok)
    sel2.reset()
    tokens, _ = run_decode_loop(sel2, logits(), lambda c: logits())
    assert max(tokens) < n and parse_action(tok.decode(tokens), SPEC).ok


def test_select_does_not_modify_logits_and_works_on_bf16():
    tok = get_tok("byte_level")
    sel = GrammarSelector(SPEC, tok)
    sel.reset()
    x = torch.randn(tok.get_vocab_size(with_added_tokens=True))
    y = x.clone()
    sel.select(x)
    assert torch.equal(x, y)
    sel.reset()
    sel.select(x.to(torch.bfloat16))


def test_grammar_rejects_out_of_range_and_malformed():
    tok = get_tok("char_level")
    compiled = compiled_grammar(SPEC, tok)
    assert compiled is compiled_grammar(SPEC, tok)  # compiled once per tokenizer and spec

    def accepts(text):
        m = xgr.GrammarMatcher(compiled, terminate_without_stop_token=True)
        return m.accept_string(text) and m.is_terminated()
    assert accepts('{"action":"move","linear_x":0.50,"angular_z":-1.00}')
    assert accepts('{"action":"move","linear_x":-0.20,"angular_z":0.00}')
    assert accepts('{"action":"stop"}')
    for bad in ['{"action":"move","linear_x":0.51,"angular_z":0.00}',
                '{"action":"move","linear_x":-0.21,"angular_z":0.00}',
                '{"action":"move","linear_x":-0.00,"angular_z":0.00}',
                '{"action":"move","linear_x":0.5,"angular_z":0.00}',
                '{"action":"move","linear_x":0.500,"angular_z":0.00}',
                '{"action":"move","linear_x":00.50,"angular_z":0.00}',
                '{"action":"move","angular_z":0.00,"linear_x":0.50}',
                '{"action":"move","linear_x":0.30,"angular_z":1.01}',
                '{"action": "stop"}', '{"action":"fly"}', '{"action":"stop","x":1}']:
        assert not accepts(bad), bad


def test_new_actions_from_the_spec_alone():
    spec = ActionSpec.from_dict({"actions": {
        "stop": {},
        "turn": {"fields": {"angle": {"min": -1.57, "max": 1.57}}, "twist": {"angular_z": "angle"}},
        "grasp": {"fields": {"hand": {"type": "enum", "values": ["left", "right"]},
                             "force": {"type": "integer", "min": 3, "max": 117}}},
        "look": {"fields": {"pan": {"min": -90, "max": 90, "decimals": 1}}}}})
    tok = get_tok("byte_level")
    vocab = tok.get_vocab_size(with_added_tokens=True)
    sel = GrammarSelector(spec, tok)
    gen = torch.Generator().manual_seed(5)
    seen = set()
    for _ in range(120):
        tokens, steps = decode_random(sel, vocab, gen)
        r = parse_action(tok.decode(tokens), spec)
        assert r.ok, tok.decode(tokens)
        assert steps <= sel.free_tokens + 1
        seen.add(r.action["action"])
    assert seen == {"stop", "turn", "grasp", "look"}


def test_unconstrained_random_logits_almost_never_valid():
    tok = get_tok("byte_level")
    vocab = tok.get_vocab_size(with_added_tokens=True)
    eos = tok.token_to_id("<eos>")
    sel = GreedySelector(eos_ids=[eos], max_tokens=40)
    gen = torch.Generator().manual_seed(6)
    ok = 0
    for _ in range(200):
        sel.reset()
        tokens, steps = run_decode_loop(sel, torch.randn(vocab, generator=gen), lambda c: torch.randn(vocab, generator=gen))
        assert steps == len(tokens) - 1 and sel.forced() == []
        ok += parse_action(tok.decode(sel.text_tokens()), SPEC).ok
    assert ok <= 2


def test_greedy_selector():
    sel = GreedySelector(eos_ids=[2], max_tokens=3)
    sel.reset()
    assert sel.select(torch.tensor([0.0, 5.0, 1.0])) == 1
    sel.accept(1)
    assert not sel.done()
    sel.accept(2)
    assert sel.done() and sel.text_tokens() == [1]
    sel.reset()
    for t in (0, 0, 0):
        sel.accept(t)
    assert sel.done()


def test_bitmask_time_per_step():
    """Fill + mask + argmax time per free token on a Gemma-sized vocabulary (262144 logits)."""
    tok = get_tok("byte_level")
    sel = GrammarSelector(SPEC, tok, vocab_size=262144)
    pool = [torch.randn(262144) * 3 for _ in range(16)]
    it = iter(range(10**9))
    decode = lambda: run_decode_loop(sel, pool[next(it) % 16], lambda c: pool[next(it) % 16])
    sel.reset()
    decode()  # warm-up
    t_mask, calls = sel.mask_time_s, sel.mask_calls
    for _ in range(40):
        sel.reset()
        decode()
    per_step_ms = 1e3 * (sel.mask_time_s - t_mask) / (sel.mask_calls - calls)
    print(f"\nbitmask fill+mask+argmax: {per_step_ms:.3f} ms/step (vocab 262144, CPU)")
    assert per_step_ms < 5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
def test_cuda_logits():
    tok = get_tok("byte_level")
    vocab = tok.get_vocab_size(with_added_tokens=True) + 64
    sel = GrammarSelector(SPEC, tok, vocab_size=vocab)
    gen = torch.Generator(device="cuda").manual_seed(8)
    for _ in range(50):
        sel.reset()
        tokens, steps = run_decode_loop(sel, torch.randn(vocab, device="cuda", generator=gen),
                                        lambda c: torch.randn(vocab, device="cuda", generator=gen))
        assert parse_action(tok.decode(tokens), SPEC).ok
        assert steps <= sel.free_tokens + 1
    print(f"\nCUDA bitmask fill+copy+apply+argmax: {1e3 * sel.mask_time_s / sel.mask_calls:.3f} ms/step")
