"""Deployment formats on SmolLM2-135M: size on disk, peak memory at inference, generation speed and the task metric with its CI.

For each task: a short LoRA run (or the base model with --source base), exported as merged / gptq / awq / bnb4 with
`vrnx_nb.deploy.export`; each folder is then loaded in a fresh process (so its peak RSS is its own), timed on greedy
generation, and scored with `vrnx_nb.evaluation.evaluate` on the first --limit test examples. The merged
full-precision export is the reference: `in_merged_ci` says whether a format's score lies inside the merged model's
95% bootstrap interval, and `agree_with_merged` is the share of test examples where it predicts exactly what the merged
model predicts (a paired check, sharper than overlapping intervals). The scores are written into each export's model card too.

Usage: OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1 .venv/bin/python bench/deploy.py [--limit 32] [--tasks legal,medical,finance]
       [--formats merged,gptq,awq,bnb4] [--source lora|base] [--max-steps 10] [--n-calibration 16]
Writes bench/results/deploy.csv.
"""
import argparse, csv, json, os, resource, subprocess, sys, tempfile, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIELDS = ["task", "format", "source", "size_mb", "export_s", "load_s", "baseline_rss_mb", "gen_peak_rss_mb", "gen_model_rss_mb",
          "peak_rss_mb", "gen_tokens", "tokens_per_s", "metric", "score", "ci_low", "ci_high", "n", "examples_per_s",
          "delta_vs_merged", "in_merged_ci", "agree_with_merged", "other_metrics", "quantization", "folder"]


def _rss_mb() -> float:
    "Peak resident memory of this process (VmHWM: unlike ru_maxrss it does not inherit the parent's peak across fork+exec)."
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"): return int(line.split()[1]) / 1024
    except OSError: pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(folder: str, task_name: str, limit: int, gen_tokens: int) -> dict:
    "Load one export folder, time generation, score the task; peak RSS of this process."
    import torch
    from vrnx_nb.deploy import load_export
    from vrnx_nb.evaluation import evaluate
    from vrnx_nb.tasks import load_task, render_prompt
    task = load_task(task_name)
    base = _rss_mb()
    t0 = time.perf_counter()
    model, tok = load_export(folder, device="cpu")
    load_s = time.perf_counter() - t0
    ids = tok(render_prompt(task, task.test[0], tok), return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        model.generate(**ids, max_new_tokens=2, do_sample=False)  # warm-up (a compressed-tensors model de-packs here)
        t0 = time.perf_counter()
        out = model.generate(**ids, max_new_tokens=gen_tokens, min_new_tokens=gen_tokens, do_sample=False)
        gen_s = time.perf_counter() - t0
    n_new = out.shape[1] - ids["input_ids"].shape[1]
    gen_peak = _rss_mb()  # serving one request: weights + one generation
    with tempfile.TemporaryDirectory() as d:
        scores = evaluate((model, tok), task, limit=limit, method=Path(folder).name, save_dir=d)
        preds = [json.loads(line)["prediction"] for line in open(scores.predictions_path, encoding="utf-8")]
    scores.predictions_path = None
    return {"load_s": load_s, "baseline_rss_mb": base, "gen_peak_rss_mb": gen_peak, "peak_rss_mb": _rss_mb(), "gen_tokens": n_new,
            "tokens_per_s": n_new / gen_s, "scores": scores.to_dict(), "predictions": preds}


def measure(folder: Path, task: str, limit: int, gen_tokens: int) -> dict:
    "Run `child` in a fresh Python process; its JSON result."
    cmd = [sys.executable, __file__, "--child", str(folder), "--tasks", task, "--limit", str(limit), "--gen-tokens", str(gen_tokens)]
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if p.returncode != 0: raise RuntimeError(f"measuring {folder} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def _write(path, rows) -> Path:
    out = Path(path); out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS); w.writeheader(); w.writerows(rows)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--limit", type=int, default=32, help="test examples scored per task and format")
    ap.add_argument("--tasks", default="legal,medical,finance")
    ap.add_argument("--formats", default="merged,gptq,awq,bnb4")
    ap.add_argument("--model", default="smollm2-135m", help="base model ('tiny' for a quick check of this script)")
    ap.add_argument("--source", default="lora", choices=["lora", "base"], help="a short LoRA run per task, or the base model")
    ap.add_argument("--max-steps", type=int, default=10, help="LoRA steps (--source lora)")
    ap.add_argument("--batch-size", type=int, default=4, help="LoRA batch")
    ap.add_argument("--max-length", type=int, default=1024, help="LoRA examples cut to this many tokens (finance's long tables at batch 8 and full length took 22 GB and were killed)")
    ap.add_argument("--n-calibration", type=int, default=16, help="train examples calibrating gptq/awq")
    ap.add_argument("--calib-len", type=int, default=256, help="calibration examples cut to this many tokens")
    ap.add_argument("--gen-tokens", type=int, default=64, help="tokens generated for the speed measurement")
    ap.add_argument("--work", default=None, help="folder for runs and exports (default: <cache>/bench-deploy)")
    ap.add_argument("--out", default=str(ROOT/"bench"/"results"/"deploy.csv"))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(child(a.child, a.tasks, a.limit, a.gen_tokens), default=str)); return 0

    from vrnx_nb.deploy import export, write_card
    from vrnx_nb.models import cache_dir
    from vrnx_nb.training import finetune
    formats = [f for f in a.formats.split(",") if f]
    if "merged" in formats: formats = ["merged"] + [f for f in formats if f != "merged"]  # the reference first
    work = Path(a.work or cache_dir()/"bench-deploy").expanduser()
    rows, t_all = [], time.time()
    for task in [t for t in a.tasks.split(",") if t]:
        if a.source == "lora":
            t0 = time.time()
            src = finetune(a.model, task, method="lora", max_steps=a.max_steps, max_val_examples=16, batch_size=a.batch_size, max_length=a.max_length,
                           output_dir=work/f"run-{Path(a.model).name}-{task}-lora{a.max_steps}-b{a.batch_size}-len{a.max_length}", device="cpu")
            print(f"[{task}] trained {src.global_step} steps in {time.time() - t0:.0f}s", flush=True)
        else: src = a.model
        ref = None
        for fmt in formats:
            t0 = time.time()
            res = export(src, fmt, work/f"{Path(a.model).name}-{task}-{a.source}-{fmt}", task=task, overwrite=True,
                         n_calibration=a.n_calibration, max_seq_length=a.calib_len)
            export_s = time.time() - t0
            m = measure(Path(res.output_dir), task, a.limit, a.gen_tokens)
            s, preds = m.pop("scores"), m.pop("predictions")
            write_card(res.output_dir, [s] if ref is None else [ref, s])
            lo, hi = s["ci"][s["metric"]]
            score = s["metrics"][s["metric"]]
            row = {"task": task, "format": fmt, "source": a.source, "size_mb": round(res.size_mb, 1), "export_s": round(export_s, 1),
                   "load_s": round(m["load_s"], 2), "baseline_rss_mb": round(m["baseline_rss_mb"]), "gen_peak_rss_mb": round(m["gen_peak_rss_mb"]),
                   "gen_model_rss_mb": round(m["gen_peak_rss_mb"] - m["baseline_rss_mb"]), "peak_rss_mb": round(m["peak_rss_mb"]),
                   "gen_tokens": m["gen_tokens"],
                   "tokens_per_s": round(m["tokens_per_s"], 1), "metric": s["metric"], "score": round(score, 4),
                   "ci_low": round(lo, 4), "ci_high": round(hi, 4), "n": s["n"], "examples_per_s": round(s["examples_per_s"], 2),
                   "other_metrics": ";".join(f"{k}={v:.4f}" for k, v in s["metrics"].items() if k != s["metric"]),
                   "quantization": res.quantization.get("scheme") or res.quantization.get("bnb_4bit_quant_type", ""),
                   "folder": res.output_dir}
            if fmt == "merged": ref, ref_preds = s, preds
            if ref is not None:
                r_lo, r_hi = ref["ci"][ref["metric"]]
                row["delta_vs_merged"] = round(score - ref["metrics"][ref["metric"]], 4)
                row["in_merged_ci"] = bool(r_lo <= score <= r_hi)
                row["agree_with_merged"] = round(sum(p == q for p, q in zip(preds, ref_preds)) / max(1, len(preds)), 4)
            rows.append(row)
            _write(a.out, rows)  # after every row: an interrupted run keeps what it measured
            print(f"[{task}] {fmt}: {row['size_mb']} MB, export {row['export_s']}s, RSS after load+generate {row['gen_peak_rss_mb']} MB "
                  f"(model {row['gen_model_rss_mb']} MB), peak with eval {row['peak_rss_mb']} MB, {row['tokens_per_s']} tok/s, {row['metric']} {score:.3f} [{lo:.3f}, {hi:.3f}]"
                  + (f", in merged CI: {row.get('in_merged_ci')}, same prediction as merged {row.get('agree_with_merged')}" if fmt != "merged" else ""), flush=True)
    print(f"wrote {_write(a.out, rows)} ({len(rows)} rows) in {time.time() - t_all:.0f}s")
    return 0


if __name__ == "__main__": sys.exit(main())
