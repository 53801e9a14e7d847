"""Training throughput: vrnx `finetune` (packed, padding-free) per method vs a naive HF Trainer baseline.

SmolLM2-135M-Instruct on the legal task (UNFAIR-ToS clauses, ~130 tokens each with the prompt). For each method
(full, lora, qlora, adapter) we train a few steps with `vrnx_nb.training.finetune`; the naive baseline is written
here: HF Trainer + the same LoRA config, every batch padded to max_length 512, fp32, no packing. The LoRA and
naive runs alternate (naive, lora, naive, lora, ...) because the CPU is shared with other jobs and timings drift.
Each run is its own process, so its peak RSS is its own.

Reported per run: useful (non-padding) tokens/s, seconds per epoch of the limited-data train split, peak RSS,
and the achieved FLOP rate against a matmul peak measured here. Rates are over the steps after the first
(which pays for lazy initialisation), for both vrnx and the baseline. FLOPs per useful token: 6N for full
fine-tuning (forward 2N, backward 4N); 4N + 2N_trainable for LoRA / QLoRA / adapters (the frozen weights
still pass gradients back but get none). The naive row also gives the rate over all processed tokens (padding included).

    python bench/train_throughput.py [--steps 4] [--batch-size 4] [--repeats 2]

Writes bench/results/train_throughput.csv and prints the LoRA ratio (vrnx / naive useful tokens/s) last.
"""
import argparse, csv, json, os, resource, subprocess, sys, tempfile, time, warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT_CSV = ROOT/"bench"/"results"/"train_throughput.csv"
N_TRAIN, MAX_LEN_NAIVE, MODEL, R = 200, 512, "smollm2-135m", 16


def rss_gb(): return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def matmul_peak_gflops(device):
    "Best of a few square matmuls (fp32 on the CPU, bf16 on a GPU)."
    import torch
    n, dtype = (8192, torch.bfloat16) if device == "cuda" else (1536, torch.float32)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(5):
        if device == "cuda": torch.cuda.synchronize()
        t = time.perf_counter(); (a @ b).sum().item(); best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def run_vrnx(kind, steps, bs):
    "`lora`, `full`, ... through finetune (packed); `lora-grouped`: length-grouped dynamic padding instead of packing."
    from vrnx_nb.tasks import load_task
    from vrnx_nb.training import finetune
    task = load_task("legal", n_train=N_TRAIN)
    with tempfile.TemporaryDirectory() as d:
        res = finetune(MODEL, task, method=kind.split("-")[0], packing=not kind.endswith("-grouped"), r=R, max_steps=steps, batch_size=bs, eval_steps=10**6,
                       early_stopping_patience=None, max_val_examples=8, output_dir=d, overwrite=True)
    return {"useful_tokens_per_s": res.useful_tokens_per_s, "processed_per_useful": 1.0,
            "trainable": res.trainable_params, "total": res.total_params}


def run_naive(steps, bs):
    "HF Trainer, LoRA r=16 all-linear, fp32, every example padded to 512 tokens, no packing."
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments, AutoModelForCausalLM, AutoTokenizer
    from peft import LoraConfig, get_peft_model
    from vrnx_nb.tasks import load_task, render_pair
    from vrnx_nb.models import resolve_model_path
    path = resolve_model_path(MODEL)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=R, lora_alpha=2*R, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM"))
    task = load_task("legal", n_train=N_TRAIN)
    rows = []
    for ex in task.train:
        pair = render_pair(task, ex, tok)
        enc = tok(pair["prompt"] + pair["completion"], padding="max_length", max_length=MAX_LEN_NAIVE, truncation=True)
        n_prompt = len(tok(pair["prompt"])["input_ids"])
        labels = [(-100 if i < n_prompt or m == 0 else t) for i, (t, m) in enumerate(zip(enc["input_ids"], enc["attention_mask"]))]
        rows.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels})

    class Counting(Trainer):
        "Counts useful and processed tokens and times the steps after the first, as vrnx's trainer does."
        useful = processed = steady_useful = steady_processed = 0; steady_s = 0.0
        def compute_loss(self, model, inputs, *a, **k):
            self.useful += int(inputs["attention_mask"].sum()); self.processed += inputs["input_ids"].numel()
            return super().compute_loss(model, inputs, *a, **k)

    class Clock(TrainerCallback):
        n = 0
        def on_step_begin(self, args, state, control, **kw): self.t0, self.u0, self.p0 = time.perf_counter(), tr.useful, tr.processed
        def on_step_end(self, args, state, control, **kw):
            self.n += 1
            if self.n > 1:
                tr.steady_s += time.perf_counter() - self.t0
                tr.steady_useful += tr.useful - self.u0; tr.steady_processed += tr.processed - self.p0

    with tempfile.TemporaryDirectory() as d:
        args = TrainingArguments(output_dir=d, per_device_train_batch_size=bs, max_steps=steps, learning_rate=2e-4,
                                 logging_steps=1, save_strategy="no", eval_strategy="no", report_to=[], seed=0,
                                 disable_tqdm=True, use_cpu=not torch.cuda.is_available())
        tr = Counting(model=model, args=args, train_dataset=rows,
                      data_collator=lambda fs: {k: torch.tensor([f[k] for f in fs]) for k in fs[0]}, callbacks=[Clock()])
        m = tr.train().metrics
    tp, tot = model.get_nb_trainable_parameters()
    return {"useful_tokens_per_s": tr.steady_useful / tr.steady_s, "processed_per_useful": tr.steady_processed / tr.steady_useful,
            "trainable": tp, "total": tot}


def one(kind, steps, bs):
    "Child process: one run, JSON on the last line."
    warnings.filterwarnings("ignore")
    import logging; logging.getLogger("transformers").setLevel(logging.ERROR)
    t = time.time()
    r = run_naive(steps, bs) if kind == "naive-lora" else run_vrnx(kind, steps, bs)
    r.update(kind=kind, wall_s=time.time() - t, peak_rss_gb=rss_gb())
    print("JSON " + json.dumps(r))


def flops_per_token(kind, n, nt):
    return 6 * n if kind == "full" else 4 * n + 2 * nt


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=4); p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--repeats", type=int, default=2, help="alternating naive/lora pairs")
    p.add_argument("--methods", default="full,qlora,adapter", help="other runs, one each (also: lora-grouped)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (1: other jobs share this CPU; "
                   "2 threads on 2 busy cores ran 4x slower here)")
    p.add_argument("--out", default=str(OUT_CSV), help="CSV to write")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one: return one(a.one, a.steps, a.batch_size)
    import torch
    torch.set_num_threads(a.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    peak = matmul_peak_gflops(device)
    from vrnx_nb.models import load_tokenizer
    from vrnx_nb.tasks import load_task
    from vrnx_nb.training import tokenize_split
    epoch_tokens = sum(len(r["input_ids"]) for r in tokenize_split(load_task("legal", n_train=N_TRAIN), "train", load_tokenizer(MODEL))[0])
    print(f"matmul peak here: {peak:.1f} GFLOP/s ({device}, {a.threads} thread(s))", flush=True)
    order = [k for _ in range(a.repeats) for k in ("naive-lora", "lora")] + [m for m in a.methods.split(",") if m]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(a.threads)}
    rows = []
    for i, kind in enumerate(order):
        cmd = [sys.executable, __file__, "--one", kind, "--steps", str(a.steps), "--batch-size", str(a.batch_size)]
        pr = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = [l for l in pr.stdout.splitlines() if l.startswith("JSON ")]
        if pr.returncode or not line: sys.exit(f"{kind} failed:\n{pr.stderr[-3000:]}")
        r = json.loads(line[-1][5:])
        fpt = flops_per_token(kind.replace("naive-", "").split("-")[0], r["total"], r["trainable"])
        r.update(run=i, device=device, threads=a.threads, steps=a.steps, batch_size=a.batch_size,
                 seconds_per_epoch=epoch_tokens / r["useful_tokens_per_s"],
                 useful_gflops=fpt * r["useful_tokens_per_s"] / 1e9,
                 processed_gflops=fpt * r["useful_tokens_per_s"] * r["processed_per_useful"] / 1e9, matmul_peak_gflops=peak)
        r["useful_share_of_peak"] = r["useful_gflops"] / peak
        rows.append(r)
        print(f"{kind:10s} {r['useful_tokens_per_s']:8.1f} useful tok/s  {r['seconds_per_epoch']:7.1f} s/epoch({N_TRAIN} ex)  "
              f"{r['useful_gflops']:6.1f} useful GFLOP/s ({r['useful_share_of_peak']:.0%} of peak)  "
              f"{r['processed_gflops']:6.1f} processed GFLOP/s  peak RSS {r['peak_rss_gb']:.2f} GB", flush=True)
    cols = ["run", "kind", "device", "threads", "steps", "batch_size", "useful_tokens_per_s", "processed_per_useful",
            "seconds_per_epoch", "peak_rss_gb", "trainable", "total", "useful_gflops", "processed_gflops", "matmul_peak_gflops",
            "useful_share_of_peak", "wall_s"]
    out = Path(a.out); out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, cols, extrasaction="ignore"); w.writeheader(); w.writerows(rows)
    mean = lambda k: sum(r["useful_tokens_per_s"] for r in rows if r["kind"] == k) / sum(r["kind"] == k for r in rows)
    print(f"wrote {out}; CPU shared with other jobs, so timings are noisy (runs alternate)")
    print(f"LoRA useful tokens/s, vrnx packed / naive padded-512: {mean('lora') / mean('naive-lora'):.2f}x")


if __name__ == "__main__": main()
