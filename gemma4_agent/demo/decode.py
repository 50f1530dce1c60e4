"""Constrained decoding for the demo's own evaluation: an action trie and a batched KV-cached decoder.

`ActionTrie` holds the token sequence of every valid canonical action text (all grid values of every
field, from config/actions.yaml), so decoding through it is what the action grammar allows, spelled
the canonical way: where only one token can follow it is forced, otherwise the model's argmax over
the allowed tokens is taken. `TrieSelector` is the same thing behind the engine's TokenSelector
protocol (usable with `gemma4_agent.engine.StreamingSession`); `BatchDecoder` decodes many frames
at once (closed-loop evaluation of 50 worlds in lockstep) with a simple growing KV cache.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch
from tokenizers import Tokenizer

from ..model.network import Gemma4, image_block_ids
from ..model.tokenizer import PromptBuilder

MAX_TEXTS = 500_000


def canonical_texts(spec) -> list[str]:
    """Every valid action text of an ActionSpec (numbers on their grid)."""
    texts: list[str] = []
    for name in list(spec.actions):
        fields = spec.fields[name]
        grids = []
        for info in fields.values():
            if info.type == "enum":
                grids.append(list(info.spec.values))
            else:
                grids.append([u / 10 ** info.decimals if info.type == "number" else u for u in range(info.lo, info.hi + 1)])
        count = 1
        for g in grids:
            count *= len(g)
        if len(texts) + count > MAX_TEXTS:
            raise ValueError(f"action {name!r} has {count} distinct texts: too many for a trie")
        for values in itertools.product(*grids):
            texts.append(spec.format_action({"action": name, **dict(zip(fields, values))}))
    return texts


@dataclass
class TrieNode:
    children: dict[int, "TrieNode"] = field(default_factory=dict)
    terminal: bool = False


class ActionTrie:
    def __init__(self, tokenizer: Tokenizer, texts: list[str]):
        self.root = TrieNode()
        for enc in tokenizer.encode_batch(texts, add_special_tokens=False):
            node = self.root
            for t in enc.ids:
                node = node.children.setdefault(t, TrieNode())
            node.terminal = True
        self._allowed: dict[int, torch.Tensor] = {}

    @classmethod
    def from_spec(cls, tokenizer: Tokenizer, spec=None) -> "ActionTrie":
        if spec is None:
            from ..actions.spec import load_action_spec

            spec = load_action_spec()
        return cls(tokenizer, canonical_texts(spec))

    def allowed(self, node: TrieNode) -> torch.Tensor:
        key = id(node)
        if key not in self._allowed:
            self._allowed[key] = torch.tensor(sorted(node.children), dtype=torch.long)
        return self._allowed[key]

    def choose(self, node: TrieNode, logits: torch.Tensor) -> int:
        """The allowed token with the highest logit (the only one, if forced)."""
        allowed = self.allowed(node)
        if len(allowed) == 1:
            return int(allowed[0])
        return int(allowed[torch.argmax(logits.reshape(-1)[allowed.to(logits.device)])])


class TrieSelector:
    """TokenSelector over an ActionTrie: greedy among the allowed tokens, single continuations forced."""

    def __init__(self, trie: ActionTrie):
        self.trie = trie
        self.node = trie.root

    def reset(self) -> None:
        self.node = self.trie.root

    def select(self, logits: torch.Tensor) -> int:
        return self.trie.choose(self.node, logits)

    def accept(self, token: int) -> None:
        self.node = self.node.children[token]

    def forced(self) -> list[int]:
        out = []
        while not self.node.terminal and len(self.node.children) == 1:
            token = next(iter(self.node.children))
            out.append(token)
            self.node = self.node.children[token]
        return out

    def done(self) -> bool:
        return self.node.terminal and not self.node.children


class GrowingCache:
    """The minimal KV cache protocol of network.Attention: concatenate along the sequence."""

    def __init__(self, layers: int):
        self.k: list[torch.Tensor | None] = [None] * layers
        self.v: list[torch.Tensor | None] = [None] * layers

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        if self.k[layer] is None:
            self.k[layer], self.v[layer] = k, v
        else:
            self.k[layer] = torch.cat([self.k[layer], k], dim=2)
            self.v[layer] = torch.cat([self.v[layer], v], dim=2)
        return self.k[layer], self.v[layer]


class BatchDecoder:
    """Prompt = prefix(instruction) + image + suffix, then trie-constrained greedy decoding, batched."""

    def __init__(self, model: Gemma4, tokenizer: Tokenizer, trie: ActionTrie | None = None, system: str = ""):
        self.model = model
        self.tokenizer = tokenizer
        self.prompts = PromptBuilder(tokenizer, model.config.image_token_id, model.config.boi_token_id,
                                     model.config.eoi_token_id)
        self.trie = trie or ActionTrie.from_spec(tokenizer)
        self.system = system
        self._prefix_cache: dict[str, list[int]] = {}

    def prompt_ids(self, instruction: str, num_image_tokens: int) -> list[int]:
        key = f"{instruction}\x00{num_image_tokens}"
        if key not in self._prefix_cache:
            self._prefix_cache[key] = (self.prompts.prefix(instruction, self.system) + self.prompts.image(num_image_tokens)
                                       + self.prompts.suffix())
        return self._prefix_cache[key]

    @torch.no_grad()
    def decode(self, instructions: list[str], patches: torch.Tensor, positions: torch.Tensor) -> list[str]:
        """patches [B, P, D] float (processor values), positions [P, 2] -> action texts."""
        out: list[str | None] = [None] * len(instructions)
        groups: dict[int, list[int]] = {}
        for i, instr in enumerate(instructions):
            groups.setdefault(len(self.prompt_ids(instr, patches.shape[1])), []).append(i)
        for idx in groups.values():
            texts = self._decode_group([instructions[i] for i in idx], patches[idx], positions)
            for i, t in zip(idx, texts):
                out[i] = t
        return out  # type: ignore[return-value]

    def _decode_group(self, instructions, patches, positions) -> list[str]:
        model = self.model
        device = model.embed_tokens.weight.device
        dtype = model.embed_tokens.weight.dtype
        batch, num_patches = patches.shape[0], patches.shape[1]
        ids = torch.tensor([self.prompt_ids(s, num_patches) for s in instructions], device=device)
        pos_b = positions.to(device)[None].expand(batch, -1, -1)
        embeds = model.vision(patches.to(device, dtype), pos_b).reshape(-1, model.config.text_config.hidden_size)
        h = model.embed(ids, embeds)
        seq = ids.shape[1]
        q_pos = torch.arange(seq, device=device)
        blocks = image_block_ids((ids == model.config.image_token_id).long())
        cache = GrowingCache(len(model.layers))
        hidden = model.decode(h, q_pos, model.masks(q_pos, q_pos, blocks, blocks), cache)
        logits = model.logits(hidden[:, -1]).float()
        nodes = [self.trie.root] * batch
        tokens: list[list[int]] = [[] for _ in range(batch)]
        done = [False] * batch
        k_blocks = blocks
        step = 0
        while not all(done):
            next_ids = []
            for b in range(batch):
                if done[b]:
                    next_ids.append(self.prompts.tokenizer.token_to_id("<pad>") or 0)
                    continue
                t = self.trie.choose(nodes[b], logits[b])
                tokens[b].append(t)
                nodes[b] = nodes[b].children[t]
                if not nodes[b].children:
                    done[b] = True
                next_ids.append(t)
            if all(done):
                break
            p = torch.tensor([seq + step], device=device)
            k_pos = torch.arange(seq + step + 1, device=device)
            new_block = torch.full((batch, 1), -1, device=device, dtype=k_blocks.dtype)
            k_blocks = torch.cat([k_blocks, new_block], dim=1)
            h = model.embed(torch.tensor(next_ids, device=device)[:, None])
            hidden = model.decode(h, p, model.masks(p, k_pos, new_block, k_blocks), cache)
            logits = model.logits(hidden[:, -1]).float()
            step += 1
        return [self.tokenizer.decode(t, skip_special_tokens=False) for t in tokens]
