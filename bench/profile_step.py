"""Where a training step's time goes: torch profiler over vrnx's own step (collator, shared prefix, sliced logits,
completion loss, AdamW) for LoRA, full fine-tuning, QLoRA and the bottleneck adapter of SmolLM2-135M on legal batches.

Each method builds its model with `vrnx_nb.training.build_model`, collates real legal batches (8 oversampled
examples) with `train_collator`, runs warm-up steps unprofiled, then profiles `--steps` steps. The self CPU time of
every operator is summed into a few kinds (matmul, attention, loss, normalisation and activations, element-wise,
optimizer, copies and layout, other); the phases (forward, backward, optimizer step) come from `record_function`
ranges. Writes bench/results/profile_step.csv (method, group 'phase' or 'kind', name, ms per step, share) that the
training notebook reads.

    .venv/bin/python bench/profile_step.py                         # lora, full, qlora, adapter, 3 profiled steps each
    .venv/bin/python bench/profile_step.py --methods qlora --top 20  # also the 20 operators with the most self time
    .venv/bin/python bench/profile_step.py --model tiny --steps 1 --out /tmp/p.csv    # script check
"""
import argparse, csv, os, time
from pathlib import Path

OUT_CSV = Path(__file__).parent/"results"/"profile_step.csv"
KINDS = {  # operator name fragments -> kind; first match wins
    "bitsandbytes 4-bit": ("dequantize", "gemm_4bit", "matmul4bit"),  # QLoRA: unpacking 4-bit weights, its autograd wrappers
    "attention": ("scaled_dot_product", "flash_attention", "_efficient_attention", "softmax_backward", "aten::softmax"),
    "loss": ("log_softmax", "nll_loss", "cross_entropy"),
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear", "aten::dot"),
    "optimizer": ("_foreach", "addcdiv", "addcmul", "lerp", "aten::sqrt", "adam"),
    "normalisation and activations": ("rms", "silu", "gelu", "aten::rsqrt", "aten::pow", "aten::mean", "tanh", "sigmoid"),
    "copies and layout": ("copy", "clone", "cat", "contiguous", "to_copy", "aten::index", "gather", "scatter", "expand",
                          "transpose", "view", "reshape", "permute", "empty", "zero", "fill"),
    "element-wise": ("aten::mul", "aten::add", "aten::sub", "aten::div", "aten::neg", "aten::sum", "aten::where"),
}
PHASES = ("forward", "backward", "optimizer step")


def kind_of(op:str) -> str:
    "The kind an operator's self time is counted under."
    low = op.lower()
    for kind, frags in KINDS.items():
        if any(f.lower() in low for f in frags): return kind
    return "other"


def summarise(events, n_steps:int) -> list[dict]:
    "Rows (group, name, ms per step, share) from a profiler's `key_averages()`: phases, then operator kinds."
    phase = {e.key: e.cpu_time_total for e in events if e.key in PHASES}
    kinds = {}
    for e in events:
        if e.key in PHASES or e.key.startswith("ProfilerStep"): continue
        kinds[kind_of(e.key)] = kinds.get(kind_of(e.key), 0.0) + e.self_cpu_time_total
    rows = []
    for group, d in (("phase", phase), ("kind", kinds)):
        total = sum(d.values()) or 1.0
        for name, us in sorted(d.items(), key=lambda kv: -kv[1]):
            rows.append({"group": group, "name": name, "ms_per_step": round(us/1e3/n_steps, 1), "share": round(us/total, 3)})
    return rows


def profile_method(model_name:str, method:str, steps:int, warmup:int, batch_size:int, seed:int, top:int=0) -> list[dict]:
    "Profile `steps` training steps of `method`; returns the summary rows."
    import torch
    from torch.profiler import profile, ProfilerActivity, record_function
    from vrnx_nb.tasks import load_task
    from vrnx_nb.training import (TrainConfig, build_model, tokenize_split, train_collator, forward_batch, completion_loss,
                                  completion_positions, label_balance_weights)
    task = load_task("legal", n_train=200, min_per_label=8, seed=seed)
    model, tok = build_model(model_name, TrainConfig(method=method), device="cpu")
    rows, _ = tokenize_split(task, "train", tok)
    weights = torch.tensor(label_balance_weights([e.target for e in task.train], 0.5))
    idx = torch.multinomial(weights, batch_size*(steps+warmup), replacement=True, generator=torch.Generator().manual_seed(seed))
    collate = train_collator(model, tok)
    batches = [collate([rows[i] for i in idx[k*batch_size:(k+1)*batch_size].tolist()]) for k in range(steps+warmup)]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    def step(batch):
        labels = batch["labels"]
        with record_function("forward"):
            loss = completion_loss(forward_batch(model, batch, logits_to_keep=completion_positions(labels)).logits, labels)
        with record_function("backward"): loss.backward()
        with record_function("optimizer step"): opt.step(); opt.zero_grad(set_to_none=True)
    for b in batches[:warmup]: step(b)
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for b in batches[warmup:]: step(b)
    wall = time.perf_counter() - t0
    out = summarise(prof.key_averages(), steps)
    if top:
        ev = sorted((e for e in prof.key_averages() if e.key not in PHASES and not e.key.startswith("ProfilerStep")),
                    key=lambda e: -e.self_cpu_time_total)[:top]
        for e in ev: print(f"    top {e.key[:60]:60s} {e.self_cpu_time_total/1e3/steps:9.1f} ms/step  x{e.count//steps}", flush=True)
    threads, load = torch.get_num_threads(), round(os.getloadavg()[0], 2)
    for r in out: r.update(method=method, model=model_name, steps=steps, batch_size=batch_size, threads=threads, load_avg=load,
                           wall_s_per_step=round(wall/steps, 2))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--methods", default="lora,full,qlora,adapter")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--top", type=int, default=0, help="also print the N operators with the most self time")
    ap.add_argument("--out", default=str(OUT_CSV))
    a = ap.parse_args(argv)
    rows = []
    for m in a.methods.split(","):
        got = profile_method(a.model, m, a.steps, a.warmup, a.batch_size, a.seed, a.top); rows += got
        print(f"{m}: {got[0]['wall_s_per_step']} s a step (profiled), load {got[0]['load_avg']}", flush=True)
        for r in got: print(f"  {r['group']:5s} {r['name']:30s} {r['ms_per_step']:9.1f} ms  {r['share']:.0%}")
    cols = ["method", "model", "group", "name", "ms_per_step", "share", "steps", "batch_size", "threads", "load_avg", "wall_s_per_step"]
    out = Path(a.out); out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols); w.writeheader(); w.writerows(rows)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
