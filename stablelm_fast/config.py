"""StableLM model configuration, read from a HF `config.json` in every spelling a hub checkpoint can have.

- `StableLmForCausalLM` (`model_type: stablelm`), with rotary settings either top level (`rope_theta`,
  `partial_rotary_factor`, older transformers) or in `rope_parameters` (newer transformers);
- the legacy `StableLMEpochForCausalLM` (`model_type: stablelm_epoch`, `rope_pct`, `norm_eps`) of stablelm-zephyr-3b.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch

SUPPORTED_ARCHITECTURES = ("StableLmForCausalLM", "StableLMEpochForCausalLM")

_DTYPES = {"float32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16,
           "float16": torch.float16, "half": torch.float16}


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 0.25
    layer_norm_eps: float = 1e-5
    use_qkv_bias: bool = False
    qk_layernorm: bool = False
    use_parallel_residual: bool = False
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    bos_token_id: int | None = None
    eos_token_id: list[int] = field(default_factory=list)
    torch_dtype: str = "bfloat16"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                             f"{self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads {self.num_key_value_heads}")
        if self.rotary_dim % 2 or not 0 < self.rotary_dim <= self.head_dim:
            raise ValueError(f"rotary dims {self.rotary_dim} (head_dim {self.head_dim} x partial_rotary_factor "
                             f"{self.partial_rotary_factor}) must be even and within the head")
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported (StableLM uses 'silu')")

    @classmethod
    def from_dict(cls, raw: dict) -> "ModelConfig":
        archs = raw.get("architectures") or []
        model_type = raw.get("model_type")
        if archs:
            unknown = [a for a in archs if a not in SUPPORTED_ARCHITECTURES]
            if unknown:
                raise ValueError(f"unsupported architecture {unknown[0]!r}: stablelm-fast runs "
                                 f"{' / '.join(SUPPORTED_ARCHITECTURES)}")
        elif model_type not in ("stablelm", "stablelm_epoch"):
            raise ValueError(f"unsupported model_type {model_type!r}: expected 'stablelm' or 'stablelm_epoch'")
        rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
            raise ValueError(f"rope type {rope.get('rope_type', rope.get('type'))!r} is not supported")
        rope_theta = rope.get("rope_theta", raw.get("rope_theta", 10000.0))
        partial = rope.get("partial_rotary_factor", raw.get("partial_rotary_factor", raw.get("rope_pct", 0.25)))
        eps = raw.get("layer_norm_eps", raw.get("norm_eps", 1e-5))
        eos = raw.get("eos_token_id")
        eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        num_heads = raw["num_attention_heads"]
        return cls(
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_hidden_layers=raw["num_hidden_layers"],
            num_attention_heads=num_heads,
            num_key_value_heads=raw.get("num_key_value_heads") or num_heads,
            max_position_embeddings=raw.get("max_position_embeddings", 4096),
            rope_theta=float(rope_theta),
            partial_rotary_factor=float(partial),
            layer_norm_eps=float(eps),
            use_qkv_bias=bool(raw.get("use_qkv_bias", False)),
            qk_layernorm=bool(raw.get("qk_layernorm", False)),
            use_parallel_residual=bool(raw.get("use_parallel_residual", False)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            hidden_act=raw.get("hidden_act", "silu"),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_id=eos_ids,
            torch_dtype=str(raw.get("torch_dtype") or raw.get("dtype") or "bfloat16"),
        )

    @classmethod
    def from_pretrained(cls, model_dir: str) -> "ModelConfig":
        path = os.path.join(model_dir, "config.json")
        if not os.path.isfile(path):
            raise ValueError(f"{model_dir!r} has no config.json: expected a HF-format StableLM folder")
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))


def resolve_dtype(dtype: str | torch.dtype, config: ModelConfig, device: torch.device) -> torch.dtype:
    """'auto' -> the checkpoint's dtype (float16 becomes bfloat16 on CPU, where fp16 GEMMs are slow)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        dtype = config.torch_dtype.replace("torch.", "")
        resolved = _DTYPES.get(dtype, torch.bfloat16)
        if device.type == "cpu" and resolved == torch.float16:
            return torch.bfloat16
        return resolved
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be 'auto', 'bfloat16', 'float16' or 'float32'; got {dtype!r}")
    return _DTYPES[dtype]


def resolve_device(device: str | torch.device = "auto", local_rank: int | None = None) -> torch.device:
    """'auto' -> CUDA if available, else CPU; 'cuda' needs a CUDA device. local_rank picks the GPU of a rank."""
    if isinstance(device, torch.device):
        return device
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda'; got {device!r}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device='cuda' but no CUDA device is available")
        return torch.device("cuda", local_rank) if local_rank is not None else torch.device("cuda")
    return torch.device("cpu")
