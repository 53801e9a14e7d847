"""Evaluation throughput: SmolLM2-135M on each bundled task, batch 1 vs batch 16.

Batch 1 is the plain loop: `model.generate` on one prompt at a time, greedy (classification parsed from the text).
Batch 16 is what `evaluate` does: prompts sorted by length, prompts sharing a prefix (the instruction; a report that
several finance questions are asked about) keep that prefix's keys and values once and attend to it through a cascade
attention (read once per step for all its rows), similar lengths prefilled together, left padding, room for the reply
reserved in the cache, finished rows dropped and replaced by waiting prompts (continuous batching, never more than 16
rows per forward pass); for classification the label is chosen by log-likelihood (all labels scored in one packed pass
instead of generation). Both use the same reply budget (from the train targets' lengths) and the same stop tokens, so
their replies can be compared (`same_as_batch1`). The overall ratio takes, for legal, the log-likelihood row (what
`evaluate` runs).
Writes bench/results/eval_throughput.csv and prints the overall examples/s ratio last.

Usage: python bench/eval_throughput.py [--n 32] [--threads 2]
"""
import argparse, csv, os, time
from pathlib import Path
import torch
from vrnx_nb.models import load_model
from vrnx_nb.tasks import load_task, render_prompt, render_pair
from vrnx_nb.evaluation import generate_batched, label_logliks, default_max_new_tokens, match_label, task_metrics, stop_token_ids
from dataclasses import replace

def timed(fn):
    "(result, seconds, 1-minute load average when it started): on a shared machine the load decides the numbers."
    load = os.getloadavg()[0]; t0 = time.perf_counter(); out = fn(); return out, time.perf_counter() - t0, load

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n", type=int, default=32, help="test examples per task")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(Path(__file__).parent/"results"/"eval_throughput.csv"))
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    model, tok = load_model("smollm2-135m", dtype=torch.float32, device="cpu")
    rows, base_s, fast_s, n_all = [], 0.0, 0.0, 0
    for name in ["legal", "medical", "finance"]:
        task = load_task(name); exs = task.test[:a.n]
        prompts = [render_prompt(task, e, tok) for e in exs]
        budget = default_max_new_tokens(task, tok)
        stop = sorted(stop_token_ids(tok, model))
        def plain_loop():
            out = []
            with torch.no_grad():
                for p_ in prompts:
                    x = tok(p_, add_special_tokens=False, return_tensors="pt")
                    y = model.generate(**x, max_new_tokens=budget, do_sample=False, eos_token_id=stop, pad_token_id=tok.pad_token_id)
                    out.append(tok.decode(y[0, x["input_ids"].shape[1]:], skip_special_tokens=True).strip())
            return out
        score = lambda preds: task_metrics(task, [match_label(x, task.labels) for x in preds] if task.labels else preds, exs, n_boot=200)["metrics"][task.metric]
        one, t1, l1 = timed(plain_loop)
        many, t16, l16 = timed(lambda: generate_batched(model, tok, prompts, batch_size=16, max_new_tokens=budget))
        same = sum(x == y for x, y in zip(one, many))
        rows += [dict(task=name, config="batch1-generate", batch_size=1, n=len(exs), max_new_tokens=budget, seconds=round(t1, 2),
                      examples_per_s=round(len(exs)/t1, 3), same_as_batch1=len(exs), score=round(score(one), 4), threads=a.threads, load_avg_1m=round(l1, 2)),
                 dict(task=name, config="batch16-generate", batch_size=16, n=len(exs), max_new_tokens=budget, seconds=round(t16, 2),
                      examples_per_s=round(len(exs)/t16, 3), same_as_batch1=same, score=round(score(many), 4), threads=a.threads, load_avg_1m=round(l16, 2))]
        best = t16
        if task.kind == "classification":
            comps = [render_pair(task, replace(exs[0], target=l), tok)["completion"] for l in task.labels]
            ll, tl, ltl = timed(lambda: label_logliks(model, tok, prompts, comps, batch_size=16))
            preds = [task.labels[j] for j in ll.argmax(1)]
            rows.append(dict(task=name, config="batch16-loglik", batch_size=16, n=len(exs), max_new_tokens=0, seconds=round(tl, 2),
                             examples_per_s=round(len(exs)/tl, 3), same_as_batch1="", score=round(task_metrics(task, preds, exs, n_boot=200)["metrics"]["accuracy"], 4), threads=a.threads, load_avg_1m=round(ltl, 2)))
            best = tl
        base_s += t1; fast_s += best; n_all += len(exs)
        for r in rows[-3:]:
            if r["task"] == name: print(r, flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    with open(a.out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0])); w.writeheader(); w.writerows(rows)
    for name in ["legal", "medical", "finance"]:
        r = {x["config"]: x for x in rows if x["task"] == name}
        b16 = r.get("batch16-loglik", r["batch16-generate"])
        print(f"{name}: batch 16 ({b16['config']}) / batch 1 = {b16['examples_per_s']/r['batch1-generate']['examples_per_s']:.2f}x; "
              f"generation alone {r['batch16-generate']['examples_per_s']/r['batch1-generate']['examples_per_s']:.2f}x")
    print(f"wrote {a.out}")
    print(f"overall examples/s ratio, batch 16 vs batch 1 ({n_all} examples): {(n_all/fast_s)/(n_all/base_s):.2f}x")

if __name__ == "__main__": main()
