"""The streaming engine: a static KV cache reused from frame to frame."""
from .kv_cache import StaticKVCache
from .session import SessionConfig, StepResult, StreamingSession

__all__ = ["StaticKVCache", "SessionConfig", "StepResult", "StreamingSession"]
