"""Model configuration: pydantic models read from a checkpoint's `config.json` (model_type gemma4_unified).

Accepts both layouts transformers writes for per-layer overrides: the released checkpoint's
`global_head_dim` / `num_global_key_value_heads`, and `save_pretrained`'s `per_layer_config`.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..errors import one_line

PRESETS_DIR = Path(__file__).parent / "presets"
SLIDING, FULL = "sliding_attention", "full_attention"
# soft tokens a frame may become (the merged-patch grids the model was trained with); every config and CLI takes these
ImageTokens = Literal[70, 140, 280, 560, 1120]
IMAGE_TOKEN_COUNTS = get_args(ImageTokens)


class RopeParameters(BaseModel):
    model_config = ConfigDict(extra="ignore")
    rope_type: Literal["default", "proportional"] = "default"
    rope_theta: float = 10_000.0
    partial_rotary_factor: float = 1.0


class LayerSpec(BaseModel):
    """What one decoder layer needs to know about itself."""

    layer_type: Literal["sliding_attention", "full_attention"]
    head_dim: int
    num_kv_heads: int
    k_eq_v: bool
    rope: RopeParameters


class TextConfig(BaseModel):
    model_config = ConfigDict(extra="ignore")
    vocab_size: int = 262_144
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int = 256
    global_head_dim: int | None = None
    num_global_key_value_heads: int | None = None
    per_layer_config: dict[str, dict] | None = None
    attention_k_eq_v: bool = False
    attention_bias: bool = False
    hidden_activation: Literal["gelu_pytorch_tanh"] = "gelu_pytorch_tanh"
    rms_norm_eps: float = 1e-6
    sliding_window: int = 1024
    final_logit_softcapping: float | None = None
    layer_types: list[Literal["sliding_attention", "full_attention"]] | None = None
    rope_parameters: dict[str, RopeParameters] = Field(
        default_factory=lambda: {
            SLIDING: RopeParameters(rope_type="default", rope_theta=10_000.0),
            FULL: RopeParameters(rope_type="proportional", rope_theta=1_000_000.0, partial_rotary_factor=0.25),
        }
    )
    use_bidirectional_attention: Literal["vision", "all"] | None = "vision"
    num_kv_shared_layers: int = 0
    max_position_embeddings: int = 131_072
    pad_token_id: int = 0
    eos_token_id: int | list[int] = 1
    bos_token_id: int = 2

    @model_validator(mode="after")
    def _check(self) -> "TextConfig":
        if self.layer_types is None:  # transformers' default: five sliding, then one full
            self.layer_types = [SLIDING if (i + 1) % 6 else FULL for i in range(self.num_hidden_layers)]
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers")
        self.layer_types[-1] = FULL  # transformers forces the last layer to full attention
        if self.num_kv_shared_layers:
            raise ValueError("num_kv_shared_layers > 0 (KV sharing across layers) is not supported")
        if self.attention_bias:
            raise ValueError("attention_bias=True is not supported (no Gemma 4 checkpoint uses it)")
        if self.use_bidirectional_attention == "all":
            raise ValueError("use_bidirectional_attention='all' (encoder mode) is not supported")
        return self

    def layer(self, index: int) -> LayerSpec:
        layer_type = self.layer_types[index]
        head_dim, kv_heads = self.head_dim, self.num_key_value_heads
        if self.per_layer_config is not None:
            override = self.per_layer_config.get(str(index), {})
            head_dim = override.get("head_dim", head_dim)
            kv_heads = override.get("num_key_value_heads", kv_heads)
        elif layer_type == FULL:
            head_dim = self.global_head_dim or 512
            if self.attention_k_eq_v and self.num_global_key_value_heads is not None:
                kv_heads = self.num_global_key_value_heads
        return LayerSpec(
            layer_type=layer_type,
            head_dim=head_dim,
            num_kv_heads=kv_heads,
            k_eq_v=self.attention_k_eq_v and layer_type == FULL,
            rope=self.rope_parameters[layer_type],
        )

    @property
    def layers(self) -> list[LayerSpec]:
        return [self.layer(i) for i in range(self.num_hidden_layers)]


class VisionConfig(BaseModel):
    model_config = ConfigDict(extra="ignore")
    patch_size: int = 16
    pooling_kernel_size: int = 3
    mm_embed_dim: int = 3840
    mm_posemb_size: int = 1120
    output_proj_dims: int = 3840
    rms_norm_eps: float = 1e-6

    @property
    def model_patch_size(self) -> int:
        return self.patch_size * self.pooling_kernel_size

    @property
    def patch_dim(self) -> int:
        return self.model_patch_size**2 * 3


class ModelConfig(BaseModel):
    """The whole `config.json` of a gemma4_unified checkpoint (audio settings are ignored)."""

    model_config = ConfigDict(extra="ignore")
    model_type: Literal["gemma4_unified"]
    text_config: TextConfig
    vision_config: VisionConfig
    boi_token_id: int = 255_999
    eoi_token_id: int = 258_882
    image_token_id: int = 258_880
    tie_word_embeddings: bool = True

    @model_validator(mode="after")
    def _check(self) -> "ModelConfig":
        if not self.tie_word_embeddings:
            raise ValueError("untied LM head is not supported (Gemma 4 ties it to the embedding)")
        return self

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no model config at {path}")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object (a model config), got a {type(data).__name__}")
        if data.get("model_type") != "gemma4_unified":
            raise ValueError(f"{path}: model_type is {data.get('model_type')!r}, expected 'gemma4_unified'")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:  # one line naming the file and the field, for every caller
            raise ValueError(f"{path}: {one_line(exc)}") from exc

    @classmethod
    def preset(cls, name: str = "gemma4-12b") -> "ModelConfig":
        return cls.from_json(PRESETS_DIR / f"{name}.json")

    @classmethod
    def resolve(cls, path_or_preset: str | Path) -> "ModelConfig":
        """A config.json, or a checkpoint folder holding one, where the path exists; otherwise a preset by name."""
        if Path(path_or_preset).exists():
            return cls.from_json(path_or_preset)
        presets = sorted(f.stem for f in PRESETS_DIR.glob("*.json"))
        if str(path_or_preset) not in presets:
            raise FileNotFoundError(f"{path_or_preset}: no such config.json or checkpoint folder, and not a preset "
                                    f"({', '.join(presets)})")
        return cls.preset(str(path_or_preset))

    def fingerprint(self) -> str:
        """A short hash of everything that shapes the network (engine manifests pin it)."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]
