"""Retained synthetic examples per minute from the local teacher (SmolLM2-135M-Instruct behind
`transformers serve --continuous-batching`) at concurrency 8 vs 1, in one run against one server.

Both settings send the same requests (same seed, no cache), so the replies, and the retention per stage, match
and the difference is throughput. Writes bench/results/augment_throughput.csv; prints the ratio last.

    .venv/bin/python bench/augment_throughput.py            # 8 requests of 32 tokens per setting
    .venv/bin/python bench/augment_throughput.py --n 32 --max-tokens 128 --n-shots 3   # closer to real use

The CPU load when each setting starts is written to the CSV: on a shared machine it decides the numbers.
"""
import argparse, csv, os, time
from pathlib import Path

from vrnx_nb.tasks import load_task
from vrnx_nb.serving import local_teacher

STAGES = ("generation", "validity", "length", "duplicate", "decontamination", "quality", "diversity")


def run(ep, task, n, concurrency, max_tokens, seed, n_shots):
    pipe = ep.pipeline(concurrency=concurrency, max_tokens=max_tokens, cache_path=False, seed=seed, n_shots=n_shots)
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    syn = pipe.generate(task.train, n, "Classify clauses of online Terms of Service", task=task)
    kept = pipe.filter(syn)
    wall = time.perf_counter() - t0
    io = {s: o for s, _, o in pipe._stage_io}
    u = pipe.usage
    row = {"concurrency": concurrency, "requests": n, "cpu_count": os.cpu_count(), "load_avg_1m_at_start": round(load, 2), "replies": u.calls, "wall_s": round(wall, 2),
           "teacher_s": round(u.wall_s, 2), "prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
           "completion_tok_per_s": round(u.completion_tokens/u.wall_s, 2) if u.wall_s else 0.0,
           "replies_per_min": round(u.calls/wall*60, 2), "kept": len(kept), "retained_per_min": round(len(kept)/wall*60, 3)}
    for s in STAGES: row[f"after_{s}"] = io.get(s, io.get(f"{s} (no task: skipped)", ""))
    row["retention"] = round(len(kept)/n, 3)
    return row, pipe


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--task", default="legal")
    ap.add_argument("--n-seed", type=int, default=50)
    ap.add_argument("--n", type=int, default=8, help="requests per setting")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--n-shots", type=int, default=1, help="few-shot seeds per request (shorter prompts)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).parent/"results"/"augment_throughput.csv"))
    a = ap.parse_args(argv)
    task = load_task(a.task, n_train=a.n_seed, seed=a.seed)
    rows = []
    with local_teacher(a.model) as ep:
        for c in (1, 8):
            row, pipe = run(ep, task, a.n, c, a.max_tokens, a.seed, a.n_shots)
            rows.append(row)
            print(f"concurrency {c}: {row}", flush=True)
            print(pipe.report(), flush=True)
    out = Path(a.out); out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0])); w.writeheader(); w.writerows(rows)
    one, eight = rows
    tok = eight["completion_tok_per_s"]/one["completion_tok_per_s"] if one["completion_tok_per_s"] else float("nan")
    print(f"wrote {out}")
    print(f"completion tokens/s: {one['completion_tok_per_s']} (c=1) vs {eight['completion_tok_per_s']} (c=8): {tok:.2f}x")
    if one["kept"] and eight["kept"]:
        print(f"retained examples/min, concurrency 8 vs 1: {eight['retained_per_min']} / {one['retained_per_min']} = "
              f"{eight['retained_per_min']/one['retained_per_min']:.2f}x")
    else:  # nothing kept: the same requests give the same replies, so the throughput ratio is that of replies/min
        print(f"no example retained (kept {one['kept']} and {eight['kept']}); replies/min, concurrency 8 vs 1: "
              f"{eight['replies_per_min']} / {one['replies_per_min']} = {eight['replies_per_min']/one['replies_per_min']:.2f}x")


if __name__ == "__main__":
    main()
