"""Grammar-constrained next-token selection with xgrammar (the TokenSelector of docs/ARCHITECTURE.md).

The EBNF grammar is generated from the action spec (fixed key order, no whitespace, numbers with
exactly N decimals and only in range) and compiled once per (tokenizer, model vocab size, spec).
Each `select` fills the token bitmask and applies it to the logits (CPU or CUDA); `forced` is
jump-forward: the text the grammar forces next is tokenized and accepted at once (falling back to
"exactly one token allowed" states), so the engine appends it in one chunk instead of one decode
step per token. `done` is true as soon as the JSON object is complete (no EOS token needed).
"""
from __future__ import annotations

import json
import threading
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import xgrammar as xgr

from .spec import ActionSpec, load_action_spec

_LOCK = threading.Lock()
_INFO: Dict[Tuple[int, int], Tuple[Any, "xgr.TokenizerInfo", "xgr.GrammarCompiler", List[bytes]]] = {}
_COMPILED: Dict[Tuple[int, int, str], Tuple[Any, "xgr.CompiledGrammar"]] = {}


def _own_vocab_type(tokenizer: Any, vocab: Dict[str, int]) -> "xgr.VocabType":
    """Vocabulary encoding from the vocabulary and the tokenizer's decoder (no transformers)."""
    if sum(f"<0x{b:02X}>" in vocab for b in range(256)) >= 128:
        return xgr.VocabType.BYTE_FALLBACK
    try:
        decoder = json.loads(tokenizer.to_str()).get("decoder") or {}
    except Exception:
        decoder = {}
    kinds = set()
    stack = [decoder]
    while stack:
        d = stack.pop()
        if isinstance(d, dict):
            kinds.add(d.get("type"))
            stack += d.get("decoders") or []
    if "ByteLevel" in kinds:
        return xgr.VocabType.BYTE_LEVEL
    if "ByteFallback" in kinds or "Metaspace" in kinds:
        return xgr.VocabType.BYTE_FALLBACK
    return xgr.VocabType.RAW


def _prefix_space(tokenizer: Any, vocab_type: "xgr.VocabType") -> bool:
    try:
        tokens = tokenizer.encode("a", add_special_tokens=False).tokens
    except Exception:
        return False
    prefix = "\u2581" if vocab_type == xgr.VocabType.BYTE_FALLBACK else "\u0120"
    return bool(tokens) and tokens[0].startswith(prefix)


def detect_vocab_type(tokenizer: Any) -> Tuple["xgr.VocabType", bool]:
    """(VocabType, add_prefix_space) of a `tokenizers.Tokenizer`: BYTE_LEVEL for byte-level BPE
    (GPT-2 / Llama 3 style), BYTE_FALLBACK for sentencepiece-style vocabularies with <0xNN> pieces
    and "\u2581" for spaces (Gemma), RAW otherwise."""
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    meta = None
    try:  # xgrammar's own detection from the serialized tokenizer (what from_huggingface uses)
        meta = xgr.TokenizerInfo._detect_metadata_from_hf(tokenizer.to_str())
    except Exception:
        meta = None
    try:
        from_vocab = xgr.TokenizerInfo._detect_vocab_type_from_vocab(vocab)
    except Exception:
        from_vocab = None
    if meta is not None and (from_vocab is None or from_vocab == meta["vocab_type"]):
        return meta["vocab_type"], bool(meta["add_prefix_space"])
    vocab_type = from_vocab if from_vocab is not None else _own_vocab_type(tokenizer, vocab)
    return vocab_type, _prefix_space(tokenizer, vocab_type)


def tokenizer_info(tokenizer: Any, vocab_size: Optional[int] = None,
                   stop_token_ids: Optional[Sequence[int]] = None) -> Tuple["xgr.TokenizerInfo", "xgr.GrammarCompiler", List[bytes]]:
    """xgrammar TokenizerInfo (+ its compiler and the decoded bytes of each token) of a
    `tokenizers.Tokenizer`, for a model whose logits have `vocab_size` entries (default: the
    tokenizer's). Ids the tokenizer lacks and special added tokens can never be selected. Cached."""
    key = (id(tokenizer), int(vocab_size or 0))
    with _LOCK:
        hit = _INFO.get(key)
        if hit is not None:
            return hit[1], hit[2], hit[3]
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    n_tok = max(vocab.values()) + 1 if vocab else 0
    size = int(vocab_size) if vocab_size else n_tok
    encoded = [""] * size
    for token, idx in vocab.items():
        if idx < size:
            encoded[idx] = token
    specials = []
    try:
        for idx, added in tokenizer.get_added_tokens_decoder().items():
            if getattr(added, "special", False) and idx < size:
                encoded[idx] = ""  # never allowed by a grammar
                specials.append(idx)
    except Exception:
        pass
    vocab_type, add_prefix_space = detect_vocab_type(tokenizer)
    stops = list(stop_token_ids) if stop_token_ids else (specials[:1] or None)
    info = xgr.TokenizerInfo(encoded, vocab_type, vocab_size=size, stop_token_ids=stops,
                             add_prefix_space=add_prefix_space)
    compiler = xgr.GrammarCompiler(info, max_threads=1)
    decoded = list(info.decoded_vocab)
    with _LOCK:
        _INFO[key] = (tokenizer, info, compiler, decoded)  # keeps the tokenizer alive: id() stays unique
    return info, compiler, decoded


def compiled_grammar(spec: ActionSpec, tokenizer: Any, vocab_size: Optional[int] = None) -> "xgr.CompiledGrammar":
    """The action grammar compiled for this tokenizer and model vocab size (cached)."""
    key = (id(tokenizer), int(vocab_size or 0), spec.fingerprint)
    with _LOCK:
        hit = _COMPILED.get(key)
        if hit is not None:
            return hit[1]
    _, compiler, _ = tokenizer_info(tokenizer, vocab_size)
    compiled = compiler.compile_grammar(spec.ebnf())
    with _LOCK:
        _COMPILED[key] = (tokenizer, compiled)
    return compiled


class GrammarSelector:
    """TokenSelector that only lets the model spell valid actions of `spec`.

    tokenizer: a `tokenizers.Tokenizer`; vocab_size: the length of the model's logits (may exceed
    the tokenizer's vocabulary). jump_forward=False turns `forced()` into `[]` (for comparisons).
    Selection is greedy (argmax over the allowed tokens).
    """

    def __init__(self, spec: Optional[ActionSpec], tokenizer: Any, vocab_size: Optional[int] = None,
                 jump_forward: bool = True):
        self.spec = spec if spec is not None else load_action_spec()
        self.tokenizer = tokenizer
        self.info, _, self._decoded = tokenizer_info(tokenizer, vocab_size)
        self.vocab_size = self.info.vocab_size
        self.compiled = compiled_grammar(self.spec, tokenizer, vocab_size)
        self.matcher = xgr.GrammarMatcher(self.compiled, terminate_without_stop_token=True)
        self.jump_forward = jump_forward
        self.bitmask = xgr.allocate_token_bitmask(1, self.vocab_size)
        if torch.cuda.is_available():
            try:
                self.bitmask = self.bitmask.pin_memory()
            except Exception:
                pass
        self._words = self.bitmask.numpy().view(np.uint32).reshape(-1)
        self._device_masks: Dict[torch.device, torch.Tensor] = {}
        self._fresh = False
        # counters: this action, and totals since construction
        self.tokens: List[int] = []
        self.free_tokens = 0
        self.forced_tokens = 0
        self.total_free = 0
        self.total_forced = 0
        self.total_actions = 0
        self.mask_time_s = 0.0     # fill + apply, summed over select calls
        self.mask_calls = 0

    # TokenSelector -------------------------------------------------------------------------------
    def reset(self) -> None:
        self.matcher.reset()
        self._fresh = False
        self.tokens = []
        self.free_tokens = 0
        self.forced_tokens = 0
        self.total_actions += 1

    def select(self, logits: torch.Tensor) -> int:
        if self.matcher.is_terminated():
            raise RuntimeError("select() after the action is complete: call reset()")
        t0 = time.perf_counter()
        self._fill()
        flat = logits.detach().reshape(-1)
        n = flat.numel()
        if flat.device.type == "cpu":
            # On CPU the allowed set is tiny: argmax over the allowed ids (~30 us) instead of masking
            # every logit (apply_token_bitmask_inplace: ~1 ms for 262k logits). Same result.
            ids = self._allowed_ids(min(n, self.vocab_size))
            if ids.numel() == 0:
                raise RuntimeError("the grammar allows no token within the logits' vocabulary")
            token = int(ids[torch.argmax(flat[ids].float())])
        else:
            scores = flat.to(torch.float32, copy=True)
            xgr.apply_token_bitmask_inplace(scores, self._mask_on(scores.device), vocab_size=min(n, self.vocab_size))
            if n > self.vocab_size:
                scores[self.vocab_size:] = float("-inf")
            token = int(torch.argmax(scores))
            if not bool(torch.isfinite(scores[token])):
                raise RuntimeError("the grammar allows no token within the logits' vocabulary")
        self.mask_time_s += time.perf_counter() - t0
        self.mask_calls += 1
        self.free_tokens += 1
        self.total_free += 1
        return token

    def accept(self, token: int) -> None:
        token = int(token)
        if not self.matcher.accept_token(token):
            raise ValueError(f"token {token} is not allowed by the action grammar here")
        self._fresh = False
        self.tokens.append(token)

    def forced(self) -> List[int]:
        if not self.jump_forward:
            return []
        out: List[int] = []
        while not self.matcher.is_terminated():
            progressed = False
            text = self.matcher.find_jump_forward_string()
            if text:
                for t in self.tokenizer.encode(text, add_special_tokens=False).ids:
                    if t >= self.vocab_size or not self.matcher.accept_token(t):
                        break
                    out.append(t)
                    progressed = True
            if progressed:
                self._fresh = False
                continue
            only = self._single_allowed()  # e.g. a forced text the tokenizer spells differently
            if only is None or not self.matcher.accept_token(only):
                break
            self._fresh = False
            out.append(only)
        self.tokens += out
        self.forced_tokens += len(out)
        self.total_forced += len(out)
        return out

    def done(self) -> bool:
        return self.matcher.is_terminated()

    # extras --------------------------------------------------------------------------------------
    def text(self) -> str:
        """The text of the accepted tokens (as the grammar saw it)."""
        return b"".join(self._decoded[t] for t in self.tokens).decode("utf-8", errors="replace")

    def stats(self) -> Dict[str, Any]:
        return {"free_tokens": self.free_tokens, "forced_tokens": self.forced_tokens,
                "total_free": self.total_free, "total_forced": self.total_forced,
                "mask_ms_mean": 1e3 * self.mask_time_s / max(self.mask_calls, 1), "mask_calls": self.mask_calls}

    def _fill(self) -> None:
        if not self._fresh:
            self.matcher.fill_next_token_bitmask(self.bitmask)
            self._fresh = True

    def _mask_on(self, device: torch.device) -> torch.Tensor:
        if device.type == "cpu":
            return self.bitmask
        buf = self._device_masks.get(device)
        if buf is None:
            buf = self._device_masks[device] = torch.empty_like(self.bitmask, device=device)
        buf.copy_(self.bitmask, non_blocking=True)
        return buf

    def _allowed_ids(self, limit: int) -> torch.Tensor:
        """Token ids (< limit) the filled bitmask allows, ascending."""
        nz = np.flatnonzero(self._words)
        bits = np.unpackbits(self._words[nz].view(np.uint8).reshape(-1, 4), axis=1, bitorder="little")
        rows, cols = np.nonzero(bits.reshape(len(nz), 32))
        ids = nz[rows] * 32 + cols
        return torch.from_numpy(ids[ids < limit].astype(np.int64))

    def _single_allowed(self) -> Optional[int]:
        self._fill()
        nz = np.flatnonzero(self._words)
        if len(nz) != 1:
            return None
        w = int(self._words[nz[0]])
        if w & (w - 1):
            return None
        token = int(nz[0]) * 32 + w.bit_length() - 1
        return token if token < self.vocab_size else None
