"""Weight loading: safetensors only (single file or sharded with an index), memory-mapped, checked, then handed to
the model's parameters, which load (and shard) themselves.

This module knows the checkpoint: which tensors a StableLM checkpoint must have and their shapes (refusing missing,
unexpected, misshapen or duplicate tensors, and pickles). The model knows where each tensor goes
(`StableLM.load_weight`: packed-modules mapping, per-parameter weight loaders). Tensor parallelism: a weight loader
reads only its rank's slice of the memory-mapped tensor (safetensors' `get_slice`), so no rank materializes a whole
weight it does not own. After loading, each layer repacks its weights once (`process_weights_after_loading`).
"""

from __future__ import annotations

import glob
import json
import os
import re
import struct
import sys
from typing import Callable, Optional

import torch
from safetensors import safe_open

from stablelm_fast.config import ModelConfig
from stablelm_fast.layers.weights import CheckpointTensor, process_weights_after_loading
from stablelm_fast.quantization import QuantConfig, rewrite_expected_shapes

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def find_safetensors(model_dir: str) -> list[str]:
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        missing = [f for f in files if not os.path.isfile(os.path.join(model_dir, f))]
        if missing:
            raise ValueError(f"{index} names shard {missing[0]!r}, which is not in {model_dir!r}")
        return [os.path.join(model_dir, f) for f in files]
    files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    if files:
        return files
    pickles = [p for p in os.listdir(model_dir) if p.endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise ValueError(f"{model_dir!r} has only pickle weights ({pickles[0]}, ...): stablelm-fast loads safetensors "
                         f"only and never unpickles. Convert the checkpoint to *.safetensors first.")
    raise ValueError(f"no *.safetensors weights in {model_dir!r}")


def expected_hf_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name a StableLM checkpoint must have, with its shape."""
    h, i, d = config.hidden_size, config.intermediate_size, config.head_dim
    nq, nkv = config.num_attention_heads, config.num_key_value_heads
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (config.vocab_size, h),
        "model.norm.weight": (h,),
        "model.norm.bias": (h,),
    }
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, h)
    for layer in range(config.num_hidden_layers):
        p = f"model.layers.{layer}."
        shapes.update({
            p + "input_layernorm.weight": (h,), p + "input_layernorm.bias": (h,),
            p + "self_attn.q_proj.weight": (nq * d, h), p + "self_attn.k_proj.weight": (nkv * d, h),
            p + "self_attn.v_proj.weight": (nkv * d, h), p + "self_attn.o_proj.weight": (h, nq * d),
            p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h), p + "mlp.down_proj.weight": (h, i),
        })
        if config.use_qkv_bias:
            shapes.update({p + "self_attn.q_proj.bias": (nq * d,), p + "self_attn.k_proj.bias": (nkv * d,),
                           p + "self_attn.v_proj.bias": (nkv * d,)})
        if not config.use_parallel_residual:
            shapes.update({p + "post_attention_layernorm.weight": (h,), p + "post_attention_layernorm.bias": (h,)})
        if config.qk_layernorm:
            shapes.update({f"{p}self_attn.q_layernorm.norms.{k}.weight": (d,) for k in range(nq)})
            shapes.update({f"{p}self_attn.k_layernorm.norms.{k}.weight": (d,) for k in range(nkv)})
    return shapes


_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


def file_mapper(path: str) -> Callable[[str], Optional[torch.Tensor]]:
    """name -> that tensor of a safetensors file as a view of the file mapped privately (copy-on-write; pages are
    read from the page cache as they are touched and can be dropped again), or None where that cannot be done.
    The header is read and the file mapped on the first call only (most files are never asked)."""
    opened: dict = {}

    def mapped(name: str) -> Optional[torch.Tensor]:
        if not opened:
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                opened.update(data_start=8 + n, header=json.loads(f.read(n)))
        info = opened["header"].get(name)
        dtype = _DTYPES.get(info["dtype"]) if info else None
        if dtype is None or sys.byteorder != "little":
            return None
        start = opened["data_start"] + info["data_offsets"][0]
        size = dtype.itemsize
        if start % size:
            return None
        if "storage" not in opened:
            opened["storage"] = torch.UntypedStorage.from_file(path, False, os.path.getsize(path))
        return torch.empty(0, dtype=dtype).set_(opened["storage"], start // size, tuple(info["shape"]))
    return mapped


# Names HF checkpoints may carry that hold no weights of ours.
_IGNORED = re.compile(r"(rotary_emb\.inv_freq|\.masked_bias|\.attn\.bias)$")


def load_checkpoint(model_dir: str, config: ModelConfig, assign: Callable[[str, CheckpointTensor], None],
                    quant: QuantConfig | None = None) -> None:
    """Open every safetensors file memory-mapped, check names and shapes, and hand each tensor to `assign`
    as a CheckpointTensor (whose read_slice(dim, start, stop) reads only that slice from disk). quant: a
    pre-quantized (GPTQ / AWQ) checkpoint holds packed tensors instead of its linear weights."""
    from tqdm import tqdm

    expected = expected_hf_shapes(config)
    optional = rewrite_expected_shapes(expected, quant)
    seen: set[str] = set()
    # NOTE: disable=None shows the bar only on a terminal (not in logs, tests or worker processes' pipes).
    bar = tqdm(total=len(expected), desc="Loading weights", unit="tensor", disable=None, leave=False)
    for path in find_safetensors(model_dir):
        mapper = file_mapper(path)
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():
                if _IGNORED.search(name):
                    continue
                if name == "lm_head.weight" and config.tie_word_embeddings:
                    continue
                if name not in expected:
                    raise ValueError(f"unexpected tensor {name!r} in {os.path.basename(path)} "
                                     f"(not part of a StableLM checkpoint with this config.json)")
                sl = f.get_slice(name)
                shape = tuple(sl.get_shape())
                if shape != expected[name]:
                    raise ValueError(f"tensor {name!r} in {os.path.basename(path)} has shape {list(shape)}, "
                                     f"expected {list(expected[name])} from config.json")
                if name in seen:
                    raise ValueError(f"tensor {name!r} appears twice (again in {os.path.basename(path)})")
                seen.add(name)

                def read_slice(dim: int, start: int, stop: int, sl=sl, ndim=len(shape)) -> torch.Tensor:
                    index = tuple(slice(start, stop) if k == dim else slice(None) for k in range(ndim))
                    return sl[index]

                assign(name, CheckpointTensor(shape, lambda f=f, name=name: f.get_tensor(name), read_slice,
                                              lambda name=name: mapper(name)))
                bar.update(1)
    bar.close()
    missing = sorted(set(expected) - seen - optional)
    if missing:
        raise ValueError(f"checkpoint {model_dir!r} is missing tensor {missing[0]!r}"
                         + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))


def load_model(model: torch.nn.Module, model_dir: str | None, load_format: str, seed: int = 0) -> None:
    """Fill a freshly built StableLM: from the checkpoint (or random, load_format 'dummy'), then let every layer
    repack its weights for the backend, once."""
    if load_format == "dummy":
        model.init_dummy_weights(seed)
    else:
        if model_dir is None:
            raise ValueError(f"load_format {load_format!r} needs a model folder")
        load_checkpoint(model_dir, model.config, model.load_weight, getattr(model, "quant_config", None))
        model.tie_weights()
    process_weights_after_loading(model)
