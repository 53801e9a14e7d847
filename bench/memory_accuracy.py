"""Estimated vs. measured peak memory of a few real training steps of SmolLM2-135M on the CPU, per method.

Each method runs in a fresh subprocess (forward + backward + AdamW step, fp32, random token ids, no padding);
its peak RSS (`ru_maxrss`) is compared with `vrnx_nb.memory.estimate_memory(..., device="cpu")`, whose framework
overhead is set to the process baseline measured in the same child (RSS after importing torch, transformers,
peft, bitsandbytes, before the model is loaded).

    OMP_NUM_THREADS=2 .venv/bin/python bench/memory_accuracy.py            # writes bench/results/memory_accuracy.csv
    .venv/bin/python bench/memory_accuracy.py --batch 2 --seq 128 --steps 2 # quicker
"""
import argparse, csv, json, os, resource, subprocess, sys, time
from pathlib import Path

RUNS = [("full", False), ("lora", False), ("qlora", False), ("adapter", False), ("lora", True), ("qlora", True)]

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
            from vrnx_nb.training import add_adapters  # the training helper's Houlsby adapters, when present
            model, note = add_adapters(model, r=r), "vrnx_nb.training.add_adapters"
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

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4); ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3); ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--runs", default=",".join(f"{m}{'+gc' if c else ''}" for m, c in RUNS), help="e.g. full,lora,lora+gc")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(Path(__file__).parent/"results"/"memory_accuracy.csv"))
    a = ap.parse_args(argv)
    if a.child:
        m, _, gc = a.child.partition("+"); return child(m, gc == "gc", a.batch, a.seq, a.steps, a.r)
    from vrnx_nb.memory import estimate_memory
    rows = []
    for run in a.runs.split(","):
        cmd = [sys.executable, __file__, "--child", run, "--batch", str(a.batch), "--seq", str(a.seq), "--steps", str(a.steps), "--r", str(a.r)]
        res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        lines = [l for l in res.stdout.splitlines() if l.startswith("{")]
        if res.returncode or not lines: sys.exit(f"{run} failed:\n{res.stderr[-3000:]}")
        m = json.loads(lines[-1])
        est = estimate_memory("smollm2-135m", m["method"], r=a.r, batch_size=a.batch, seq_len=a.seq, gradient_checkpointing=m["checkpointing"],
                              dtype="float32", device="cpu", overhead_gb=m["baseline_gb"])
        row = dict(method=m["method"], gradient_checkpointing=m["checkpointing"], batch_size=a.batch, seq_len=a.seq, steps=a.steps, r=a.r,
                   baseline_gb=round(m["baseline_gb"], 3), measured_peak_gb=round(m["peak_gb"], 3), estimated_gb=round(est.total, 3),
                   rel_error=round((est.total - m["peak_gb"]) / m["peak_gb"], 4), est_weights_gb=round(est.weights, 3),
                   est_gradients_gb=round(est.gradients, 3), est_optimizer_gb=round(est.optimizer, 3), est_activations_gb=round(est.activations, 3),
                   trainable_params=m["trainable"], est_trainable_params=est.trainable_params, step_s=round(m["step_s"], 2), note=m["note"])
        rows.append(row); print(json.dumps(row), flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    with open(a.out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0])); w.writeheader(); w.writerows(rows)
    worst = max(rows, key=lambda r: abs(r["rel_error"]))
    print(f"wrote {a.out}")
    print(f"worst relative error: {worst['rel_error']:+.1%} ({worst['method']}{' +checkpointing' if worst['gradient_checkpointing'] else ''})")

if __name__ == "__main__": main()
