"Bad-input suite and first-principles checks of vrnx_nb.memory (configs only: no weights are loaded)."
import json
import pytest
from vrnx_nb.memory import (GB, METHODS, available_models, count_params, estimate_memory, load_config, memory_table,
                            trainable_params)

# Published parameter counts of the shipped configs (model cards / safetensors index totals).
PUBLISHED = {"llama-2-7b": 6_738_415_616, "llama-2-13b": 13_015_864_320, "llama-2-70b": 68_976_648_192,
             "llama-3-8b": 8_030_261_248, "llama-3-70b": 70_553_706_496, "mistral-7b": 7_241_732_096,
             "smollm2-135m": 134_515_008}

def test_shipped_configs_match_published_param_counts():
    assert set(PUBLISHED) <= set(available_models())
    for name, n in PUBLISHED.items(): assert count_params(name).total == n, name

def test_unknown_model_suggests_close_names():
    with pytest.raises(ValueError, match="Did you mean 'llama-3-8b'"): load_config("llama3-8b")
    with pytest.raises(ValueError, match="Unknown model 'gpt-17'"): estimate_memory("gpt-17", "lora")

@pytest.mark.parametrize("drop", ["hidden_size", "num_hidden_layers", "vocab_size", "model_type"])
def test_config_missing_fields(tmp_path, drop):
    d = json.loads(load_config("smollm2-135m").to_json_string()); d["model_type"] = "llama"
    d.pop(drop); (tmp_path/"config.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match=f"missing field.*{drop}"): estimate_memory(tmp_path, "lora")

def test_local_folder_and_dict_give_the_alias_numbers(tmp_path):
    d = json.loads((available_models() and load_config("mistral-7b").to_json_string()))
    (tmp_path/"config.json").write_text(json.dumps({**d, "model_type": "mistral"}))
    assert count_params(tmp_path).total == PUBLISHED["mistral-7b"]
    assert count_params({**d, "model_type": "mistral"}).total == PUBLISHED["mistral-7b"]
    with pytest.raises(ValueError, match="expected a config.json"): load_config(tmp_path/"nothing_here"/"config.json")

def test_hub_id_offline_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1"); monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ValueError, match="not in the local Hugging Face cache"): load_config("no-such-org/no-such-model")

@pytest.mark.parametrize("kw,msg", [
    (dict(batch_size=0), "batch_size"), (dict(batch_size=-2), "batch_size"), (dict(seq_len=0), "seq_len"),
    (dict(r=0), r"estimate_memory\.r: expected a positive integer, got 0"), (dict(r=2.5), "got 2.5"), (dict(batch_size=True), "batch_size"),
    (dict(method="prefix"), r"estimate_memory\.method: expected one of \['full', 'lora', 'qlora', 'adapter'\], got 'prefix'"),
    (dict(dtype="int3"), "dtype"), (dict(optimizer="lion"), "optimizer"), (dict(device="tpu"), "device"),
    (dict(overhead_gb=-1), r"estimate_memory\.overhead_gb: expected a number >= 0 or None, got -1"), (dict(model=3.5), "expected a name")])
def test_bad_arguments(kw, msg):
    args = {"model": "llama-2-7b", "method": "lora", **kw}
    with pytest.raises(ValueError, match=msg): estimate_memory(**args)

def test_bytes_per_parameter():
    n = PUBLISHED["llama-2-7b"]
    for dtype in ("bfloat16", "float32"):  # mixed precision 2+2+4(master)+8 and pure fp32 4+4+8: both 16 bytes/param
        e = estimate_memory("llama-2-7b", "full", dtype=dtype)  # gradients: the part not covered by freed activations
        assert abs((e.weights + e.gradients + e.activations + e.optimizer) * GB / n - 16) < 1e-9
    q = estimate_memory("llama-2-7b", "qlora", double_quant=True); q1 = estimate_memory("llama-2-7b", "qlora", double_quant=False)
    pc = count_params("llama-2-7b")
    assert abs(q.weights * GB - (pc.block_linear * (4 + 8/64 + 32/(64*256)) / 8 + (n - pc.block_linear) * 4)) < 1
    assert abs((q1.weights - q.weights) * GB - pc.block_linear * (32/64 - 8/64 - 32/(64*256)) / 8) < 1
    assert trainable_params(pc, "lora", 16) == 32 * 16 * (4*(4096+4096) + 3*(4096+11008))
    assert trainable_params(pc, "adapter", 16) == 32 * 2 * (2*4096*16 + 4096 + 16)
    assert trainable_params(pc, "lora", 8, ["q_proj", "v_proj"]) == 32 * 8 * 2 * (4096+4096)

def test_activations_scale_and_checkpointing():
    a = lambda **kw: estimate_memory("llama-2-7b", "lora", **kw).activations
    assert a(batch_size=8) == pytest.approx(2 * a(batch_size=4))
    assert a(batch_size=4, gradient_checkpointing=True) < a(batch_size=4) / 3
    assert estimate_memory("llama-3-8b", "full").activations > estimate_memory("llama-3-8b", "lora").activations \
        > estimate_memory("llama-3-8b", "adapter").activations

def test_memory_ordering_and_table():
    tot = {m: estimate_memory("llama-2-70b", m, batch_size=1, gradient_checkpointing=True).total for m in METHODS}
    assert tot["qlora"] < tot["adapter"] <= tot["lora"] < tot["full"]
    t = memory_table()
    assert list(t.paper_gb) == [112, 18, 6, 24, 1120, 180, 48, 240]
    assert (t.query("method == 'full'").ratio.between(0.9, 1.1)).all()
    assert "batch 1 x 512" in t.attrs["assumptions"]

def test_shipped_hub_ids_work_offline_and_bad_files_are_clear(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert count_params("meta-llama/Meta-Llama-3-8B").total == PUBLISHED["llama-3-8b"]
    assert count_params("SmolLM2-135M-Instruct").total == PUBLISHED["smollm2-135m"]
    bad = tmp_path/"config.json"; bad.write_text("{not json")
    with pytest.raises(ValueError, match="not a JSON config"): load_config(bad)
    bad.write_text('{"model_type": "no-such-arch", "hidden_size": 8}')
    with pytest.raises(ValueError, match="unknown model_type"): load_config(tmp_path)

def test_cpu_estimate_counts_the_freed_memory_glibc_keeps():
    from vrnx_nb.memory import HEAP_RETAINED, MMAP_THRESHOLD_MAX, heap_activation_bytes
    pc = count_params("smollm2-135m")
    kw = dict(batch_size=4, seq_len=256, dtype="float32")
    for m in METHODS:
        dflt = estimate_memory("smollm2-135m", m, device="cpu", **kw)
        rel = estimate_memory("smollm2-135m", m, device="cpu", allocator="release", **kw)
        n_t = len(pc.lora_targets()) // pc.n_layers if m in ("lora", "qlora") else 0
        assert dflt.retained == pytest.approx(HEAP_RETAINED[m] * heap_activation_bytes(pc, m, 16, n_t, 1024, 4) / GB)
        assert dflt.retained > 0 and rel.retained == 0 and dflt.total == pytest.approx(rel.total + dflt.retained)
        assert (dflt.weights, dflt.activations) == (rel.weights, rel.activations)  # only the allocator's part differs
        assert estimate_memory("smollm2-135m", m, device="cuda", **kw).retained == 0  # torch's caching allocator: overhead
        assert dflt.assumptions["allocator"] == "default" and "retained" in dflt.as_dict() and "retained" not in rel.as_dict()
    # every saved tensor of a 4 x 256 batch is heap-sized; at 8,192 tokens the intermediate-width ones (1536 x 8192 x 4
    # bytes = 48 MiB) are mapped apart and returned on free, so only the narrower ones count
    assert heap_activation_bytes(pc, "lora", 16, 7, 1024, 4) == 30 * 1024 * 4 * (6*576 + 4*1536 + 2*192 + 9 + 7*16)
    assert 1536 * 8192 * 4 >= MMAP_THRESHOLD_MAX > 576 * 8192 * 4
    assert heap_activation_bytes(pc, "lora", 16, 7, 8192, 4) == 30 * 8192 * 4 * (6*576 + 2*192 + 9 + 7*16)
    ck = heap_activation_bytes(pc, "lora", 16, 7, 1024, 4, gradient_checkpointing=True)
    assert ck == 30 * 1024 * 4 * 576 + 1024 * 4 * (6*576 + 4*1536 + 2*192 + 9 + 7*16)
    with pytest.raises(ValueError, match=r"estimate_memory\.allocator: expected one of \['default', 'release'\], got 'jemalloc'"):
        estimate_memory("smollm2-135m", "lora", device="cpu", allocator="jemalloc")

def test_cpu_qlora_estimate_holds_one_unpacked_weight_per_shape():
    "QLoRA on the CPU keeps one fp32 buffer per block-Linear shape (`share_4bit_buffers`): the estimate's weights add them."
    from pathlib import Path
    cfg = json.loads((Path(__file__).parents[1]/"vrnx_nb"/"model_configs"/"llama-3-8b.json").read_text())
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    kv = cfg["num_key_value_heads"] * h // cfg["num_attention_heads"]
    shapes = {(h, h), (h, kv), (h, i), (i, h)}  # q and o, k and v, gate and up, down
    kw = dict(batch_size=1, seq_len=128, dtype="float32", double_quant=False)
    cpu, gpu = (estimate_memory("llama-3-8b", "qlora", device=d, **kw) for d in ("cpu", "cuda"))
    assert cpu.weights - gpu.weights == pytest.approx(4 * sum(a * b for a, b in shapes) / GB)
    lora = [estimate_memory("llama-3-8b", "lora", device=d, **kw) for d in ("cpu", "cuda")]
    assert lora[0].weights == lora[1].weights  # nothing unpacked without 4-bit weights
