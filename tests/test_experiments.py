"""Tests of vrnx_nb.experiments that a notebook cell cannot hold: a grid killed with SIGKILL and resumed, a real local
teacher for an augmented run, bad configs and damaged results files."""
import json, os, signal, subprocess, sys, time, warnings
from dataclasses import replace
from pathlib import Path
import pytest
from vrnx_nb.experiments import (ExperimentConfig, run_experiment, run_grid, read_results, append_result, main_experiment,
                                 synthetic_path, STATS, RESULT_COLUMNS)

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
TINY = dict(model="tiny", n_train=8, max_steps=2, batch_size=4, limit=4, max_val_examples=4)

def _grid_args(results, cache):
    return ["ranks", "--task", "legal", "--model", "tiny", "--ranks", "4", "8", "16", "--n-train", "8", "--max-steps", "3",
            "--batch-size", "4", "--limit", "4", "--n-boot", "50", "--results", str(results), "--cache", str(cache)]

def _run_cli(args, timeout=300):
    code = f"import sys; from vrnx_nb.experiments import main_experiment; sys.exit(main_experiment({args!r}))"
    return subprocess.run([sys.executable, "-c", code], env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=timeout)

# --- kill and resume ---

def test_killed_grid_resumes_without_recomputing(tmp_path):
    results, cache = tmp_path/"results.csv", tmp_path/"cache"
    args = _grid_args(results, cache)
    code = f"import sys; from vrnx_nb.experiments import main_experiment; sys.exit(main_experiment({args!r}))"
    proc = subprocess.Popen([sys.executable, "-c", code], env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    try:
        while time.time() < deadline:  # kill as soon as the first run has its row
            if results.exists() and results.read_text().count("\n") >= 2: break
            assert proc.poll() is None, "the grid ended before it could be killed"
            time.sleep(0.2)
        else: pytest.fail("no result row within 240 s")
    finally:
        proc.send_signal(signal.SIGKILL); proc.wait(30)
    with warnings.catch_warnings(record=True): first = read_results(results)
    k = len(first)
    assert 1 <= k < 3, f"kill came too late: {k} rows"
    done = _run_cli(args)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"3 runs: {k} already done, {3 - k} new, 0 failed" in done.stdout, done.stdout
    final = read_results(results)
    assert len(final) == 3 and final["key"].is_unique
    assert sorted(final["r"]) == [4, 8, 16]
    kept = final.set_index("key").loc[first["key"]]
    assert list(kept["timestamp"]) == list(first["timestamp"]) and list(kept["score"]) == list(first["score"])  # not recomputed
    again = _run_cli(args)
    assert "3 runs: 3 already done, 0 new, 0 failed" in again.stdout
    assert len(read_results(results)) == 3

# --- a real (tiny) teacher: nothing kept, the run still trains on its seeds; the synthetic set is generated once ---

def test_augmented_run_with_local_teacher_keeps_nothing_and_trains(tmp_path):
    pytest.importorskip("fastapi"); pytest.importorskip("uvicorn")
    cfg = ExperimentConfig("legal", "lora", r=4, augment=3, teacher="tiny", **TINY)
    n0 = STATS["synthetic_generated"]
    row = run_experiment(cfg, tmp_path/"r.csv", cache=tmp_path/"cache", n_boot=50)
    assert STATS["synthetic_generated"] == n0 + 1
    assert row["synthetic_kept"] == 0 and row["n_train_total"] == 8 and row["train_steps"] == 2
    meta = json.loads(synthetic_path(cfg, tmp_path/"cache").with_suffix(".json").read_text())
    assert meta["requested"] == 3 and meta["kept"] == 0 and meta["generated"] == row["synthetic_generated"]
    other = run_experiment(replace(cfg, method="adapter"), tmp_path/"r.csv", cache=tmp_path/"cache", n_boot=50)
    assert STATS["synthetic_generated"] == n0 + 1 and other["synthetic_kept"] == 0   # reused, no teacher started
    assert len(read_results(tmp_path/"r.csv")) == 2

# --- kept synthetic examples are stored once and read back from the cache by the next run (module code, no notebook names) ---

def test_kept_synthetic_examples_are_reused_from_the_cache(tmp_path):
    import random
    from vrnx_nb.tasks import load_task
    pool = load_task("legal").train
    calls = []
    def scripted_teacher(messages, request):  # real clauses from outside the seeds, with their true labels
        calls.append(request["index"])
        ex = random.Random(request["index"]).choice([e for e in pool if e.target == request["target_label"]] or pool)
        return json.dumps({"input": ex.input, "target": ex.target})
    cfg = ExperimentConfig("legal", "lora", r=4, augment=8, quality_threshold=0.0, teacher="scripted", **TINY)
    first = run_experiment(cfg, tmp_path/"r.csv", cache=tmp_path/"cache", teacher_fn=scripted_teacher, n_boot=50)
    assert len(calls) == 8 and first["synthetic_kept"] > 0 and first["n_train_total"] == 8 + first["synthetic_kept"]
    second = run_experiment(replace(cfg, method="adapter"), tmp_path/"r.csv", cache=tmp_path/"cache", teacher_fn=scripted_teacher, n_boot=50)
    assert len(calls) == 8, "the teacher was asked again"
    assert second["synthetic_kept"] == first["synthetic_kept"] and second["n_train_total"] == first["n_train_total"]
    kept = [json.loads(l) for l in synthetic_path(cfg, tmp_path/"cache").read_text().splitlines()]
    assert len(kept) == first["synthetic_kept"] and all(k["meta"]["synthetic"] for k in kept)

# --- bad configs ---

@pytest.mark.parametrize("kw, msg", [
    (dict(method="prefix-tuning"), "ExperimentConfig.method: expected one of ['zero-shot', 'full', 'lora', 'qlora', 'adapter'], got 'prefix-tuning'"),
    (dict(n_train=0), "ExperimentConfig.n_train: expected a positive integer, got 0"),
    (dict(n_train=-5), "ExperimentConfig.n_train: expected a positive integer, got -5"),
    (dict(method="lora", r=0), "ExperimentConfig.r: expected an integer in 1..256 for method 'lora', got 0"),
    (dict(method="qlora", r=1024), "ExperimentConfig.r: expected an integer in 1..256 for method 'qlora', got 1024"),
    (dict(task="tax-law"), "ExperimentConfig.task: expected one of ['finance', 'legal', 'medical'] or an alias"),
    (dict(task="tax-law"), "got 'tax-law'"),
    (dict(balance="smote"), "ExperimentConfig.balance: expected one of ['oversample', 'weight'] or None, got 'smote'"),
    (dict(seed=-1), "ExperimentConfig.seed: expected an integer >= 0, got -1"),
    (dict(augment=-1), "ExperimentConfig.augment: expected True/False or a number"),
    (dict(method="zero-shot", augment=True), "zero-shot does not train"),
    (dict(quality_threshold=1.5), "ExperimentConfig.quality_threshold: expected a number in [0, 1]"),
    (dict(limit=0), "ExperimentConfig.limit: expected a positive integer or None, got 0"),
])
def test_bad_config_is_a_clear_error(kw, msg):
    with pytest.raises(ValueError) as e: ExperimentConfig(**{"task": "legal", **kw})
    assert msg in str(e.value)

def test_cli_bad_input_exits_2(tmp_path, capsys):
    assert main_experiment(["methods", "--task", "tax-law", "--results", str(tmp_path/"r.csv")]) == 2
    assert "ExperimentConfig.task: expected one of" in capsys.readouterr().err
    assert main_experiment(["ranks", "--ranks", "0", "--results", str(tmp_path/"r.csv")]) == 2
    assert "ExperimentConfig.r" in capsys.readouterr().err
    assert main_experiment(["table", "--results", str(tmp_path/"missing.csv")]) == 2
    assert "missing.csv: no results file" in capsys.readouterr().err
    with pytest.raises(SystemExit): main_experiment(["sweep"])

def test_too_many_examples_fails_in_the_errors_log_not_the_csv(tmp_path):
    cfgs = [ExperimentConfig("finance", "lora", r=4, **(TINY | {"n_train": 99999})), ExperimentConfig("legal", "zero-shot", **TINY)]
    df = run_grid(cfgs, tmp_path/"r.csv", cache=tmp_path/"cache", progress=False, n_boot=50)
    assert len(df) == 1 and df.iloc[0]["method"] == "zero-shot"
    errs = [json.loads(l) for l in (tmp_path/"r.errors.jsonl").read_text().splitlines()]
    assert len(errs) == 1 and errs[0]["key"] == cfgs[0].key() and "n_train=99999 is larger than its train split" in errs[0]["error"]
    assert list(read_results(tmp_path/"r.csv")["key"]) == [cfgs[1].key()]

# --- damaged results files ---

def _row(**kw):
    cfg = ExperimentConfig("legal", "lora", r=4, **TINY)
    return {c: "" for c in RESULT_COLUMNS} | cfg.__dict__ | {"key": cfg.key(), "label": cfg.label, "metric": "accuracy", "score": 0.5} | kw

def test_corrupted_line_names_file_and_line(tmp_path):
    p = tmp_path/"results.csv"
    for s in (0.5, 0.6, 0.7): append_result(p, _row(score=s))
    lines = p.read_text().splitlines()
    lines[2] = lines[2][: len(lines[2])//2] + "garbage"      # line 3 of the file: cut in the middle
    (tmp_path/"cut.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"cut\.csv, line 3: expected \d+ fields, got \d+"): read_results(tmp_path/"cut.csv")
    lines = p.read_text().splitlines(); lines[3] = lines[3].replace(",0.7,", ",seven,")
    (tmp_path/"word.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"word\.csv, line 4, field 'score': expected a number, got 'seven'"): read_results(tmp_path/"word.csv")
    (tmp_path/"other.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match=r"other\.csv, line 1: header \['a', 'b'\] does not match"): read_results(tmp_path/"other.csv")

def test_torn_last_line_is_skipped_then_cut(tmp_path):
    p = tmp_path/"results.csv"
    append_result(p, _row(score=0.5))
    with open(p, "a") as f: f.write("legal,lora,4,8,0,tiny")   # a write killed half way
    with pytest.warns(UserWarning, match="line 3: partial last line"): assert list(read_results(p)["score"]) == [0.5]
    with pytest.warns(UserWarning, match="removed a partial last line"): append_result(p, _row(score=0.25))
    assert list(read_results(p)["score"]) == [0.5, 0.25]
    assert p.read_text().endswith("\n") and p.read_text().count("\n") == 3


def test_cli_augment_grid_lists_its_arms_and_reuses_the_balance_rows(tmp_path, capsys):
    res = tmp_path/"r.csv"
    from vrnx_nb.experiments import balance_grid
    plain = [c for c in balance_grid("legal", sizes=(50,), max_steps=80, learning_rate=1e-3) if c.method == "lora" and not c.calibrate]
    for c in plain: append_result(res, {k: "" for k in RESULT_COLUMNS} | c.__dict__ | {"key": c.key(), "label": c.label, "metric": "accuracy", "score": 0.9})
    assert main_experiment(["augment", "--task", "legal", "--lr", "1e-3", "--augment-count", "40", "--dry-run", "--results", str(res)]) == 0
    *lines, total = capsys.readouterr().out.strip().splitlines()
    assert [l.split()[1] for l in lines] == ["done", "done", "todo", "todo", "todo"]
    assert total.startswith("3 of 5 runs to do: about ") and all(l.endswith(" min") for l in lines)
    assert "synthetic (adapted teacher)" in lines[3] and "steps<=160" in lines[4]
    assert main_experiment(["augment", "--task", "medical", "--classifier-threshold", "0.5", "--results", str(res)]) == 2


def test_classifier_threshold_keeps_what_the_seed_classifier_gives_the_asked_label(tmp_path):
    from vrnx_nb.experiments import _classifier_kept
    from vrnx_nb.tasks import load_task
    cfg = ExperimentConfig("legal", "lora", r=4, augment=4, teacher_mode="label", classifier_threshold=0.01, **TINY)
    task = load_task("legal", n_train=cfg.n_train, seed=cfg.seed)
    cands = task.train[:6]
    kept = _classifier_kept(cfg, task, cands, tmp_path)
    assert {e.id for e in kept} <= {e.id for e in cands}
    assert all(e.meta["classifier_label"] == e.target and e.meta["classifier_p"] >= 0.01 for e in kept)
    assert (tmp_path/"adapted").is_dir()  # the seed classifier is cached beside the experiment's other outputs
