"""How big the decode worker's KV pool is made: from the flags, else from the memory free on its
device, so that a model with long slots (Qwen2.5-Coder's 32k positions) starts with fewer slots
rather than failing to allocate 256 of them (hundreds of GiB)."""

from __future__ import annotations

import pytest
import torch

from splitserve.common.memory import host_available_bytes
from splitserve.common.model import kv_rings, slot_keys
from splitserve.common.model_config import model_config_from_dict
from splitserve.decode_worker.kv_pool import DEFAULT_SLOTS, pool_slots, slot_bytes, slots_if_shorter

GiB = 2**30


def test_a_qwen_7b_slot_of_32k_tokens_takes_what_its_shape_says():
    cfg = model_config_from_dict(dict(
        model_type="qwen2", vocab_size=152064, max_position_embeddings=32768, hidden_size=3584, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4, intermediate_size=18944))
    assert slot_bytes(cfg, 32768, torch.bfloat16) == 28 * 2 * 4 * 128 * 32768 * 2  # 1.75 GiB


def test_a_model_with_one_window_on_every_layer_keeps_only_that_ring_per_slot():
    starcoder2_15b = model_config_from_dict(dict(
        model_type="starcoder2", vocab_size=49152, max_position_embeddings=16384, hidden_size=6144,
        num_hidden_layers=40, num_attention_heads=48, num_key_value_heads=4, intermediate_size=24576,
        sliding_window=4096))
    keys = slot_keys(kv_rings(starcoder2_15b.windows, 16384), 16384)
    assert keys == 4096 and slot_bytes(starcoder2_15b, keys, torch.bfloat16) == 40 * 2 * 4 * 128 * 4096 * 2  # 320 MiB
    assert slot_keys(kv_rings((4096,) * 40, 4096), 4096) == 4096  # a window as long as the slot: no ring
    assert slot_keys(kv_rings((2047,) * 32, 4096), 4096) == 2048  # Phi-3-mini-4k: a ring one longer than its window
    assert slot_keys(kv_rings((128, 0) * 12, 131072), 131072) == 131072  # gpt-oss: half its layers see every key
    assert slot_keys(kv_rings((0,) * 28, 32768), 32768) == 32768


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
    assert slots_if_shorter(27, 32768, "cuda") == 108  # Qwen2.5-Coder-7B on an H100: 8k-token slots
    assert slots_if_shorter(100, 32768, "cuda") == DEFAULT_SLOTS["cuda"]
    assert slots_if_shorter(DEFAULT_SLOTS["cpu"], 32768, "cpu") == 0  # as many as ever
    assert slots_if_shorter(5, 8192, "cpu") == 0  # no longer than the suggestion


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
