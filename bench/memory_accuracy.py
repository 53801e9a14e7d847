"""Estimated vs. measured peak memory of a few real training steps of SmolLM2-135M on the CPU, per method.

Each method runs in a fresh subprocess (forward + backward + AdamW step, fp32, random token ids, no padding);
its peak RSS (`ru_maxrss`) is compared with `vrnx_nb.memory.estimate_memory(..., device="cpu")`, whose framework
overhead is set to the process baseline measured in the same child (RSS after importing torch, transformers,
peft, bitsandbytes, before the model is loaded).

The main comparison runs with `MALLOC_MMAP_THRESHOLD_=131072`, so glibc returns freed tensors to the OS and RSS tracks
the tensors alive. With glibc's default (a dynamic threshold that rises to 32 MB), freed activation blocks stay in the
heap and RSS of the frozen-base methods grows well past the live peak; those runs are measured too and reported apart.
Raw measurements go to bench/results/memory_accuracy_raw.json (`--recompute` re-estimates from them).

    OMP_NUM_THREADS=2 .venv/bin/python bench/memory_accuracy.py            # writes bench/results/memory_accuracy.csv
    .venv/bin/python bench/memory_accuracy.py --batch 2 --seq 128 --steps 2 # quicker
"""
import argparse, csv, json, os, resource, subprocess, sys, time
from pathlib import Path

RUNS = [("full", False), ("lora", False), ("qlora", False), ("adapter", False), ("lora", True)]

def rss_gb() -> float:
    import psutil
    return psutil.Process().memory_info().rss / 1e9

def peak_gb() -> float: return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux: KiB

def add_bottleneck_adapters(model, r):
    "Houlsby adapters after attention and MLP of every block, for measurement only (used when vrnx_nb.training has none)."
    import torch.nn as nn
    class Bottleneck(nn.Module):
        def __init__(self, h, r):
            super().__init__(); self.down, self.up = nn.Linear(h, r), nn.Linear(r, h); nn.init.zeros_(self.up.weight); nn.init.zeros_(self.up.bias)
        def forward(self, x): return x + self.up(nn.functional.gelu(self.down(x)))
    def hook(mod, inp, out): return (mod.adapter(out[0]),) + tuple(out[1:]) if isinstance(out, tuple) else mod.adapter(out)
    for p in model.parameters(): p.requires_grad_(False)
    h = model.config.hidden_size
    for layer in model.model.layers:
        for mod in (layer.self_attn, layer.mlp):
            mod.adapter = Bottleneck(h, r).to(next(mod.parameters()).dtype)
            mod.register_forward_hook(hook)
    return model, "in-script bottleneck adapter"

def child(method, checkpointing, batch, seq, steps, r):
    import torch, transformers, peft
    if method == "qlora": import bitsandbytes
    import vrnx_nb.models as vm
    baseline = rss_gb()
    torch.manual_seed(0)
    qc, note = None, ""
    if method == "qlora":
        from transformers import BitsAndBytesConfig
        qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    model, tok = vm.load_model("smollm2-135m", dtype=torch.float32, device="cpu", quantization_config=qc)
    loaded = rss_gb()
    if method == "qlora": model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if method in ("lora", "qlora"):
        model = peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=2*r, target_modules="all-linear", lora_dropout=0.0, task_type="CAUSAL_LM"))
    elif method == "adapter":
        try:
            from vrnx_nb.training import BottleneckModel, BottleneckConfig  # the training module's Houlsby adapters
            model, note = BottleneckModel(model, BottleneckConfig(r=r)), "vrnx_nb.training.BottleneckModel"
        except ImportError: model, note = add_bottleneck_adapters(model, r)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "enable_input_require_grads"): model.enable_input_require_grads()
    model.config.use_cache = False
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    x = torch.randint(0, model.config.vocab_size, (batch, seq))
    t0 = time.time()
    for _ in range(steps):
        loss = model(input_ids=x, labels=x).loss
        loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
    print(json.dumps(dict(method=method, checkpointing=checkpointing, baseline_gb=baseline, loaded_gb=loaded, peak_gb=peak_gb(),
                          trainable=sum(p.numel() for p in params), loss=float(loss), step_s=(time.time()-t0)/steps, note=note)))

RELEASE_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}  # glibc: tensors >= 128 KiB get their own mapping, returned on free

def measure(run, a, malloc):
    cmd = [sys.executable, __file__, "--child", run, "--batch", str(a.batch), "--seq", str(a.seq), "--steps", str(a.steps), "--r", str(a.r)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(RELEASE_ENV if malloc == "release" else {})}
    if malloc != "release": env.pop("MALLOC_MMAP_THRESHOLD_", None)
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [l for l in res.stdout.splitlines() if l.startswith("{")]
    if res.returncode or not lines: sys.exit(f"{run} failed:\n{res.stderr[-3000:]}")
    return {**json.loads(lines[-1]), "malloc": malloc, "batch": a.batch, "seq": a.seq, "steps": a.steps, "r": a.r}

def compare(m):
    from vrnx_nb.memory import estimate_memory
    est = estimate_memory("smollm2-135m", m["method"], r=m["r"], batch_size=m["batch"], seq_len=m["seq"], gradient_checkpointing=m["checkpointing"],
                          dtype="float32", device="cpu", overhead_gb=m["baseline_gb"])
    return dict(method=m["method"], gradient_checkpointing=m["checkpointing"], malloc=m["malloc"], batch_size=m["batch"], seq_len=m["seq"],
                steps=m["steps"], r=m["r"], baseline_gb=round(m["baseline_gb"], 3), measured_peak_gb=round(m["peak_gb"], 3),
                estimated_gb=round(est.total, 3), rel_error=round((est.total - m["peak_gb"]) / m["peak_gb"], 4),
                est_weights_gb=round(est.weights, 3), est_states_gb=round(est.trainable + est.gradients + est.optimizer, 3),
                est_activations_gb=round(est.activations, 3), trainable_params=m["trainable"], est_trainable_params=est.trainable_params,
                step_s=round(m["step_s"], 1), note=m["note"])

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4); ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=2, help="optimizer steps (the peak is reached in step 2, once AdamW's states exist)")
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--runs", default=",".join(f"{m}{'+gc' if c else ''}" for m, c in RUNS), help="e.g. full,lora,lora+gc")
    ap.add_argument("--default-malloc-runs", default="full,lora,qlora,adapter", help="runs also measured with glibc's default settings ('' for none)")
    ap.add_argument("--recompute", action="store_true", help="re-estimate from the saved raw measurements, without training")
    ap.add_argument("--append", action="store_true", help="add these runs to the saved raw measurements instead of starting afresh")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(Path(__file__).parent/"results"/"memory_accuracy.csv"))
    a = ap.parse_args(argv)
    if a.child:
        m, _, gc = a.child.partition("+"); return child(m, gc == "gc", a.batch, a.seq, a.steps, a.r)
    raw_path = Path(a.out).with_name(Path(a.out).stem + "_raw.json")
    if a.recompute: raw = json.loads(raw_path.read_text())
    else:
        raw = json.loads(raw_path.read_text()) if a.append and raw_path.exists() else []
        for malloc, runs in (("release", a.runs), ("default", a.default_malloc_runs)):
            for run in filter(None, runs.split(",")):
                raw.append(measure(run, a, malloc)); print(json.dumps(raw[-1]), flush=True)
                raw_path.parent.mkdir(parents=True, exist_ok=True); raw_path.write_text(json.dumps(raw, indent=1))
    rows = [compare(m) for m in raw]
    with open(a.out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0])); w.writeheader(); w.writerows(rows)
    for r in rows: print(f"{r['method']:8s} ckpt={r['gradient_checkpointing']!s:5s} malloc={r['malloc']:7s} measured {r['measured_peak_gb']:.2f} GB  "
                         f"estimated {r['estimated_gb']:.2f} GB  error {r['rel_error']:+.1%}")
    print(f"process baseline (RSS after imports): {min(r['baseline_gb'] for r in rows):.2f}-{max(r['baseline_gb'] for r in rows):.2f} GB; wrote {a.out}")
    dflt = [r for r in rows if r["malloc"] == "default"]
    if dflt:
        w = max(dflt, key=lambda r: abs(r["rel_error"]))
        print(f"with glibc's default malloc settings (freed blocks < 32 MB stay in the heap) worst error: {w['rel_error']:+.1%} ({w['method']})")
    rel = [r for r in rows if r["malloc"] == "release"]
    worst = max(rel, key=lambda r: abs(r["rel_error"]))
    print(f"worst relative error (MALLOC_MMAP_THRESHOLD_=131072): {worst['rel_error']:+.1%} ({worst['method']}{' +checkpointing' if worst['gradient_checkpointing'] else ''})")

if __name__ == "__main__": main()
