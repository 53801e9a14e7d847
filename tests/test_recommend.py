"Rules, fit guarantees and bad input of vrnx_nb.recommend (configs only: no weights are loaded)."
import pytest
import vrnx_nb.recommend as rec
from vrnx_nb.memory import estimate_memory
from vrnx_nb.recommend import HEADROOM, Strategy, main_recommend, recommend

BUDGETS = [4, 8, 16, 24, 48, 80]
MODELS = ["smollm2-135m", "llama-2-7b", "mistral-7b", "llama-3-70b"]

@pytest.mark.parametrize("model", MODELS)
def test_never_recommends_what_does_not_fit(model):
    for n in (10, 150, 700, 3000, 20000):
        for gb in BUDGETS:
            s = recommend(n, gb, model)
            again = estimate_memory(model, s.method, r=s.r, batch_size=s.batch_size, seq_len=s.seq_len,
                                    gradient_checkpointing=s.gradient_checkpointing, dtype="bfloat16")
            assert s.est_memory.total == pytest.approx(again.total)
            if s.feasible:
                assert s.est_memory.total <= gb * HEADROOM, (model, n, gb)
                assert s.batch_size * s.grad_accum == 16
            else:
                assert s.est_memory.total > gb * HEADROOM and "Not feasible" in s.reasons[-1]
                with pytest.raises(ValueError, match="No feasible strategy"): s.finetune_kwargs()

def test_matrix_regimes_on_a_large_budget():
    s = recommend(40, 80, "llama-2-7b")
    assert (s.method, s.r, s.augment, s.augment_target_count) == ("qlora", 8, True, 500)
    assert "< 100 examples" in s.reasons[0]
    s = recommend(99, 80, "llama-2-7b"); assert (s.r, s.augment_target_count) == (8, 990)
    s = recommend(100, 80, "llama-2-7b"); assert (s.method, s.r, s.augment, s.augment_target_count) == ("qlora", 16, True, 500)
    s = recommend(600, 80, "llama-2-7b"); assert (s.method, s.r, s.augment) == ("qlora", 16, False)
    s = recommend(1000, 80, "llama-2-7b"); assert (s.method, s.r) == ("lora", 16)   # full needs ~110 GB
    s = recommend(8000, 80, "llama-2-7b"); assert (s.method, s.r) == ("lora", 32)
    s = recommend(8000, 80, "smollm2-135m"); assert s.method == "full" and "full if it fits" in s.reasons[0]
    assert all(s.early_stopping_patience >= 1 for s in [s])

def test_budget_constrained_falls_back_to_4bit_and_says_so():
    s = recommend(3000, 16, "llama-2-7b")
    assert s.feasible and s.method == "qlora" and s.gradient_checkpointing
    assert any("fallback: 4-bit" in r for r in s.reasons) and any("fallback: gradient checkpointing" in r for r in s.reasons)

def test_impossible_request_explains():
    s = recommend(300, 8, "llama-2-70b")
    assert not s.feasible and "GB" in s.reasons[-1] and "smaller model" in s.reasons[-1]
    assert "NOT FEASIBLE" in repr(s) and "NOT FEASIBLE" in s._repr_markdown_()

def test_cpu_uses_system_ram(monkeypatch):
    monkeypatch.setattr(rec, "_system_ram_gb", lambda: 64.0)
    s = recommend(300, None, "smollm2-135m")
    assert (s.device, s.memory_budget_gb, s.method) == ("cpu", 64.0, "lora") and s.est_memory.assumptions["dtype"] == "float32"
    monkeypatch.setattr(rec, "_system_ram_gb", lambda: 2.0)
    s = recommend(300, 0, "smollm2-135m")
    assert s.feasible and s.est_memory.total <= 2.0 * HEADROOM

def test_kwargs_feed_finetune_and_augmentation():
    import inspect
    s = recommend(300, 24, "llama-2-7b")
    fk = s.finetune_kwargs()
    try:
        from vrnx_nb.training import finetune
        assert set(fk) <= set(inspect.signature(finetune).parameters)
    except ImportError: pass
    assert s.augment_kwargs() == {"target_count": 900}
    assert s.est_time_hours > 0

@pytest.mark.parametrize("args,msg", [((0, 24), "n_examples"), ((-5, 24), "n_examples"), ((2.5, 24), "n_examples"), ((True, 24), "n_examples"),
                                      ((100, -1), "gpu_memory_gb"), ((100, "24"), "gpu_memory_gb"), ((100, 24, "lama-2-7b"), "Did you mean 'llama-2-7b'")])
def test_bad_input(args, msg):
    with pytest.raises(ValueError, match=msg): recommend(*args)
    with pytest.raises(ValueError, match="seq_len"): recommend(100, 24, seq_len=0)

def test_cli(capsys):
    assert main_recommend(["--examples", "300", "--gpu-gb", "24", "--model", "llama-2-7b"]) == 0
    out = capsys.readouterr().out
    assert "qlora r=16" in out and "memory breakdown" in out and "weights" in out
    assert main_recommend(["--examples", "300", "--gpu-gb", "8", "--model", "llama-2-70b"]) == 1
    assert main_recommend(["--examples", "0", "--gpu-gb", "8"]) == 2
    assert main_recommend(["--examples", "10", "--model", "llama-9"]) == 2
    assert "Unknown model" in capsys.readouterr().err

def test_learning_rates_match_the_training_defaults():
    training = pytest.importorskip("vrnx_nb.training")
    assert rec.DEFAULT_LR == training.DEFAULT_LR
