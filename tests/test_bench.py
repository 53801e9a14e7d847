"Helpers of bench/train_throughput.py and bench/gpu_check.py: run order, FLOP counts, matmul shapes, peak and ratio lines, token counts, guarded stages."
import csv, importlib.util, json
from pathlib import Path
import pytest, torch

ROOT = Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT/"bench"/f"{name}.py")
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    return mod


tt, gpuc = _load("train_throughput"), _load("gpu_check")
SMOL = json.loads((ROOT/"vrnx_nb"/"model_configs"/"smollm2-135m.json").read_text())


def test_kinds_aliases_order_and_unknown_names():
    assert tt.canonical_kinds("naive, lora,trl,lora,full,,trl-packed") == ["naive-lora", "lora", "trl-lora", "full", "trl-lora-packed"]
    with pytest.raises(ValueError, match="unknown kind 'lorra'.*naive-lora"): tt.canonical_kinds("lora,lorra")


def test_every_kind_runs_once_a_round_in_the_same_order():
    order = tt.run_order(["naive-lora", "lora", "trl-lora", "full", "qlora"], 2)
    assert order == [(0, "naive-lora"), (0, "lora"), (0, "trl-lora"), (0, "full"), (0, "qlora"),
                     (1, "naive-lora"), (1, "lora"), (1, "trl-lora"), (1, "full"), (1, "qlora")]
    assert tt.run_order(["lora"], 1) == [(0, "lora")]


def test_window_rates_leave_out_the_warmup_steps():
    # (seconds, useful, processed, logit rows) at the start and after each of 4 steps
    marks = [(0.0, 0, 0, 0), (9.0, 100, 80, 10), (11.0, 300, 240, 30), (12.0, 400, 320, 40), (14.0, 600, 480, 60)]
    r = tt.window_rates(marks, 1)  # steps 2-4: 500 tokens in 5 s; the 9 s first step is left out
    assert r["useful_tokens_per_s"] == 100.0 and r["processed_per_useful"] == 0.8 and r["logits_per_useful"] == 0.1
    assert r["step_seconds"] == [9.0, 2.0, 1.0, 2.0] and r["step_tokens"] == [100, 200, 100, 200] and r["timed_steps"] == 3
    assert tt.window_rates(marks, 2)["useful_tokens_per_s"] == 300 / 3
    assert tt.window_rates(marks, 0)["useful_tokens_per_s"] == 600 / 14
    with pytest.raises(RuntimeError, match="no timed steps: 4 step.*--steps 5"): tt.window_rates(marks, 4)


def test_executed_flops_count_the_vocabulary_projection_only_where_it_runs():
    n, nt, head = 1000, 10, 300  # head: vocab x hidden
    assert tt.executed_flops_per_token("lora", n, nt, head, 1.0, 1.0) == tt.flops_per_token("lora", n, nt)  # nothing skipped
    assert tt.executed_flops_per_token("lora", n, nt, head, 0.8, 0.1) == 0.8 * (4020 - 1200) + 0.1 * 1200
    assert tt.executed_flops_per_token("full", n, n, head, 1.0, 0.0) == 6000 - 1800
    assert tt.executed_flops_per_token("naive-lora", n, nt, head, 4.0, 4.0) == 4 * 4020  # padded rows: all run


def test_share_line_is_the_mean_over_rounds_with_the_range():
    rows = [{"kind": "qlora", "useful_share_of_peak": s, "executed_share_of_peak": e} for s, e in ((0.5, 0.4), (0.7, 0.5), (0.63, 0.45))]
    line = tt.share_line(rows, "qlora", 0.6)
    assert "61% mean of 3 round(s) (range 50%-70%)" in line and "executed FLOPs 45% (40%-50%)" in line and line.endswith(" MET")
    assert tt.share_line(rows[:1], "qlora", 0.6).endswith("NOT MET") and "n/a" in tt.share_line(rows, "adapter", 0.6)


def test_each_run_is_compared_with_the_passes_next_to_it():
    g = {"p0": [100, 120], "p1": [150, 90], "p2": [80, 70], "p3": [200, 10]}  # two shapes per pass
    rows = [{"pass": p, "shape": f"s{j}", "gflops": x} for p, xs in g.items() for j, x in enumerate(xs)]
    assert tt.adjacent_peaks(rows, 3) == [150, 150, 200]  # run i: best of p{i} and p{i+1}
    shares = [{"kind": "lora", "useful_share_of_adjacent_peak": s, "executed_share_of_adjacent_peak": s / 2,
               "useful_share_of_peak": s / 2, "executed_share_of_peak": s / 4} for s in (0.62, 0.66)]
    adj, best = tt.share_line(shares, "lora", 0.6, "adjacent_peak"), tt.share_line(shares, "lora", None)
    assert adj.startswith("share of the adjacent peak") and "64% mean of 2" in adj and adj.endswith(" MET")
    assert best.startswith("share of the best peak") and "32% mean of 2" in best and "target" not in best


def test_flops_per_token_6n_full_and_4n_plus_2_trainable_otherwise():
    assert tt.flops_per_token("full", 100, 100) == 600
    for k in ("lora", "naive-lora", "trl-lora", "qlora", "adapter", "lora-padded"): assert tt.flops_per_token(k, 100, 5) == 410


def test_model_matmul_shapes_of_smollm2():
    s = {name: (m, k, n) for name, m, k, n in tt.model_matmul_shapes(SMOL, 1024)}
    assert s["q_proj"] == (1024, 576, 576) and s["k_proj"] == (1024, 576, 192)  # 9 heads x 64, 3 kv heads x 64
    assert s["gate_up_proj"] == (1024, 576, 1536) and s["down_proj"] == (1024, 1536, 576)
    assert s["lm_head"] == (1024, 576, 49152) and s["grad_x_lm_head"] == (1024, 49152, 576)
    assert s["grad_w_gate_up"] == (576, 1024, 1536) and s["lora_a"] == (1024, 576, 16)


def test_measured_matmul_rate_is_flops_over_seconds():
    rows = tt.measure_peak("before", [("square_64", 64, 64, 64), ("q", 32, 64, 16)], "cpu", repeats=2)
    assert [r["shape"] for r in rows] == ["square_64", "q"] and all(r["seconds"] > 0 for r in rows)
    for r in rows: assert r["gflops"] == pytest.approx(2 * r["m"] * r["k"] * r["n"] / r["seconds"] / 1e9)
    assert rows[0]["threads"] == torch.get_num_threads() and rows[0]["dtype"] == "float32"


def test_peak_is_the_best_over_shapes_and_passes():
    rows = [{"shape": "square_512", "gflops": 90.0}, {"shape": "lm_head", "gflops": 80.0},
            {"shape": "lm_head", "gflops": 120.0}, {"shape": "q_proj", "gflops": 60.0}]
    assert tt.peak_summary(rows) == (120.0, 120.0, "lm_head")
    assert tt.peak_summary(rows[:2]) == (90.0, 80.0, "square_512")  # the model's best apart from the squares
    with pytest.raises(ValueError, match="no matmul"): tt.peak_summary([])


def test_ratio_lines_per_round_and_missing_kinds():
    rows = [{"kind": "lora", "round": 0, "useful_tokens_per_s": 400.0}, {"kind": "naive-lora", "round": 0, "useful_tokens_per_s": 100.0},
            {"kind": "lora", "round": 1, "useful_tokens_per_s": 200.0}, {"kind": "naive-lora", "round": 1, "useful_tokens_per_s": 100.0}]
    line = tt.ratio_line(rows, "lora", "naive-lora", 4.0)
    assert line.startswith("lora / naive-lora useful tokens/s: 3.00x") and "per round 2.00x-4.00x" in line and line.endswith("NOT MET")
    assert tt.ratio_line(rows[:2], "lora", "naive-lora", 4.0).endswith(" MET")
    assert tt.ratio_line(rows, "lora", "trl-lora", 1.3) == "lora / trl-lora: n/a (trl-lora did not run)"


def test_batch_tokens_counts_non_padding_tokens():
    ids = torch.ones(2, 5, dtype=torch.long)
    assert tt.batch_tokens({"input_ids": ids, "real_tokens": torch.tensor(7)}) == (7, 10)  # vrnx padded rows
    assert tt.batch_tokens({"input_ids": ids, "attention_mask": torch.tensor([[1, 1, 1, 0, 0], [1] * 5])}) == (8, 10)
    assert tt.batch_tokens({"input_ids": torch.ones(1, 9), "position_ids": torch.zeros(1, 9)}) == (9, 9)  # padding-free row
    shared = {"input_ids": ids, "real_tokens": torch.tensor(30), "prefix_ids": torch.ones(1, 10, dtype=torch.long)}
    assert tt.batch_tokens(shared) == (30, 20)  # a 10-token prefix run once for 2 examples of 15 tokens each


def test_collator_description_names_what_it_wraps():
    class PaddedCollator: pass
    class SharedPrefixCollator:
        def __init__(self): self.fallback, self.pad = PaddedCollator(), 0
    assert tt.describe_collator(SharedPrefixCollator()) == "SharedPrefixCollator(PaddedCollator)"
    assert tt.describe_collator(PaddedCollator()) == "PaddedCollator" and tt.describe_collator(len) == "builtin_function_or_method"


def test_gpu_check_helpers(tmp_path):
    assert gpuc.ratio(3.0, 2.0) == 1.5 and gpuc.ratio(None, 2.0) is None and gpuc.ratio(1.0, 0) is None
    assert gpuc.error_text(ValueError("bad\n  model  x")) == "error: ValueError: bad model x"
    assert [gpuc.estimate_dtype(m, "cuda") for m in gpuc.METHODS] == ["float32", "bfloat16", "bfloat16", "bfloat16"]
    assert gpuc.estimate_dtype("lora", "cpu") == "float32"
    t = gpuc.Table(tmp_path/"x.csv", ["a", "b"])
    t.add({"a": 1, "b": 2}); assert list(csv.DictReader(open(tmp_path/"x.csv"))) == [{"a": "1", "b": "2"}]  # written at once
    t.add({"a": 3, "c": 9}); assert len(list(csv.DictReader(open(tmp_path/"x.csv")))) == 2


def _rows(path): return list(csv.DictReader(open(path)))


def test_gpu_check_records_a_failed_stage_and_goes_on(tmp_path):
    rc = gpuc.main(["--device", "cpu", "--model", str(tmp_path/"no-such-model"), "--tasks", "legal,medical", "--methods", "lora",
                  "--out-dir", str(tmp_path), "--work", str(tmp_path/"work")])
    assert rc == 1
    train = _rows(tmp_path/"gpu_train.csv")
    assert [(r["task"], r["method"]) for r in train] == [("legal", "lora"), ("medical", "lora")]  # the second task still tried
    assert all(r["status"].startswith("error: ValueError:") and "no-such-model" in r["status"] for r in train)
    assert {r["status"] for r in _rows(tmp_path/"gpu_eval.csv")} == {"skipped: training failed"}
    assert {r["status"] for r in _rows(tmp_path/"gpu_export.csv")} == {"skipped: no lora run"}
    env = {r["key"]: r["value"] for r in _rows(tmp_path/"gpu_env.csv")}
    assert env["device"] == "cpu" and "python_total_s" in env and "Traceback" in (tmp_path/"gpu_check.log").read_text()


def test_gpu_check_time_limit_skips_and_records(tmp_path):
    assert gpuc.main(["--device", "cpu", "--model", "tiny", "--tasks", "legal", "--time-limit", "0", "--out-dir", str(tmp_path)]) == 1
    assert [r["status"] for r in _rows(tmp_path/"gpu_train.csv")] == ["skipped: time limit"] * 4
    assert [r["format"] for r in _rows(tmp_path/"gpu_export.csv")] == ["merged", "gptq"]


def test_augment_summary_reads_shares_and_the_batch_ratio():
    at = _load("augment_throughput")
    row = lambda mode, batch, parsed, kept, ppm, kpm: {"mode": mode, "batch": batch, "parsed_share": parsed, "kept_share": kept,
                                                       "kept": int(kept*16), "parsed_per_min": ppm, "kept_per_min": kpm}
    rows = [row("label", 1, 1.0, 0.5, 10.0, 5.0), row("label", 8, 0.9375, 0.625, 40.0, 20.0), row("json", 1, 0.5, 0.0, 3.0, 0.0)]
    label, json_line = at.summary(rows)
    assert "parsed 94% of requests" in label and "kept after the filter 50%-62%" in label
    assert "kept per min at batch 8 vs 1: 20.0 / 5.0 = 4.00x" in label
    assert json_line.startswith("json: parsed 50%") and "batch 8" not in json_line  # one batch size: no ratio
    nothing_kept = [row("label", 1, 1.0, 0.0, 10.0, 0.0), row("label", 8, 1.0, 0.0, 25.0, 0.0)]
    assert "parsed per min at batch 8 vs 1: 25.0 / 10.0 = 2.50x" in at.summary(nothing_kept)[0]


# ---- bench/memory_accuracy.py ----

ma = _load("memory_accuracy")

def _raw(malloc, mallopt, **kw):
    return {"method": "lora", "checkpointing": False, "baseline_gb": 0.64, "peak_gb": 5.0, "trainable": 4884480, "step_s": 7.0,
            "note": "", "malloc": malloc, "mallopt": mallopt, "batch": 4, "seq": 256, "steps": 2, "r": 16,
            "heap_free_at_peak_gb": 1.9, **kw}

def test_memory_accuracy_estimates_each_setting_with_its_allocator():
    dflt, rel = ma.compare(_raw("default", False)), ma.compare(_raw("release", True, peak_gb=3.1, heap_free_at_peak_gb=0.02))
    assert dflt["est_retained_gb"] > 1 and rel["est_retained_gb"] == 0  # glibc's heap keeps freed blocks; released: nothing
    assert dflt["estimated_gb"] == pytest.approx(rel["estimated_gb"] + dflt["est_retained_gb"], abs=2e-3)
    assert dflt["rel_error"] == pytest.approx((dflt["estimated_gb"] - 5.0) / 5.0, abs=1e-3)
    assert dflt["heap_free_at_peak_gb"] == 1.9 and dflt["sys_s_per_step"] is None  # fields a run did not record stay empty
    assert ma.MALLOCS == ("default", "release")
    with pytest.raises(SystemExit): ma.main(["--malloc", "glibc", "--runs", "lora"])


def test_measured_table_reads_every_committed_benchmark():
    "The README's 'Measured here' table: one row per benchmark CSV, figures read from the files (not typed)."
    from vrnx_nb.experiments import read_results
    measured = _load("measured")
    md = measured.measured_table(read_results(ROOT/"experiments"/"results.csv"))
    rows = [l for l in md.splitlines() if l.startswith("| ") and not l.startswith("| what")]
    assert len(rows) == 6, md
    tt = measured.csv("train_throughput"); tok = tt.groupby("kind")["useful_tokens_per_s"].mean()
    assert f"{tok['lora']/tok['naive-lora']:.2f}×" in rows[1]
    assert "legal accuracy" in md.splitlines()[-1]
