"""The core: a camera frame in, a safe velocity command out, within a latency budget. ROS-free.

The ROS node, the bag replay evaluator, the closed-loop simulator and the benchmarks all drive this.

    agent = Agent(AgentConfig(engine="engines/demo"))
    agent.set_instruction("go to the red ball")
    result = agent.act(rgb, stamp_s=capture_time)   # ActResult: status, action, twist, timings
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from .actions import ActionParser, SafetyFilter, action_to_twist, load_action_spec
from .actions.grammar import GrammarSelector
from .engine.session import SessionConfig, StreamingSession, max_chunk
from .engines.backends import load_engine
from .engines.manifest import EngineError
from .model.config import ImageTokens
from .model.loader import resolve_dtype

log = logging.getLogger(__name__)
PACKAGE_ROOT = Path(__file__).resolve().parent.parent


def default_engine_path() -> Path:
    """The bundled demo engine: the source tree's engines/demo, or the installed share/ copy."""
    local = PACKAGE_ROOT / "engines" / "demo"
    if local.is_dir():
        return local
    try:
        from ament_index_python.packages import get_package_share_directory

        return Path(get_package_share_directory("gemma4_agent")) / "engines" / "demo"
    except Exception:  # ament index absent or package not installed: report the source path
        return local


class AgentConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    engine: Path = Field(default_factory=default_engine_path, description="engine folder (manifest.json inside)")
    backend: Literal["torch", "onnxruntime", "tensorrt"] = "torch"
    device: Literal["cpu", "cuda"] = "cpu"
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="auto: bf16 on CUDA and on CPUs with AMX, float32 on other CPUs "
        "(model.loader.resolve_dtype)")
    compile: bool = Field(False, description="torch backend: torch.compile the decoder, done once at start-up with "
                          "a throw-away frame (30 s for the demo engine on CPU, minutes at the 12B shape); frames ~2x "
                          "faster")
    image_tokens: ImageTokens | None = None  # None: the engine's default
    budget_ms: float = Field(500.0, gt=0, description="frame age at which a command is no longer useful")
    actions: Path | None = None  # None: the package's config/actions.yaml
    instruction: str | None = None  # None: the engine's default instruction
    system: str | None = None
    mode: Literal["prefix", "window"] = "prefix"
    window_frames: int = Field(4, ge=1)
    max_new_tokens: int | None = Field(None, ge=1, description="decode cap per action; None: the longest action "
                                       "the vocabulary can spell (ActionSpec.longest_text) and its end token")
    jump_forward: bool = True
    safety: dict[str, float] = Field(default_factory=dict,
                                     description="overrides of the action file's safety limits (e.g. max_linear_x)")

    @model_validator(mode="after")
    def _compile_needs_torch(self) -> "AgentConfig":
        if self.compile and self.backend != "torch":
            raise ValueError(f"compile applies to the torch backend only (backend is {self.backend}: "
                             "its engine is compiled when built)")
        return self


@dataclass
class ActResult:
    status: Literal["ok", "fallback", "dropped_stale", "bad_frame"]
    action: dict[str, Any] | None = None
    twist: dict[str, float] | None = None  # None: publish nothing for this frame
    text: str = ""
    timings_ms: dict[str, float] = field(default_factory=dict)
    decode_steps: int = 0
    free_tokens: int = 0
    error: str | None = None
    deadline_hit: bool = False

    def to_json(self, **extra) -> str:
        return json.dumps({"status": self.status, "action": self.action, "twist": self.twist, "text": self.text,
                           "timings_ms": {k: round(v, 3) for k, v in self.timings_ms.items()},
                           "decode_steps": self.decode_steps, "error": self.error, **extra})


class Agent:
    def __init__(self, config: AgentConfig | None = None):
        self.config = config = config or AgentConfig()
        self.spec = load_action_spec(config.actions)  # a bad action file fails before the weights load
        # the decode cap: by default the longest action the vocabulary can spell and its end token, so none is cut
        longest = self.spec.longest_text() + 1
        self.max_new_tokens = config.max_new_tokens or longest
        if self.max_new_tokens < longest:
            log.warning(f"max_new_tokens {self.max_new_tokens} is shorter than the longest action ({longest} tokens at "
                        f"most): longer ones are cut and fall back")
        self.engine = load_engine(config.engine, config.backend, config.device,
                                  resolve_dtype(config.dtype, config.device))
        defaults = self.engine.agent_defaults
        self.image_tokens = config.image_tokens or defaults.get("image_tokens", 280)
        frames_kept = 1 if config.mode == "prefix" else config.window_frames
        max_prefix = defaults.get("max_prefix", 256)
        max_context = defaults.get("max_context", 1024) * frames_kept
        needed = max_prefix + frames_kept * (max_chunk(self.image_tokens) + self.max_new_tokens)
        if config.backend == "torch":
            # the torch model's cache is allocated here, so it makes room after the prompt for the frames it keeps
            # and their actions at any image budget
            max_context = max(max_context, needed)
        elif needed > max_context:  # a compiled engine's cache was sized when it was built
            raise EngineError(f"{self.image_tokens} image tokens and actions of up to {self.max_new_tokens} tokens "
                              f"need a context of {needed} positions here ({config.mode} mode); engine "
                              f"{config.engine} was built for {max_context}: use fewer image tokens, or rebuild it "
                              f"with `gemma4-agent build-engine ... --max-context {-(-needed // frames_kept)}`")
        self.session = StreamingSession(
            self.engine.model, self.engine.prompts,
            SessionConfig(mode=config.mode, image_tokens=self.image_tokens, max_new_tokens=self.max_new_tokens,
                          window_frames=config.window_frames, max_prefix=max_prefix, max_context=max_context,
                          compile=config.compile))
        vocab = self.engine.model.config.text_config.vocab_size
        self.selector = GrammarSelector(self.spec, self.engine.tokenizer, vocab_size=vocab,
                                        jump_forward=config.jump_forward)
        self.parser = ActionParser(self.spec, logger=log)
        self.safety = SafetyFilter(self.spec.safety)
        self.set_safety(**config.safety)
        self.system = config.system if config.system is not None else defaults.get("system", "")
        self.instruction = ""
        self.set_instruction(config.instruction or defaults.get("instruction", "go to the red ball"))
        if config.compile:
            self.session.warm_up(self.selector)

    def check_instruction(self, instruction: str) -> str:
        """The instruction as set_instruction takes it. Raises where set_instruction would refuse it: ValueError
        (empty), engine.kv_cache.CacheFull (too long for the engine's prompt cache). Changes nothing."""
        instruction = instruction.strip()
        if not instruction:
            raise ValueError("instruction must not be empty")
        self.session.prefix_ids_for(instruction, self.system)
        return instruction

    def set_instruction(self, instruction: str) -> None:
        """Change the task; the prefix is recomputed once. One refused (check_instruction) leaves the task before."""
        instruction = self.check_instruction(instruction)
        self.session.set_prefix(instruction, self.system)
        self.instruction = instruction

    def set_safety(self, **limits: float) -> None:
        """Change safety limits (names of the action file's `safety` block); validated, all or nothing."""
        current = self.safety.limits
        self.safety.limits = type(current).model_validate({**current.model_dump(), **limits})

    def reset_motion(self) -> None:
        """Forget the last command (the acceleration limit starts again from rest), e.g. after a manual stop."""
        self.safety.reset()

    def act(self, rgb: np.ndarray, stamp_s: float | None = None, now_s: float | None = None) -> ActResult:
        """Decide a command for one frame. Never raises for a bad frame: returns status bad_frame.

        stamp_s: capture time of the frame; now_s: current time on the same clock (default: wall
        clock). A frame older than the budget is dropped; the decode stops at the budget and the
        fallback action is used."""
        now = time.time() if now_s is None else now_s
        age_ms = 0.0 if stamp_s is None else (now - stamp_s) * 1e3
        if age_ms > self.config.budget_ms:
            return ActResult("dropped_stale", error=f"frame is {age_ms:.0f} ms old (budget {self.config.budget_ms:.0f} ms)")
        if not (isinstance(rgb, np.ndarray) and rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3
                and rgb.shape[0] > 0 and rgb.shape[1] > 0):
            return ActResult("bad_frame", error=f"expected RGB uint8 [H, W, 3], got {getattr(rgb, 'dtype', type(rgb))} "
                                                f"{getattr(rgb, 'shape', '')}")
        deadline = time.monotonic() + (self.config.budget_ms - age_ms) / 1e3
        step = self.session.step(rgb, self.selector, deadline)
        text = self.engine.tokenizer.decode(step.tokens, skip_special_tokens=False)
        parsed = self.parser.parse(text)
        ok = parsed.ok and not step.deadline_hit
        action = parsed.action if ok else self.parser.fallback_action()
        error = parsed.error if not parsed.ok else ("deadline reached during decode" if step.deadline_hit else None)
        out = self.safety.step(action_to_twist(action, self.spec), now, valid=ok)
        return ActResult("ok" if ok else "fallback", action, out.twist, text, step.timings_ms, step.decode_steps,
                         step.free_tokens, error, step.deadline_hit)

    def watchdog(self, now_s: float | None = None) -> dict[str, float] | None:
        """A zero command when no valid command came for command_timeout_s, else None."""
        out = self.safety.check(time.time() if now_s is None else now_s)
        return out.twist if out.watchdog else None
