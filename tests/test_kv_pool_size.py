"""How big the decode worker's KV pool is made: from the flags, else from the memory free on its
device, so that a model with long slots (Qwen2.5-Coder's 32k positions) starts with fewer slots
rather than failing to allocate 256 of them (hundreds of GiB)."""

from __future__ import annotations

import pytest
import torch

from splitserve.common.memory import host_available_bytes
from splitserve.common.model import kv_rings, layer_keys
from splitserve.common.model_config import model_config_from_dict
from splitserve.decode_worker.kv_pool import DEFAULT_SLOTS, allocate_pool, pool_slots, slot_bytes, slots_if_shorter

GiB = 2**30


def test_a_qwen_7b_slot_of_32k_tokens_takes_what_its_shape_says():
    cfg = model_config_from_dict(dict(
        model_type="qwen2", vocab_size=152064, max_position_embeddings=32768, hidden_size=3584, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4, intermediate_size=18944))
    assert slot_bytes(cfg, (32768,) * 28, torch.bfloat16) == 28 * 2 * 4 * 128 * 32768 * 2  # 1.75 GiB


def test_a_windowed_layer_keeps_only_its_ring_per_slot():
    starcoder2_15b = model_config_from_dict(dict(
        model_type="starcoder2", vocab_size=49152, max_position_embeddings=16384, hidden_size=6144,
        num_hidden_layers=40, num_attention_heads=48, num_key_value_heads=4, intermediate_size=24576,
        sliding_window=4096))
    keys = layer_keys(kv_rings(starcoder2_15b.windows, 16384), 16384)
    assert keys == (4096,) * 40
    assert slot_bytes(starcoder2_15b, keys, torch.bfloat16) == 40 * 2 * 4 * 128 * 4096 * 2  # 320 MiB
    assert layer_keys(kv_rings((4096,) * 40, 4096), 4096) == (4096,) * 40  # a window as long as the slot: no ring
    assert layer_keys(kv_rings((2047,) * 32, 4096), 4096) == (2048,) * 32  # Phi-3-mini-4k: one longer than its window
    assert layer_keys(kv_rings((0,) * 28, 32768), 32768) == (32768,) * 28
    # gpt-oss-20b: a window of 128 on every other layer; its slots of 131,072 keys take half the memory
    gpt_oss_20b = model_config_from_dict(dict(
        model_type="gpt_oss", vocab_size=201088, max_position_embeddings=131072, hidden_size=2880,
        num_hidden_layers=24, num_attention_heads=64, num_key_value_heads=8, head_dim=64, intermediate_size=2880,
        sliding_window=128, num_local_experts=32, experts_per_token=4))
    keys = layer_keys(kv_rings(gpt_oss_20b.windows, 131072), 131072)
    assert keys == (128, 131072) * 12
    assert slot_bytes(gpt_oss_20b, keys, torch.bfloat16) == 12 * (128 + 131072) * 2 * 8 * 64 * 2  # 3.0 GiB, not 6


def test_by_default_the_pool_takes_a_share_of_the_free_memory_up_to_the_default_slots():
    slot = int(1.75 * GiB)
    # an H100 with a 7B model loaded: 60 GiB free, 80% of it in 1.75 GiB slots
    assert pool_slots(slot, 32768, 60 * GiB, "cuda", 0, 0) == 27
    assert pool_slots(1 << 20, 2048, 60 * GiB, "cuda", 0, 0) == DEFAULT_SLOTS["cuda"]  # short slots: the cap
    assert pool_slots(1 << 20, 2048, 20 * GiB, "cpu", 0, 0) == DEFAULT_SLOTS["cpu"]
    assert pool_slots(slot, 32768, 20 * GiB, "cpu", 0, 0) == 5  # half of the host's free memory
    with pytest.raises(ValueError, match="holds no KV slot of 32768 tokens.*--max-total-tokens"):
        pool_slots(slot, 32768, 2 * GiB, "cuda", 0, 0)


def test_a_pool_of_few_long_slots_says_how_many_shorter_ones_would_fit():
    assert slots_if_shorter(27, (32768,) * 28, "cuda") == 108  # Qwen2.5-Coder-7B on an H100: 8k-token slots
    assert slots_if_shorter(100, (32768,) * 28, "cuda") == DEFAULT_SLOTS["cuda"]
    assert slots_if_shorter(DEFAULT_SLOTS["cpu"], (32768,) * 28, "cpu") == 0  # as many as ever
    assert slots_if_shorter(5, (8192,) * 28, "cpu") == 0  # no longer than the suggestion
    assert slots_if_shorter(10, (128, 131072) * 12, "cuda") == 157  # gpt-oss: its rings as long in either


def test_the_flags_set_the_pool():
    slot = 1 << 30
    assert pool_slots(slot, 8192, 100 * GiB, "cuda", 0, 10 * 1024) == 10  # the budget holds 10
    assert pool_slots(slot, 8192, 100 * GiB, "cuda", 4, 10 * 1024) == 4  # --num-slots, under the budget
    assert pool_slots(slot, 8192, 100 * GiB, "cuda", 90, 0) == 90  # --num-slots alone: all of them, if they fit
    with pytest.raises(ValueError, match="90 KV slots of 8192 tokens need 92,160 MiB; 10,240 MiB is free"):
        pool_slots(slot, 8192, 10 * GiB, "cuda", 90, 0)
    with pytest.raises(ValueError, match="10 KV slots of 8192 tokens need 10,240 MiB; 1,024 MiB is free"):
        pool_slots(slot, 8192, 1 * GiB, "cuda", 0, 10 * 1024)
    with pytest.raises(ValueError, match="--kv-cache-memory-mb 512 holds no KV slot"):
        pool_slots(slot, 8192, 100 * GiB, "cuda", 0, 512)


def test_the_host_s_free_memory_is_its_container_s_where_a_limit_is_set(tmp_path):
    proc, cgroup = tmp_path / "proc", tmp_path / "cgroup"
    proc.mkdir()
    (proc / "meminfo").write_text("MemTotal:       65536000 kB\nMemAvailable:   32000000 kB\n")
    assert host_available_bytes(proc, cgroup) == 32000000 * 1024  # no cgroup files
    (cgroup / "memory").mkdir(parents=True)
    (cgroup / "memory/memory.limit_in_bytes").write_text("9223372036854771712\n")  # v1: no limit
    (cgroup / "memory/memory.usage_in_bytes").write_text(f"{GiB}\n")
    assert host_available_bytes(proc, cgroup) == 32000000 * 1024
    (cgroup / "memory.max").write_text(f"{8 * GiB}\n")  # v2, a pod's limit: 8 GiB, 3 used
    (cgroup / "memory.current").write_text(f"{3 * GiB}\n")
    assert host_available_bytes(proc, cgroup) == 5 * GiB
    (cgroup / "memory.max").write_text("max\n")
    assert host_available_bytes(proc, cgroup) == 32000000 * 1024
    assert 0 < host_available_bytes()  # this machine's


def test_the_pool_keeps_each_layers_keys_in_a_tensor_of_its_group():
    """Layers with as many keys per slot share a tensor; a prompt's K/V goes into each group in
    arithmetic runs of layers: one strided copy or NIXL read per run."""
    cfg = model_config_from_dict(dict(
        model_type="gemma3_text", vocab_size=256, max_position_embeddings=1024, hidden_size=64, num_hidden_layers=8,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=128, sliding_window=32,
        layer_types=["sliding_attention"] * 5 + ["full_attention"] + ["sliding_attention"] * 2))
    keys = layer_keys(kv_rings(cfg.windows, 512), 512)
    assert keys == (32,) * 5 + (512,) + (32,) * 2
    pool = allocate_pool(cfg, 3, keys, torch.float32, "cpu")
    (whole, whole_runs), (rings, ring_runs) = pool.groups
    assert whole.shape == (1, 2, 3, 2, 512, 16) and rings.shape == (7, 2, 3, 2, 32, 16)
    assert whole_runs == ((slice(5, 6, 1), slice(0, 1)),)
    assert ring_runs == ((slice(0, 5, 1), slice(0, 5)), (slice(6, 8, 1), slice(5, 7)))
    assert pool.flat.numel() == 3 * sum(keys) * 2 * 2 * 16
    assert [layer.shape for layer in pool.layers] == [(2, 3, 2, k, 16) for k in keys]
    assert pool.layers[6].data_ptr() == rings[5].data_ptr()  # the views are the groups'
    gpt_oss_like = allocate_pool(cfg, 1, (8, 64) * 4, torch.float32, "cpu")
    assert [g.runs for g in gpt_oss_like.groups] == [((slice(1, 8, 2), slice(0, 4)),), ((slice(0, 7, 2), slice(0, 4)),)]
