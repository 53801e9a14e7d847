"""Synthetic examples from the embedded teacher in this process (SmolLM2-135M-Instruct, `LocalTeacher`): the share of
requests that yield a parsed example, the share kept after the filter, and kept examples per minute at batch 8 vs 1.

One run per (mode, batch size), the same requests in each (same seeds, no reply cache), so a mode's replies match
across batch sizes up to batched-kernel rounding and the difference is throughput. The teacher decodes all of a run's
requests with `batch` rows in flight (`LocalTeacher.complete`: continuous batching on `generation.generate_batched`,
a finished row refilled from the requests still waiting, each request sampled with its own seeded generator); the
default 32 requests give batch 8 refills to do, as a real run of hundreds would. Modes:
- `label`: label-conditioned (the pipeline picks the label, rare labels first; the teacher writes only the clause);
- `json`: the teacher writes a JSON object, held to the task's schema by constrained decoding when xgrammar is
  installed (else free decoding: the row's `constrained` column says which); the schema's text bound is lowered until
  any seed's text cut there fits in `--max-tokens` with the rest of the object (`text_max_chars` column);
- `label-adapted`: label-conditioned, from the teacher LoRA-tuned on the seeds first (`vrnx_nb.adapt.adapt_teacher`,
  the offline default of `vrnx augment`; cached by the seeds' hash, its one-off tuning time in `adapt_s`, not in the
  per-minute figures).

The filter runs with the pipeline's defaults: the quality threshold calibrated on the seeds (90% of them pass, out of
fold; `quality_threshold` and `quality_threshold_how` columns), no classifier stage (`after_classifier` empty).

Writes bench/results/augment_throughput.csv (one row per run; `load_avg_1m_at_start` is the CPU load when it began)
and prints last, per mode, the parsed share (target >= 95%), the kept share after the filter (the paper reports
60-70%) and the kept-per-minute ratio of batch 8 to batch 1 (target >= 3x).

    .venv/bin/python bench/augment_throughput.py                          # legal, 32 requests, 96 tokens, all modes
    .venv/bin/python bench/augment_throughput.py --modes label --n 8      # quicker
    .venv/bin/python bench/augment_throughput.py --model tiny --n 4 --max-tokens 16 --out /tmp/a.csv   # script check
"""
import argparse, csv, os, time
from pathlib import Path

from vrnx_nb.tasks import load_task

STAGES = ("generation", "validity", "length", "duplicate", "decontamination", "classifier", "quality", "diversity")
TARGETS = {"parsed": 0.95, "batch_ratio": 3.0}
OUT_CSV = Path(__file__).parent/"results"/"augment_throughput.csv"


def constrained_available() -> bool:
    "Whether in-process constrained JSON decoding can run (xgrammar importable)."
    try: import xgrammar  # noqa: F401
    except ImportError: return False
    return True


def stage_counts(pipe) -> dict:
    "Examples left after each filter stage of the pipeline's last `filter` call."
    io = {s: o for s, _, o in pipe._stage_io}
    return {f"after_{s}": io.get(s, io.get(f"{s} (no task: skipped)", "")) for s in STAGES}


def run(teacher, task, mode, n, batch, max_tokens, seed, n_shots, adapt_s=None):
    "Generate `n` requests with `batch` in flight, filter them, and return the CSV row."
    from vrnx_nb.augmentation import SyntheticPipeline
    pipe = SyntheticPipeline(teacher_model=teacher, mode=mode.removesuffix("-adapted"), concurrency=batch,
                             max_tokens=max_tokens, cache_path=False,
                             seed=seed, n_shots=n_shots, structured=constrained_available())
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    syn = pipe.generate(task.train, n, task=task)
    t_gen = time.perf_counter() - t0
    kept = pipe.filter(syn)
    wall = time.perf_counter() - t0
    u = pipe.usage
    row = {"mode": mode, "constrained": mode == "json" and constrained_available(), "batch": batch, "requests": n,
           "adapt_s": "" if adapt_s is None else round(adapt_s, 1),
           "max_tokens": max_tokens, "cpu_count": os.cpu_count(), "load_avg_1m_at_start": round(load, 2),
           "parsed": len(syn), "parsed_share": round(len(syn)/n, 3), "kept": len(kept), "kept_share": round(len(kept)/n, 3),
           "generate_s": round(t_gen, 2), "wall_s": round(wall, 2), "completion_tokens": u.completion_tokens,
           "completion_tok_per_s": round(u.completion_tokens/t_gen, 2) if t_gen else 0.0,
           "parsed_per_min": round(len(syn)/wall*60, 3), "kept_per_min": round(len(kept)/wall*60, 3)}
    row.update(stage_counts(pipe))
    row.update(quality_threshold=round(pipe.quality_threshold_used, 3), quality_threshold_how=pipe.threshold_how)
    row["text_max_chars"] = pipe.schema["properties"][next(iter(pipe.schema["properties"].keys() - {"label"}))].get("maxLength", "") \
        if pipe.schema else ""
    row["truncated"] = sum(r["reason"] == "truncated" for r in pipe.rejected if r.get("stage") == "generation")
    return row, pipe


def summary(rows) -> list[str]:
    "The lines printed last: per mode, parsed and kept shares and the batch-8 / batch-1 throughput ratio."
    lines = []
    for mode in dict.fromkeys(r["mode"] for r in rows):
        by_batch = {r["batch"]: r for r in rows if r["mode"] == mode}
        parsed = min(r["parsed_share"] for r in by_batch.values())
        kept = [r["kept_share"] for r in by_batch.values()]
        line = (f"{mode}: parsed {parsed:.0%} of requests (target >= {TARGETS['parsed']:.0%}), kept after the filter "
                f"{min(kept):.0%}-{max(kept):.0%} (paper: 60-70%)")
        if 1 in by_batch and max(by_batch) > 1:
            hi, lo = by_batch[max(by_batch)], by_batch[1]
            what = "kept_per_min" if lo["kept"] and hi["kept"] else "parsed_per_min"
            ratio = hi[what]/lo[what] if lo[what] else float("nan")
            line += (f"; {what.replace('_', ' ')} at batch {max(by_batch)} vs 1: {hi[what]} / {lo[what]} = {ratio:.2f}x"
                     f" (target >= {TARGETS['batch_ratio']:.0f}x)")
        lines.append(line)
    return lines


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", help="alias or model folder of the teacher")
    ap.add_argument("--task", default="legal")
    ap.add_argument("--n-seed", type=int, default=50, help="seed examples (the task's first n training examples)")
    ap.add_argument("--n", type=int, default=32, help="requests per run")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--n-shots", type=int, default=2, help="few-shot seeds per request")
    ap.add_argument("--modes", default="label,json,label-adapted")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default=None)
    ap.add_argument("--out", default=str(OUT_CSV))
    a = ap.parse_args(argv)
    from vrnx_nb.augmentation import LocalTeacher
    task = load_task(a.task, n_train=a.n_seed, seed=a.seed)
    teacher, rows = LocalTeacher(a.model, device=a.device), []
    for mode in a.modes.split(","):
        adapt_s = None
        if mode.endswith("-adapted"):
            from vrnx_nb.adapt import adapt_teacher
            t0 = time.perf_counter(); adapted = adapt_teacher(task.train, task, a.model, device=a.device)
            adapt_s, teacher = time.perf_counter() - t0, LocalTeacher(adapted, device=a.device)
        for batch in (int(b) for b in a.batches.split(",")):
            row, pipe = run(teacher, task, mode, a.n, batch, a.max_tokens, a.seed, a.n_shots, adapt_s)
            rows.append(row)
            print(f"{mode} batch {batch}: {row}", flush=True)
    out = Path(a.out); out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0])); w.writeheader(); w.writerows(rows)
    print(f"wrote {out}")
    for line in summary(rows): print(line)


if __name__ == "__main__":
    main()
