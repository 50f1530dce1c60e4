"""The Gemma 4 Unified model: config, network, checkpoint loader, tokenizer/prompt, frame preprocessing."""
from .config import ModelConfig, TextConfig, VisionConfig
from .loader import CheckpointError, load_model
from .network import Gemma4, build_model
from .preprocess import preprocess_frame

__all__ = ["ModelConfig", "TextConfig", "VisionConfig", "CheckpointError", "load_model", "Gemma4", "build_model",
           "preprocess_frame"]
