"""INT4 weight-only quantization: q4_0 (GGUF-exact) and awq-g128, packed-kernel linear layers,
quantize CLI, quality report. See docs/INT4.md."""
from .int4 import (SCHEMES, Int4Embedding, Int4Linear, dequantize, int4_backend, pack_nibbles, prepare_quantized_model,
                   quantize_asymmetric, quantize_model, quantize_q4_0, save_quantized, to_device_kernel, unpack_nibbles)

__all__ = ["SCHEMES", "Int4Embedding", "Int4Linear", "dequantize", "int4_backend", "pack_nibbles",
           "prepare_quantized_model", "quantize_asymmetric", "quantize_model", "quantize_q4_0", "save_quantized",
           "to_device_kernel", "unpack_nibbles"]
