"""Training throughput: vrnx `finetune` per method vs a naive HF Trainer and vs TRL's `SFTTrainer`, in one run, side by side.

SmolLM2-135M-Instruct on the legal task (UNFAIR-ToS clauses, ~130 tokens each with the prompt, n_train=200).
Every run trains `--steps` optimizer steps of `--batch-size` examples in its own subprocess (so its peak RSS is its own):

- `naive-lora`: HF Trainer + peft LoRA (r=16, alpha 32, all-linear, dropout 0.05 as committed), fp32, every example
  padded to 512 tokens, no packing, loss on the completion only (the baseline of the committed CSV, unchanged);
- `lora`, `full`, `qlora`, `adapter`: `vrnx_nb.training.finetune` with its defaults (`packing=None`: one packed row
  with a flash-attention varlen kernel, else right-padded causal rows; `lora_dropout` its default);
  `lora-packed` / `lora-padded` force `packing=True` / `False`;
- `trl-lora`: what a TRL user gets, `trl.SFTTrainer` on a prompt-completion dataset (the same `render_pair` strings),
  `completion_only_loss=True`, `padding_free=True` (each batch flattened into one row with position_ids, as TRL
  documents), `peft_config` with the same LoRA config as vrnx (r=16, alpha 32, all-linear, vrnx's default dropout).
  TRL's own defaults of gradient checkpointing and bf16 autocast are set to what vrnx does here (off; bf16 only on a GPU)
  so that the data path and the loss are compared, not settings. `trl-lora-packed`: `packing=True` (BFD packing into
  rows of 1024 tokens, padding-free), the other mode TRL's docs advise.

Every round runs every method once, in the same order (naive, lora, trl, full, qlora, adapter), for `--repeats` rounds
(3 by default), because the CPU is shared with other jobs and timings drift: drift then falls on every method alike.
Each method's figure is the mean over its rounds, printed with the per-round range; no round is picked. Every run trains
the same batches (seed 0). Threads: what a user gets by default (`torch.get_num_threads()`, recorded), unless `--threads N`.

The clock is the same callback in all three trainers (vrnx's `VrnxTrainer`, HF `Trainer`, TRL `SFTTrainer`): it marks the
time and the tokens counted so far when training begins and after every optimizer step; the timed window runs from the
mark after the first `--warmup` steps (1: lazy initialisation) to the last, so it covers the timed steps' batch loading and
collation, forward, backward, update and logging. Every step's seconds (warm-up included) go to the CSV (`step_seconds`).
Useful tokens are the examples' non-padding tokens a step trains on (prompt and completion), counted in `compute_loss`
from each batch; a prompt prefix that vrnx runs once for a whole batch counts for every example it serves, so
`processed_per_useful` (all positions the model runs / useful) can fall below 1. `load_avg` is the 1-minute load
average just before each run: on a busy CPU, threads wait for cores (small matmuls then slow down most).

FLOPs per useful token (`useful_gflops`, the model-FLOP convention the share target uses): 6N for full fine-tuning
(forward 2N, backward 4N); 4N + 2N_trainable for LoRA / QLoRA / adapters (the frozen weights still pass gradients back
but get none). It credits work vrnx does not run: a shared prefix runs once per batch, and vrnx projects only completion
positions onto the 49k-token vocabulary (`logits_per_useful`). `executed_gflops` counts what each trainer runs: the
per-token count at every processed position, the vocabulary projection (4 or 6 x vocab x hidden) only at the rows that
reach it (attention scores are left out of both). The matmul peak is measured in this process, with the same threads,
before and after the training runs: the best over square products (512..2048 on the CPU, fp32) and over the model's own
matmul shapes (q/k/v/o, gate/up/down, lm_head, their weight-gradient products and the LoRA factors) at a training
batch's token count; every shape's figure per pass, and its best (pass 'best'), goes to bench/results/matmul_peak.csv.
The host's CPU changes speed over minutes (one run of this script measured the squares at 136-148 GFLOP/s before the
training runs and at 184-196 after them), so a pass also runs between every two training runs (pass `p0` before the
first, `p{i+1}` after run i): each run is compared with the best of the two passes next to it (`adjacent_peak_gflops`,
`useful_share_of_adjacent_peak`, the share the target is read on), and beside that with the best over every pass of the
whole script (`matmul_peak_gflops`, `useful_share_of_peak`), which a fast minute anywhere in the script raises.

    python bench/train_throughput.py [--steps 6] [--warmup 1] [--batch-size 4] [--repeats 3] [--methods naive-lora,lora,trl-lora,...]
    python bench/train_throughput.py --model tiny --steps 2 --repeats 1 --methods lora   # a quick check of the script

Writes bench/results/train_throughput.csv and bench/results/matmul_peak.csv and prints last the ratios
vrnx LoRA / naive (target >= 4x) and vrnx LoRA / TRL SFTTrainer (target >= 1.3x), ratios of the mean tokens/s with the
per-round range, and each method's share of the peak (target >= 60%), mean over rounds with the range.
"""
import argparse, csv, json, os, resource, statistics, subprocess, sys, tempfile, time, warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT_CSV = ROOT/"bench"/"results"/"train_throughput.csv"
PEAK_CSV = ROOT/"bench"/"results"/"matmul_peak.csv"
N_TRAIN, MAX_LEN_NAIVE, MAX_LEN_TRL_PACKED, MODEL, R = 200, 512, 1024, "smollm2-135m", 16
NAIVE_DROPOUT = 0.05  # the committed baseline's LoRA dropout
LORA_KINDS = ("naive-lora", "lora", "lora-packed", "lora-padded", "trl-lora", "trl-lora-packed")
OTHER_KINDS = ("full", "qlora", "adapter")
ALIASES = {"naive": "naive-lora", "trl": "trl-lora", "trl-packed": "trl-lora-packed", "lora-grouped": "lora-padded"}
DEFAULT_METHODS = "naive-lora,lora,trl-lora,full,qlora,adapter"
CPU_SQUARES, GPU_SQUARES = (512, 768, 1024, 1536, 2048), (2048, 4096, 8192)
TARGETS = {"naive": 4.0, "trl": 1.3, "share": 0.60}
CSV_COLS = ["run", "round", "kind", "device", "threads", "load_avg", "steps", "warmup", "batch_size", "collator", "useful_tokens_per_s",
            "processed_per_useful", "logits_per_useful", "seconds_per_epoch", "peak_rss_gb", "trainable", "total", "useful_gflops",
            "processed_gflops", "executed_gflops", "matmul_peak_gflops", "model_shapes_peak_gflops", "peak_source",
            "useful_share_of_peak", "executed_share_of_peak", "adjacent_peak_gflops", "useful_share_of_adjacent_peak",
            "executed_share_of_adjacent_peak", "step_seconds", "wall_s"]
PEAK_COLS = ["pass", "shape", "m", "k", "n", "dtype", "device", "threads", "load_avg", "seconds", "gflops"]


# ---- pure helpers (tests/test_bench.py) ----

def canonical_kinds(methods:str) -> list:
    "Kinds named in a comma-separated `--methods` (aliases resolved, order kept, duplicates dropped); ValueError on unknown names."
    out = []
    for m in (s.strip() for s in methods.split(",")):
        if not m: continue
        k = ALIASES.get(m, m)
        if k not in LORA_KINDS + OTHER_KINDS:
            raise ValueError(f"--methods: unknown kind {m!r}; expected some of {', '.join(LORA_KINDS + OTHER_KINDS)} (or {', '.join(ALIASES)})")
        if k not in out: out.append(k)
    return out


def run_order(kinds:list, repeats:int) -> list:
    "(round, kind) pairs: every kind once a round, in the same order, for `repeats` rounds (drift hits every kind alike)."
    return [(i, k) for i in range(repeats) for k in kinds]


def flops_method(kind:str) -> str:
    "'full' or 'lora' (4N + 2N_trainable: LoRA, QLoRA, adapters) for the FLOP count of `kind`."
    return "full" if kind == "full" else "lora"


def flops_per_token(kind:str, n:int, nt:int) -> int:
    "Training FLOPs per token: 6N for full fine-tuning, 4N + 2N_trainable when the base is frozen."
    return 6 * n if flops_method(kind) == "full" else 4 * n + 2 * nt


def model_matmul_shapes(cfg:dict, tokens:int, r:int=R) -> list:
    "(name, m, k, n) of the (m, k) @ (k, n) products of one training step of a Llama-style model on `tokens` rows."
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    heads = cfg["num_attention_heads"]
    d = cfg.get("head_dim") or h // heads
    q, kv = heads * d, cfg.get("num_key_value_heads", heads) * d
    t = tokens
    return [("q_proj", t, h, q), ("k_proj", t, h, kv), ("o_proj", t, q, h), ("gate_up_proj", t, h, i), ("down_proj", t, i, h),
            ("lm_head", t, h, v), ("grad_w_q_proj", h, t, q), ("grad_w_gate_up", h, t, i), ("grad_w_down", i, t, h),
            ("grad_x_lm_head", t, v, h), ("lora_a", t, h, r), ("lora_b", t, r, i)]


def best_rates(rows:list) -> dict:
    "Best GFLOP/s per shape over the passes of `rows` (matmul_peak.csv rows)."
    best = {}
    for r in rows: best[r["shape"]] = max(best.get(r["shape"], 0.0), r["gflops"])
    return best


def peak_summary(rows:list) -> tuple:
    "(overall peak, best of the model's own shapes, the shape that gave the peak) from matmul_peak.csv rows."
    best = best_rates(rows)
    if not best: raise ValueError("peak_summary: no matmul measurements")
    top = max(best, key=best.get)
    model = [g for s, g in best.items() if not s.startswith("square_")]
    return best[top], (max(model) if model else float("nan")), top


def executed_flops_per_token(kind:str, n:int, nt:int, vocab_params:int, processed:float, logits:float) -> float:
    "FLOPs run per useful token: the count per position at every processed position, the vocabulary projection only where computed."
    head = (6 if flops_method(kind) == "full" else 4) * vocab_params
    return processed * (flops_per_token(kind, n, nt) - head) + logits * head


def mean_rate(rows:list, kind:str, col:str="useful_tokens_per_s") -> float|None:
    "Mean of `col` over `kind`'s runs (rounds), None when it did not run."
    xs = [r[col] for r in rows if r["kind"] == kind]
    return sum(xs) / len(xs) if xs else None


def adjacent_peaks(peak_rows:list, n_runs:int) -> list:
    "Run i's peak: the best GFLOP/s of the passes `p{i}` (just before it) and `p{i+1}` (just after it)."
    return [peak_summary([r for r in peak_rows if r["pass"] in (f"p{i}", f"p{i + 1}")])[0] for i in range(n_runs)]


def share_line(rows:list, kind:str, target:float|None, of:str="peak") -> str:
    "'kind: mean share of the peak (`of`: 'peak' or 'adjacent_peak') over its rounds, their range, the executed share, MET?'."
    u = [r[f"useful_share_of_{of}"] for r in rows if r["kind"] == kind]
    e = [r[f"executed_share_of_{of}"] for r in rows if r["kind"] == kind]
    name = "share of the " + ("adjacent peak" if of == "adjacent_peak" else "best peak")
    if not u: return f"{name}, {kind}: n/a (did not run)"
    m = sum(u) / len(u)
    verdict = "" if target is None else f"; target >= {target:.0%} {'MET' if m >= target else 'NOT MET'}"
    return (f"{name}, {kind:16s}: {m:.0%} mean of {len(u)} round(s) (range {min(u):.0%}-{max(u):.0%}); executed FLOPs "
            f"{sum(e) / len(e):.0%} ({min(e):.0%}-{max(e):.0%}){verdict}")


def ratio_line(rows:list, num:str, den:str, target:float) -> str:
    "'num / den useful tokens/s: X.XXx (rounds a-b, target >= T)', or why it could not be formed."
    a, b = mean_rate(rows, num), mean_rate(rows, den)
    if a is None or b is None: return f"{num} / {den}: n/a ({num if a is None else den} did not run)"
    per = [x["useful_tokens_per_s"] / y["useful_tokens_per_s"] for x in rows if x["kind"] == num
           for y in rows if y["kind"] == den and y["round"] == x["round"]]
    spread = f", per round {min(per):.2f}x-{max(per):.2f}x" if len(per) > 1 else ""
    return f"{num} / {den} useful tokens/s: {a / b:.2f}x (target >= {target}x{spread}) {'MET' if a / b >= target else 'NOT MET'}"


def batch_tokens(inputs:dict) -> tuple:
    "(useful, processed) tokens of a collated batch: the examples' non-padding tokens, and all positions the model runs."
    ids, prefix = inputs["input_ids"], inputs.get("prefix_ids")
    processed = ids.numel() + (prefix.numel() if prefix is not None else 0)  # a shared prompt prefix runs once
    if inputs.get("real_tokens") is not None: return int(inputs["real_tokens"]), processed
    if inputs.get("attention_mask") is not None: return int(inputs["attention_mask"].sum()), processed
    return ids.numel(), processed  # padding-free: one flattened row, no pads


def describe_collator(c) -> str:
    "A collator's class name, with the collators it wraps: 'SharedPrefixCollator(PaddedCollator)'."
    inner = [type(v).__name__ for v in vars(c).values() if type(v).__name__.endswith("Collator")] if hasattr(c, "__dict__") else []
    return type(c).__name__ + (f"({', '.join(inner)})" if inner else "")


# ---- measurements ----

def rss_gb(): return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def time_matmul(m, k, n, dtype, device, repeats=5, min_s=0.05) -> float:
    "Best seconds of one (m, k) @ (k, n) product over `repeats` timings of enough products to last `min_s`."
    import torch
    a, b = torch.randn(m, k, device=device, dtype=dtype), torch.randn(k, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    out = a @ b; sync()
    t = time.perf_counter(); out = a @ b; sync(); one = time.perf_counter() - t
    reps = max(1, int(min_s / max(one, 1e-7)))
    best = float("inf")
    for _ in range(repeats):
        sync(); t = time.perf_counter()
        for _ in range(reps): torch.matmul(a, b, out=out)
        sync(); best = min(best, (time.perf_counter() - t) / reps)
    return best


def measure_peak(pass_name, shapes, device, repeats) -> list:
    "matmul_peak.csv rows of one pass over `shapes`."
    import torch
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    rows = []
    for name, m, k, n in shapes:
        s = time_matmul(m, k, n, dtype, device, repeats)
        rows.append({"pass": pass_name, "shape": name, "m": m, "k": k, "n": n, "dtype": str(dtype).replace("torch.", ""),
                     "device": device, "threads": torch.get_num_threads(), "load_avg": round(os.getloadavg()[0], 2), "seconds": s,
                     "gflops": 2 * m * k * n / s / 1e9})
    return rows


def window_rates(marks:list, warmup:int) -> dict:
    "Rates over the steps after the first `warmup`, from (seconds, useful, processed, logit rows) marks at the start and each step's end."
    if len(marks) < warmup + 2:
        raise RuntimeError(f"no timed steps: {len(marks) - 1} step(s) with {warmup} warm-up; pass --steps {warmup + 1} or more")
    (t0, u0, p0, l0), (t1, u1, p1, l1) = marks[warmup], marks[-1]
    steps = [round(b[0] - a[0], 3) for a, b in zip(marks, marks[1:])]
    return {"useful_tokens_per_s": (u1 - u0) / (t1 - t0), "processed_per_useful": (p1 - p0) / (u1 - u0),
            "logits_per_useful": (l1 - l0) / (u1 - u0), "step_seconds": steps, "timed_steps": len(marks) - 1 - warmup,
            "step_tokens": [b[1] - a[1] for a, b in zip(marks, marks[1:])]}


def _counting(trainer_cls, warmup:int):
    "A subclass of `trainer_cls` that counts the tokens of every training batch and marks the clock after each step."
    from transformers import TrainerCallback

    class Counting(trainer_cls):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.useful = self.processed = self.logit_rows = 0; self.marks = []
            self.add_callback(Clock(self))
        def compute_loss(self, model, inputs, *a, **k):
            if model.training:
                u, p = batch_tokens(inputs); self.useful += u; self.processed += p
                # rows projected onto the vocabulary: the completion positions where vrnx slices the logits, else all
                sliced = getattr(self, "sliced_logits", False) and inputs.get("labels") is not None
                self.logit_rows += int((inputs["labels"][:, 1:] != -100).sum()) if sliced else p
            return super().compute_loss(model, inputs, *a, **k)
        def rates(self): return window_rates(self.marks, warmup)

    class Clock(TrainerCallback):  # a window between two marks covers its steps' batch loading and collation,
        "Marks (time, tokens so far) when training starts and after every optimizer step."  # forward, backward, update, logging
        def __init__(self, tr): self.tr = tr
        def mark(self): self.tr.marks.append((time.perf_counter(), self.tr.useful, self.tr.processed, self.tr.logit_rows))
        def on_train_begin(self, args, state, control, **kw): self.mark()
        def on_step_end(self, args, state, control, **kw): self.mark()

    return Counting


def run_vrnx(kind, a, device):
    "`lora`, `full`, ... through finetune with its defaults (its own VrnxTrainer, counted and clocked like the others)."
    import vrnx_nb.training as T
    from vrnx_nb.tasks import load_task
    seen, make, trainer_cls = {"collator": "", "trainer": None}, T.train_collator, T.VrnxTrainer
    Counting = _counting(trainer_cls, a.warmup)

    class Spied(Counting):
        def __init__(self, *args, **kw): super().__init__(*args, **kw); seen["trainer"] = self

    def spy(*args, **kw):  # the collator finetune picks
        c = make(*args, **kw); seen["collator"] = describe_collator(c); return c
    T.train_collator, T.VrnxTrainer = spy, Spied
    packing = {"lora-packed": True, "lora-padded": False}.get(kind)
    task = load_task(a.task, n_train=a.n_train)
    try:
        with tempfile.TemporaryDirectory() as d:
            res = T.finetune(a.model, task, method=kind.split("-")[0], packing=packing, r=R, max_steps=a.steps, batch_size=a.batch_size,
                             eval_steps=10**6, early_stopping_patience=None, max_val_examples=8, output_dir=d, overwrite=True, device=device)
    finally: T.train_collator, T.VrnxTrainer = make, trainer_cls
    return {**seen["trainer"].rates(), "trainable": res.trainable_params, "total": res.total_params, "collator": seen["collator"],
            "vrnx_tokens_per_s": res.useful_tokens_per_s}


def run_naive(a, device):
    "HF Trainer, LoRA r=16 all-linear, fp32, every example padded to 512 tokens, no packing (the committed baseline)."
    import torch
    from transformers import Trainer, TrainingArguments, AutoModelForCausalLM
    from peft import LoraConfig, get_peft_model
    from vrnx_nb.tasks import load_task, render_pair
    from vrnx_nb.models import resolve_model_path, load_tokenizer
    tok = load_tokenizer(a.model)
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(a.model), dtype=torch.float32).to(device)
    model = get_peft_model(model, LoraConfig(r=R, lora_alpha=2*R, lora_dropout=a.naive_dropout, target_modules="all-linear", task_type="CAUSAL_LM"))
    task = load_task(a.task, n_train=a.n_train)
    rows = []
    for ex in task.train:
        pair = render_pair(task, ex, tok)
        enc = tok(pair["prompt"] + pair["completion"], padding="max_length", max_length=MAX_LEN_NAIVE, truncation=True)
        n_prompt = len(tok(pair["prompt"])["input_ids"])
        labels = [(-100 if i < n_prompt or m == 0 else t) for i, (t, m) in enumerate(zip(enc["input_ids"], enc["attention_mask"]))]
        rows.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels})
    with tempfile.TemporaryDirectory() as d:
        args = TrainingArguments(output_dir=d, per_device_train_batch_size=a.batch_size, max_steps=a.steps, learning_rate=2e-4,
                                 logging_steps=1, save_strategy="no", eval_strategy="no", report_to=[], seed=0,
                                 disable_tqdm=True, use_cpu=device == "cpu")
        tr = _counting(Trainer, a.warmup)(model=model, args=args, train_dataset=rows,
                                data_collator=lambda fs: {k: torch.tensor([f[k] for f in fs]) for k in fs[0]})
        tr.train()
    tp, tot = model.get_nb_trainable_parameters()
    return {**tr.rates(), "trainable": tp, "total": tot, "collator": f"padded to {MAX_LEN_NAIVE}"}


def run_trl(kind, a, device):
    "trl.SFTTrainer, prompt-completion data, completion-only loss, padding-free (or BFD packing), vrnx's LoRA config."
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer
    from vrnx_nb.models import resolve_model_path, load_tokenizer
    from vrnx_nb.tasks import load_task, render_pair
    from vrnx_nb.training import TrainConfig
    gpu_bf16 = device == "cuda" and torch.cuda.is_bf16_supported()
    tok = load_tokenizer(a.model)
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(a.model), dtype=torch.bfloat16 if gpu_bf16 else torch.float32).to(device)
    task = load_task(a.task, n_train=a.n_train)
    data = Dataset.from_list([render_pair(task, ex, tok) for ex in task.train])
    packed = kind.endswith("-packed")
    dflt = TrainConfig()
    lcfg = LoraConfig(r=R, lora_alpha=2*R, lora_dropout=dflt.lora_dropout, target_modules="all-linear", bias="none", task_type="CAUSAL_LM")
    with tempfile.TemporaryDirectory() as d:
        args = SFTConfig(output_dir=d, per_device_train_batch_size=a.batch_size, max_steps=a.steps, learning_rate=2e-4,
                         logging_steps=1, save_strategy="no", eval_strategy="no", report_to=[], seed=0, disable_tqdm=True,
                         use_cpu=device == "cpu", bf16=gpu_bf16, gradient_checkpointing=False, completion_only_loss=True,
                         packing=packed, padding_free=not packed, max_length=MAX_LEN_TRL_PACKED if packed else None)
        tr = _counting(SFTTrainer, a.warmup)(model=model, args=args, train_dataset=data, processing_class=tok, peft_config=lcfg)
        tr.train()
        tp, tot = tr.model.get_nb_trainable_parameters()
    return {**tr.rates(), "trainable": tp, "total": tot,
            "collator": f"trl packed {MAX_LEN_TRL_PACKED} (bfd, padding-free)" if packed else "trl padding-free"}


def one(kind, a):
    "Child process: one run, JSON on the last line."
    warnings.filterwarnings("ignore")
    import logging; logging.getLogger("transformers").setLevel(logging.ERROR)
    import torch
    if a.threads: torch.set_num_threads(a.threads)
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    t = time.time()
    if kind == "naive-lora": r = run_naive(a, device)
    elif kind.startswith("trl-"): r = run_trl(kind, a, device)
    else: r = run_vrnx(kind, a, device)
    r.update(kind=kind, wall_s=time.time() - t, peak_rss_gb=rss_gb(), threads=torch.get_num_threads())
    print("JSON " + json.dumps(r))


def _write(path, cols, rows):
    out = Path(path); out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, cols, extrasaction="ignore"); w.writeheader(); w.writerows(rows)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=6, help="optimizer steps per run (the first --warmup are not timed)")
    p.add_argument("--warmup", type=int, default=1, help="steps each run trains before its timed window (lazy initialisation)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3, help="rounds; each round runs every method once, in the same order")
    p.add_argument("--methods", default=DEFAULT_METHODS,
                   help=f"kinds to run, each once a round: {', '.join(LORA_KINDS + OTHER_KINDS)}")
    p.add_argument("--threads", type=int, default=None, help="torch threads in every run; default: what torch picks (a user's default)")
    p.add_argument("--model", default=MODEL, help="model alias or folder ('tiny' to check the script quickly)")
    p.add_argument("--task", default="legal"); p.add_argument("--n-train", type=int, default=N_TRAIN)
    p.add_argument("--naive-dropout", type=float, default=NAIVE_DROPOUT, help="LoRA dropout of the naive baseline (as committed)")
    p.add_argument("--peak-tokens", type=int, default=1024, help="rows of the model-shape matmuls (a training batch's tokens)")
    p.add_argument("--peak-repeats", type=int, default=5, help="timings per shape per pass (best kept)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--out", default=str(OUT_CSV), help="CSV to write")
    p.add_argument("--peak-out", default=str(PEAK_CSV), help="matmul peak CSV to write")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.one: return one(a.one, a)
    try: kinds = canonical_kinds(a.methods)
    except ValueError as e: p.error(str(e))
    if a.steps < a.warmup + 1: p.error(f"--steps must be more than --warmup ({a.warmup}): the warm-up steps are not timed")
    import torch
    if a.threads: torch.set_num_threads(a.threads)
    threads = torch.get_num_threads()
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    from transformers import AutoConfig
    from vrnx_nb.models import load_tokenizer, resolve_model_path
    from vrnx_nb.tasks import load_task
    from vrnx_nb.training import tokenize_split
    cfg = AutoConfig.from_pretrained(resolve_model_path(a.model)).to_dict()
    vocab_params = cfg["vocab_size"] * cfg["hidden_size"]  # the output projection (tied to the embeddings in SmolLM2)
    squares = CPU_SQUARES if device == "cpu" else GPU_SQUARES
    shapes = [(f"square_{n}", n, n, n) for n in squares] + model_matmul_shapes(cfg, a.peak_tokens)
    peak_rows = measure_peak("p0", shapes, device, a.peak_repeats)
    peak, model_peak, top = peak_summary(peak_rows)
    print(f"matmul peak before the runs: {peak:.1f} GFLOP/s ({top}; model shapes {model_peak:.1f}) on {device}, {threads} thread(s)", flush=True)
    epoch_tokens = sum(len(r["input_ids"]) for r in tokenize_split(load_task(a.task, n_train=a.n_train), "train", load_tokenizer(a.model))[0])

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if a.threads: env["OMP_NUM_THREADS"] = str(a.threads)
    child = ["--steps", str(a.steps), "--warmup", str(a.warmup), "--batch-size", str(a.batch_size), "--model", a.model, "--task", a.task,
             "--n-train", str(a.n_train), "--naive-dropout", str(a.naive_dropout)] + (["--threads", str(a.threads)] if a.threads else []) \
            + (["--device", a.device] if a.device else [])
    rows, failed = [], []
    for i, (rnd, kind) in enumerate(run_order(kinds, a.repeats)):
        load = round(os.getloadavg()[0], 2)
        pr = subprocess.run([sys.executable, __file__, "--one", kind] + child, capture_output=True, text=True, env=env)
        peak_rows += measure_peak(f"p{i + 1}", shapes, device, a.peak_repeats)  # after run i, before run i + 1
        line = [l for l in pr.stdout.splitlines() if l.startswith("JSON ")]
        if pr.returncode or not line:
            failed.append(kind); print(f"{kind} FAILED (rc {pr.returncode}):\n{pr.stderr[-3000:]}", flush=True); continue
        r = json.loads(line[-1][5:])
        r["adjacent_peak_gflops"] = adjacent_peaks(peak_rows, i + 1)[i]
        fpt = flops_per_token(kind, r["total"], r["trainable"])
        ept = executed_flops_per_token(kind, r["total"], r["trainable"], vocab_params, r["processed_per_useful"], r["logits_per_useful"])
        r.update(run=i, round=rnd, device=device, load_avg=load, steps=a.steps, warmup=a.warmup, batch_size=a.batch_size,
                 seconds_per_epoch=epoch_tokens / r["useful_tokens_per_s"], useful_gflops=fpt * r["useful_tokens_per_s"] / 1e9,
                 processed_gflops=fpt * r["useful_tokens_per_s"] * r["processed_per_useful"] / 1e9,
                 executed_gflops=ept * r["useful_tokens_per_s"] / 1e9, step_seconds=" ".join(f"{x:.2f}" for x in r["step_seconds"]))
        rows.append(r)
        print(f"{kind:16s} round {rnd}: {r['useful_tokens_per_s']:7.1f} useful tok/s  {r['seconds_per_epoch']:6.1f} s/epoch "
              f"{r['useful_gflops']:6.1f} useful GFLOP/s ({r['useful_gflops'] / r['adjacent_peak_gflops']:.0%} of the adjacent peak "
              f"{r['adjacent_peak_gflops']:.0f}), "
              f"executed {r['executed_gflops']:6.1f}  x{r['processed_per_useful']:.2f} processed  steps {r['step_seconds']} s  "
              f"peak RSS {r['peak_rss_gb']:.2f} GB  [{r['collator']}, {r['threads']} thr, load {load}]", flush=True)

    peak, model_peak, top = peak_summary(peak_rows)
    passes = len({r["pass"] for r in peak_rows})
    source = f"best of {len(squares)} squares and {len(shapes) - len(squares)} model shapes at {a.peak_tokens} tokens, " \
             f"{a.peak_repeats} timings each, {passes} passes (before, between and after the runs): {top}, {threads} thread(s)"
    for r in rows:
        adj = r["adjacent_peak_gflops"]
        r.update(matmul_peak_gflops=peak, model_shapes_peak_gflops=model_peak, peak_source=source,
                 useful_share_of_peak=r["useful_gflops"] / peak, executed_share_of_peak=r["executed_gflops"] / peak,
                 useful_share_of_adjacent_peak=r["useful_gflops"] / adj, executed_share_of_adjacent_peak=r["executed_gflops"] / adj)
    best = best_rates(peak_rows)
    best_rows = [{**max((r for r in peak_rows if r["shape"] == s), key=lambda r: r["gflops"]), "pass": "best"} for s in best]
    out = _write(a.out, CSV_COLS, rows); pout = _write(a.peak_out, PEAK_COLS, peak_rows + best_rows)
    print(f"wrote {out} and {pout}; matmul GFLOP/s per shape (best of both passes): "
          + ", ".join(f"{s} {g:.0f}" for s, g in best.items()))
    adj = [r["adjacent_peak_gflops"] for r in rows]
    print(f"matmul peak: {peak:.1f} GFLOP/s ({source}); best model shape {model_peak:.1f}; "
          f"adjacent peaks {min(adj):.0f}-{max(adj):.0f}" if adj else "")
    for k in dict.fromkeys(r["kind"] for r in rows): print(share_line(rows, k, None, "peak"))
    for k in dict.fromkeys(r["kind"] for r in rows): print(share_line(rows, k, TARGETS["share"], "adjacent_peak"))
    if device == "cpu": print("timings on a shared CPU drift with other jobs; every round runs every method once, in the same order")
    print(ratio_line(rows, "lora", "naive-lora", TARGETS["naive"]))
    for t in [k for k in kinds if k.startswith("trl-")] or ["trl-lora"]: print(ratio_line(rows, "lora", t, TARGETS["trl"]))
    if failed: print(f"failed runs: {', '.join(failed)}"); return 1
    return 0


if __name__ == "__main__": sys.exit(main())
