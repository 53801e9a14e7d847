"Rules, fit guarantees and bad input of vrnx_nb.recommend (configs only: no weights are loaded)."
import dataclasses, inspect
from collections import Counter
import pytest
import vrnx_nb.recommend as rec
import vrnx_nb.training as training
from vrnx_nb.memory import estimate_memory
from vrnx_nb.recommend import HEADROOM, SKEW_RATIO, SKEW_SHARE, Strategy, main_recommend, recommend
from vrnx_nb.tasks import load_task

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

@pytest.mark.parametrize("model", ["smollm2-135m", "llama-2-7b"])
def test_every_feasible_plan_stops_early(model):
    plans = [recommend(n, gb, model) for n in (10, 150, 700, 3000, 20000) for gb in (8, 24, 80)]
    feasible = [s for s in plans if s.feasible]
    assert len(feasible) >= 10
    for s in feasible:
        assert s.early_stopping_patience >= 1, s
        assert s.finetune_kwargs()["early_stopping_patience"] == s.early_stopping_patience
        assert any("early stopping on validation loss" in r for r in s.reasons)

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

def _finetune_accepts() -> set:
    "Keywords `finetune` takes: its own parameters and (through **kwargs) the TrainConfig fields."
    return set(inspect.signature(training.finetune).parameters) | {f.name for f in dataclasses.fields(training.TrainConfig)}

def test_kwargs_feed_finetune_and_augmentation():
    s = recommend(300, 24, "llama-2-7b")
    fk = s.finetune_kwargs()
    assert set(fk) <= set(inspect.signature(training.finetune).parameters) and "balance" not in fk
    assert s.augment_kwargs() == {"target_count": 900}
    assert s.est_time_hours > 0
    skewed = recommend(300, 24, "llama-2-7b", label_counts={"Other": 270, "Arbitration": 30})
    fk = skewed.finetune_kwargs()
    assert fk["balance"] == "oversample" and set(fk) <= _finetune_accepts()
    assert training.TrainConfig(**fk).balance == "oversample"

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
    assert rec.DEFAULT_LR == training.DEFAULT_LR

# --- label balancing ---
@pytest.mark.parametrize("counts,balance", [
    ({"a": 60, "b": 40}, None),                          # exactly 60%: not over
    ({"a": 61, "b": 39}, "oversample"),                  # 61%, 1.6x the rarest: the share alone
    ({"a": 30, "b": 30, "c": 30, "d": 10}, None),        # 30%, exactly 3x: not over
    ({"a": 31, "b": 30, "c": 29, "d": 10}, "oversample"),  # 31%, 3.1x: the ratio alone
    ({"a": 600, "b": 399, "c": 1}, "oversample"),          # 60% exactly, but 600x the rarest
    ({"a": 1, "b": 1, "c": 1}, None),
    ({"a": 7}, None),                                    # one label: nothing to balance
])
def test_balancing_thresholds_and_boundaries(counts, balance):
    s = recommend(100, 24, "smollm2-135m", label_counts=counts)
    assert s.balance == balance
    assert ("balance" in s.finetune_kwargs()) == (balance is not None)
    assert recommend(100, 24, "smollm2-135m", label_counts=Counter(counts)).balance == balance  # a Counter, as a dict
    line = [r for r in s.reasons if "balanc" in r]
    assert len(line) == 1, s.reasons
    if balance: assert line[0].startswith("Skewed labels:") and "oversample rare labels in training" in line[0]
    else: assert "balancing off" in line[0] or "nothing to balance" in line[0]

def test_balancing_follows_the_module_constants(monkeypatch):
    assert (SKEW_SHARE, SKEW_RATIO) == (0.6, 3.0)
    monkeypatch.setattr(rec, "SKEW_SHARE", 0.7)
    assert recommend(100, 24, "smollm2-135m", label_counts={"a": 65, "b": 35}).balance is None
    monkeypatch.setattr(rec, "SKEW_RATIO", 1.5)
    s = recommend(100, 24, "smollm2-135m", label_counts={"a": 65, "b": 35})
    assert s.balance == "oversample" and "over 70% of the examples or over 1.5x the rarest" in s.reasons[2]

def test_balancing_reason_names_the_numbers():
    s = recommend(100, 24, "smollm2-135m", label_counts=Counter(Other=91, Arbitration=8, Jurisdiction=1))
    assert ("Skewed labels: 'Other' is 91% of 100 examples (91 vs 1 for the rarest): oversample rare labels in training "
            "(balancing when one label is over 60% of the examples or over 3x the rarest)") in s.reasons
    assert "balance: oversample" in repr(s)
    s = recommend(100, 24, "smollm2-135m", label_counts={"yes": 55, "no": 45})
    assert "Labels balanced enough: 'yes' is 55% of 100 examples (55 vs 45 for the rarest): balancing off" in s.reasons[2]
    assert "balance:" not in repr(s)
    s = recommend(100, 24, "smollm2-135m", label_counts={"a": 9, "b": 0, "c": 1})
    assert s.balance == "oversample" and "'a' is 90% of 10 examples" in s.reasons[2] and "for ['b']" in s.reasons[2]
    assert not any("balanc" in r for r in recommend(100, 24, "smollm2-135m").reasons)  # no counts, no line

def test_balancing_on_the_real_legal_task():
    counts = load_task("legal", n_train=100).label_counts()
    top, big = counts.most_common(1)[0]
    assert top == "Other" and big / 100 > SKEW_SHARE
    s = recommend(100, 24, "smollm2-135m", label_counts=counts)
    assert s.balance == "oversample" and f"'Other' is {big}% of 100 examples ({big} vs 1 for the rarest)" in s.reasons[2]
    assert recommend(300, 8, "llama-2-70b", label_counts=counts).balance == "oversample"   # infeasible plans keep it too

@pytest.mark.parametrize("counts,msg", [(["a", "b"], "label_counts: expected a dict"), ({"a": 3, "b": -1}, r"label_counts\['b'\]"),
                                        ({"a": 2.5}, r"label_counts\['a'\]"), ({"a": True}, r"label_counts\['a'\]"),
                                        ({}, "no training examples"), ({"a": 0}, "no training examples")])
def test_bad_label_counts(counts, msg):
    with pytest.raises(ValueError, match=msg): recommend(100, 24, label_counts=counts)

def test_cli_task_shows_the_balancing_line(capsys):
    assert main_recommend(["--task", "legal", "--n-train", "100", "--gpu-gb", "24"]) == 0
    out = capsys.readouterr().out
    assert "(100 examples)" in out and "balance: oversample" in out and "Skewed labels: 'Other' is" in out
    assert main_recommend(["--task", "legal", "--gpu-gb", "24"]) == 0   # the whole train split
    out = capsys.readouterr().out
    n = len(load_task("legal").split("train"))
    assert f"({n} examples)" in out and f"of {n} examples" in out
    assert main_recommend(["--task", "medical", "--n-train", "50", "--gpu-gb", "24"]) == 0   # free text: no labels
    out = capsys.readouterr().out
    assert "(50 examples)" in out and "balanc" not in out
    assert main_recommend(["--task", "legal", "--n-train", "100000", "--gpu-gb", "24"]) == 2
    assert "larger than its train split" in capsys.readouterr().err
    assert main_recommend(["--task", "lgal", "--gpu-gb", "24"]) == 2
    assert "Unknown task" in capsys.readouterr().err
    for argv in ([], ["--n-train", "100", "--examples", "100"]):
        with pytest.raises(SystemExit) as e: main_recommend(argv)
        assert e.value.code == 2
