"""bench/bench_scale.py's model writer at toy size: the folder transformers would write, made shard by shard.

The 8B model of the scale benchmark must be written without ever holding it whole; here a 2-layer model
sharded into 3 files shows that only one shard's tensors are alive at a time (their lifetimes are
watched), that the index lists every tensor in the shard that holds it, and that transformers'
``from_pretrained`` loads the folder into exactly the tensors the seeded generator makes.
"""
from __future__ import annotations

import json
import sys
import weakref
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_scale  # noqa: E402

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOY_LLAMA = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=256, tie_word_embeddings=False)
TOY_QWEN = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=128, vocab_size=256, tie_word_embeddings=True)


class Lifetimes:
    """The bytes of the writer's tensors alive at once, at most (each tensor's end seen by weakref)."""

    def __init__(self):
        self.alive, self.peak, self.made = 0, 0, []

    def __call__(self, name, tensor):
        n = tensor.numel() * tensor.element_size()
        self.alive += n
        self.peak = max(self.peak, self.alive)
        self.made.append(name)
        weakref.finalize(tensor, self._gone, n)

    def _gone(self, n):
        self.alive -= n


def test_sharded_toy_model_is_written_one_shard_at_a_time(tmp_path):
    from safetensors import safe_open

    cfg = bench_scale.make_config("LlamaConfig", TOY_LLAMA, "float32")
    from huggingface_hub import split_torch_state_dict_into_shards

    meta = bench_scale.meta_state(cfg)
    total = sum(t.numel() * 4 for t in meta.values())
    shard_mb = next(mb for mb in (total / d / 1e6 for d in (3.0, 2.8, 2.6, 2.4, 2.2, 3.2, 3.4))
                    if len(split_torch_state_dict_into_shards(meta, max_shard_size=f"{mb}MB").filename_to_tensors) == 3)
    watch = Lifetimes()
    folder = tmp_path / "toy"
    info = bench_scale.write_model(folder, cfg, shard_mb=shard_mb, on_tensor=watch)

    index = json.loads((folder / bench_scale.INDEX).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) == 3 and info["files"] == shards and info["sharded"]
    assert index["metadata"]["total_size"] == total  # the tensors' bytes, as transformers records them
    names = set(bench_scale.meta_state(cfg))
    assert set(index["weight_map"]) == names and sorted(watch.made) == sorted(names)
    sizes = {}
    for s in shards:
        with safe_open(str(folder / s), framework="pt") as f:
            keys = set(f.keys())
            sizes[s] = sum(f.get_tensor(k).numel() * 4 for k in keys)
        assert keys == {k for k, v in index["weight_map"].items() if v == s}
    # never more alive than the largest shard: the model was never held whole
    assert watch.peak <= max(sizes.values()) < total
    assert watch.alive == 0

    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    state = model.state_dict()
    assert set(state) == names
    for k, v in state.items():
        assert torch.equal(v, bench_scale.tensor_for(k, tuple(v.shape), v.dtype)), k
    check = bench_scale.check_folder(folder)
    assert check["shards"] == 3 and check["tensors"] == len(names) and check["matches_generator"]


def test_tied_embeddings_are_stored_once_in_one_file(tmp_path):
    from safetensors import safe_open

    cfg = bench_scale.make_config("Qwen2Config", TOY_QWEN, "bfloat16")
    folder = tmp_path / "tied"
    info = bench_scale.write_model(folder, cfg, shard_mb=None)
    assert info["files"] == ["model.safetensors"] and not (folder / bench_scale.INDEX).exists()
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
    assert "lm_head.weight" not in keys and "model.layers.0.self_attn.q_proj.bias" in keys
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    emb = model.model.embed_tokens.weight
    assert torch.equal(emb, bench_scale.tensor_for("model.embed_tokens.weight", tuple(emb.shape), torch.bfloat16))
    # a folder written again is the same bytes (seeded per tensor)
    again = bench_scale.write_model(tmp_path / "again", cfg, shard_mb=None)
    assert (folder / "model.safetensors").read_bytes() == (tmp_path / "again" / "model.safetensors").read_bytes()
    assert again["parameters"] == info["parameters"]
