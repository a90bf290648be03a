import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from stablelm_fast import LLM, SamplingParams


def _copy(src: str, dst) -> str:
    shutil.copytree(src, dst)
    return str(dst)


def _greedy(model_dir: str, **kw) -> list[int]:
    llm = LLM(model_dir, dtype="float32", backend="torch", num_kv_blocks=32, **kw)
    return llm.generate({"prompt_token_ids": [5, 6, 7, 8]}, SamplingParams(temperature=0, max_tokens=6,
                                                                            ignore_eos=True))[0].outputs[0].token_ids


def test_sharded_checkpoint_with_index(tiny_model, tmp_path):
    model_dir = _copy(tiny_model, tmp_path / "sharded")
    tensors = load_file(os.path.join(model_dir, "model.safetensors"))
    os.remove(os.path.join(model_dir, "model.safetensors"))
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for fname, part in shards.items():
        save_file({n: tensors[n] for n in part}, os.path.join(model_dir, fname))
        weight_map.update({n: fname for n in part})
    with open(os.path.join(model_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    assert _greedy(model_dir) == _greedy(tiny_model)


def test_pickle_only_checkpoint_is_refused(tiny_model, tmp_path):
    model_dir = _copy(tiny_model, tmp_path / "pickled")
    os.remove(os.path.join(model_dir, "model.safetensors"))
    with open(os.path.join(model_dir, "pytorch_model.bin"), "wb") as f:
        f.write(b"not loaded, never unpickled")
    with pytest.raises(ValueError, match="safetensors"):
        LLM(model_dir, dtype="float32", backend="torch")


@pytest.mark.parametrize("change,match", [
    ("missing", "missing tensor 'model.layers.1.mlp.down_proj.weight'"),
    ("unexpected", "unexpected tensor 'model.layers.0.extra.weight'"),
    ("misshapen", "tensor 'model.norm.weight' in model.safetensors has shape"),
])
def test_bad_tensors_are_named(tiny_model, tmp_path, change, match):
    model_dir = _copy(tiny_model, tmp_path / change)
    path = os.path.join(model_dir, "model.safetensors")
    tensors = load_file(path)
    if change == "missing":
        del tensors["model.layers.1.mlp.down_proj.weight"]
    elif change == "unexpected":
        tensors["model.layers.0.extra.weight"] = torch.zeros(3)
    else:
        tensors["model.norm.weight"] = torch.zeros(7)
    save_file(tensors, path)
    with pytest.raises(ValueError, match=match):
        LLM(model_dir, dtype="float32", backend="torch")


def test_dummy_load_format_needs_only_config(tiny_model, tmp_path):
    model_dir = _copy(tiny_model, tmp_path / "dummy")
    os.remove(os.path.join(model_dir, "model.safetensors"))
    llm = LLM(model_dir, load_format="dummy", dtype="bfloat16", backend="torch", num_kv_blocks=16)
    out = llm.generate({"prompt_token_ids": [5, 6, 7]}, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 4
    assert llm.engine.executor.model.model.layers[0].self_attn.qkv_proj.weight.dtype == torch.bfloat16


def test_dtype_conversion_at_load(tiny_model):
    llm = LLM(tiny_model, dtype="bfloat16", backend="torch", num_kv_blocks=16)
    w = llm.engine.executor.model.model.layers[0].mlp.gate_up_proj.weight
    ref = load_file(os.path.join(tiny_model, "model.safetensors"))["model.layers.0.mlp.up_proj.weight"]
    assert w.dtype == torch.bfloat16
    torch.testing.assert_close(w[w.shape[0] // 2:], ref.to(torch.bfloat16))


def test_bad_constructor_values(tiny_model):
    with pytest.raises(ValueError, match="dtype"):
        LLM(tiny_model, dtype="int8")
    with pytest.raises(ValueError, match="backend"):
        LLM(tiny_model, backend="tpu")
    with pytest.raises(ValueError, match="load_format"):
        LLM(tiny_model, load_format="pt")
    with pytest.raises(ValueError, match="max_model_len"):
        LLM(tiny_model, max_model_len=10 ** 6)


def test_embedding_table_stays_in_the_checkpoint_file(tiny_model, tmp_path):
    """A bf16 checkpoint run in bf16 on the CPU: the embedding is a view of the mapped file (no copy, so only the
    rows of tokens met become resident), with the same tokens as a run that copies it (fp32 file, converted)."""
    model_dir = _copy(tiny_model, tmp_path / "bf16")
    path = os.path.join(model_dir, "model.safetensors")
    save_file({n: t.to(torch.bfloat16) for n, t in load_file(path).items()}, path)
    runs = {}
    for name, src in (("mapped", model_dir), ("copied", tiny_model)):
        llm = LLM(src, dtype="bfloat16", backend="torch", num_kv_blocks=16)
        table = llm.engine.executor.model.model.embed_tokens.weight
        runs[name] = (table.untyped_storage().nbytes(), table.numel() * table.element_size(), llm.generate(
            {"prompt_token_ids": [5, 6, 7, 8]}, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
        )[0].outputs[0].token_ids)
        llm.shutdown()
    assert runs["mapped"][0] == os.path.getsize(path)  # the storage is the whole mapped file
    assert runs["copied"][0] == runs["copied"][1]  # an fp32 file in a bf16 model: converted into its own memory
    assert runs["mapped"][2] == runs["copied"][2]


def test_vocab_parallel_embedding_maps_whole_parts_and_pads_the_last(tmp_path):
    from stablelm_fast.layers.embedding import VocabEmbedding
    from stablelm_fast.layers.parallel import TPInfo
    from stablelm_fast.layers.weights import CheckpointTensor
    from stablelm_fast.loader import file_mapper

    path = str(tmp_path / "e.safetensors")
    table = torch.arange(7 * 3, dtype=torch.float32).reshape(7, 3)
    save_file({"emb": table}, path)
    mapper = file_mapper(path)
    loaded = CheckpointTensor((7, 3), lambda: table, lambda d, a, b: table[a:b], lambda: mapper("emb"))
    for rank, mapped in ((0, True), (1, False)):  # parts of 4 rows: rank 1 holds 3 rows and a zero padding row
        emb = VocabEmbedding(7, 3, TPInfo(rank, 2))
        emb.weight.weight_loader(emb.weight, loaded)
        assert (emb.weight.untyped_storage().nbytes() == os.path.getsize(path)) == mapped
        want = torch.cat([table, torch.zeros(1, 3)])[4 * rank: 4 * rank + 4]
        torch.testing.assert_close(emb.weight.data, want)
    assert file_mapper(path)("missing") is None
