"""Estimated vs. measured peak memory of a few real training steps of SmolLM2-135M on the CPU, per method.

Each method runs in a fresh subprocess (forward + backward + AdamW step, fp32, random token ids, no padding);
its peak RSS (`ru_maxrss`) is compared with `vrnx_nb.memory.estimate_memory(..., device="cpu")`, whose framework
overhead is set to the process baseline measured in the same child (RSS after importing torch, transformers,
peft, bitsandbytes, before the model is loaded). The model is built by `vrnx_nb.training.build_model`, as `finetune`
builds it.

Allocator settings, column `malloc`:
- `default`: what a user gets who sets nothing: the child does what `finetune` does with `TrainConfig`'s default
  `release_memory=False`, glibc's own settings: its mmap threshold rises with the first large free (up to 32 MB),
  freed activation blocks then stay in the heap and RSS grows well past the tensors alive (the estimate's `retained`);
- `release`: `release_memory=True`: `release_freed_memory()`, mallopt at run time, so freed tensors of 128 KiB or more
  go back to the OS (as `MALLOC_MMAP_THRESHOLD_=131072` set before start-up does); estimated with `allocator="release"`.
The child samples RSS (anonymous / file-backed) and glibc's `mallinfo2` while it trains and records them at the peak:
`heap_free_at_peak_gb` is freed memory the allocator still holds, `file_at_peak_gb` file-backed pages (the mapped
checkpoint, libraries). `step_s` is the mean over the steps after the first (the first creates AdamW's states), with
the process's system time and minor page faults per step: what handing memory back costs (fresh pages fault again).
Raw measurements go to bench/results/memory_accuracy_raw.json (`--recompute` re-estimates from them).
`--malloc trim:256` is an experiment, not a setting of vrnx: a thread calls malloc_trim whenever glibc's heap holds more
than 256 MB freed (it bounds the peak like `release`, and costs about as many page faults).

`--time-modes` instead times the allocator settings against each other: one process per setting, both loaded, taking
turns step by step (default, release, default, release, ...), so that a busy CPU slows both alike; it writes
bench/results/memory_accuracy_step_time.csv (per step: seconds, system seconds, minor page faults).

    OMP_NUM_THREADS=2 .venv/bin/python bench/memory_accuracy.py            # writes bench/results/memory_accuracy.csv
    .venv/bin/python bench/memory_accuracy.py --runs lora --malloc default --append   # one run added to the saved ones
    .venv/bin/python bench/memory_accuracy.py --time-modes --runs lora,qlora          # paired step times
    .venv/bin/python bench/memory_accuracy.py --batch 2 --seq 128 --steps 2 # quicker
"""
import argparse, csv, ctypes, json, os, resource, subprocess, sys, threading, time
from pathlib import Path

RUNS = [("full", False), ("lora", False), ("qlora", False), ("adapter", False), ("lora", True)]
MALLOCS = ("default", "release")

def rss_gb() -> float:
    import psutil
    return psutil.Process().memory_info().rss / 1e9

def peak_gb() -> float: return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux: KiB

class PeakSampler(threading.Thread):
    "Samples /proc/self/status every few ms; at each new RSS maximum also glibc's mallinfo2 (what the heap holds)."
    def __init__(self, every_s=0.005):
        super().__init__(daemon=True); self.every, self.stop, self.peak = every_s, False, {"rss_gb": 0.0}
        try:
            libc = ctypes.CDLL(None)
            class MI2(ctypes.Structure): _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
            libc.mallinfo2.restype = MI2; self.mallinfo = libc.mallinfo2
        except (OSError, AttributeError): self.mallinfo = None
    def status(self) -> dict:
        d = {}
        with open("/proc/self/status") as f:
            for l in f:
                if l.startswith(("VmRSS", "RssAnon", "RssFile")): k, v = l.split(":"); d[k] = int(v.split()[0]) * 1024 / 1e9
        return d
    def run(self):
        while not self.stop:
            st = self.status()
            if st.get("VmRSS", 0) > self.peak["rss_gb"]:
                p = {"rss_gb": st["VmRSS"], "anon_at_peak_gb": st.get("RssAnon"), "file_at_peak_gb": st.get("RssFile")}
                if self.mallinfo:
                    m = self.mallinfo()
                    p.update(heap_used_at_peak_gb=m.uordblks / 1e9, heap_free_at_peak_gb=m.fordblks / 1e9, mmapped_at_peak_gb=m.hblkhd / 1e9)
                self.peak = p
            time.sleep(self.every)

def build(method, checkpointing, r):
    "The model `finetune` trains for `method` (vrnx_nb.training.build_model), on the CPU in fp32."
    import torch
    import vrnx_nb.training as T
    torch.manual_seed(0)
    model, _ = T.build_model("smollm2-135m", T.TrainConfig(method=method, r=r, gradient_checkpointing=checkpointing), device="cpu")
    note = "vrnx_nb.training.BottleneckModel" if method == "adapter" else ""
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "enable_input_require_grads"): model.enable_input_require_grads()
    model.config.use_cache = False
    model.train()
    return model, note

def trim_thread(budget_mb, every_s=0.01):
    "EXPERIMENT: trim glibc's heap (malloc_trim) whenever the freed memory it holds passes budget_mb."
    libc = ctypes.CDLL(None)
    class MI2(ctypes.Structure): _fields_ = [(n, ctypes.c_size_t) for n in
        "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
    libc.mallinfo2.restype = MI2
    stats = {"trims": 0}
    def run():
        while True:
            if libc.mallinfo2().fordblks > budget_mb * 2**20: libc.malloc_trim(0); stats["trims"] += 1
            time.sleep(every_s)
    threading.Thread(target=run, daemon=True).start()
    return stats

def apply_malloc(malloc) -> bool:
    "What finetune does before it builds the model: 'default' with TrainConfig's default release_memory, 'release' with True."
    if malloc.startswith("trim:"): trim_thread(float(malloc[5:])); return True
    import vrnx_nb.training as T
    return bool((malloc == "release" or T.TrainConfig().release_memory) and T.release_freed_memory())

def child(method, checkpointing, batch, seq, steps, r, malloc):
    import torch, transformers, peft
    if method == "qlora": import bitsandbytes
    import vrnx_nb.training
    baseline = rss_gb()
    sampler = PeakSampler(); sampler.start()
    released = apply_malloc(malloc)  # finetune: before it builds the model
    model, note = build(method, checkpointing, r)
    loaded = rss_gb()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    x = torch.randint(0, model.config.vocab_size, (batch, seq))
    times, sys_s, faults = [], [], []
    for _ in range(steps):
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        loss = model(input_ids=x, labels=x).loss
        loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        times.append(time.perf_counter() - t0); sys_s.append(r1.ru_stime - r0.ru_stime); faults.append(r1.ru_minflt - r0.ru_minflt)
    time.sleep(0.05); sampler.stop = True
    later = slice(1, None) if steps > 1 else slice(None)
    mean = lambda v: sum(v[later]) / len(v[later])
    print(json.dumps(dict(method=method, checkpointing=checkpointing, baseline_gb=baseline, loaded_gb=loaded, peak_gb=peak_gb(),
                          trainable=sum(p.numel() for p in params), loss=float(loss), step_s=mean(times), first_step_s=times[0],
                          sys_s_per_step=mean(sys_s), minor_faults_per_step=mean(faults), mallopt=released,
                          load_avg=os.getloadavg()[0], note=note, **{k: v for k, v in sampler.peak.items() if k != "rss_gb"})))

def measure(run, a, malloc):
    cmd = [sys.executable, __file__, "--child", run, "--batch", str(a.batch), "--seq", str(a.seq), "--steps", str(a.steps),
           "--r", str(a.r), "--malloc", malloc]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("MALLOC_MMAP_THRESHOLD_", None)  # the settings are the child's own
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [l for l in res.stdout.splitlines() if l.startswith("{")]
    if res.returncode or not lines: sys.exit(f"{run} failed:\n{res.stderr[-3000:]}")
    return {**json.loads(lines[-1]), "malloc": malloc, "batch": a.batch, "seq": a.seq, "steps": a.steps, "r": a.r}

def timed_child(method, batch, seq, r, malloc):
    "A step each time a line arrives on stdin; one JSON line of its time, system time and page faults per step."
    import torch
    released = apply_malloc(malloc)
    model, _ = build(method, False, r)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    x = torch.randint(0, model.config.vocab_size, (batch, seq))
    print(json.dumps({"ready": True, "mallopt": released}), flush=True)
    for _ in sys.stdin:
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        model(input_ids=x, labels=x).loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        print(json.dumps(dict(step_s=round(time.perf_counter() - t0, 3), sys_s=round(r1.ru_stime - r0.ru_stime, 3),
                              minor_faults=r1.ru_minflt - r0.ru_minflt, peak_gb=round(peak_gb(), 3))), flush=True)

def time_modes(method, a, modes=None, warmup=1):
    "Paired step times: one process per allocator setting, taking turns step by step, so that a busy CPU slows both alike."
    modes = modes or [m for m in a.malloc.split(",") if m]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}; env.pop("MALLOC_MMAP_THRESHOLD_", None)
    procs = {m: subprocess.Popen([sys.executable, __file__, "--timed-child", method, "--batch", str(a.batch), "--seq", str(a.seq),
                                  "--r", str(a.r), "--malloc", m], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
             for m in modes}
    def line(p):
        for l in p.stdout:
            if l.startswith("{"): return json.loads(l)
        sys.exit(f"{method}: a timed child ended early")
    ready = {m: line(p) for m, p in procs.items()}
    rows = []
    for i in range(warmup + a.rounds):
        for m, p in procs.items():
            p.stdin.write("step\n"); p.stdin.flush()
            row = line(p)
            if i >= warmup: rows.append(dict(round=i - warmup, method=method, batch_size=a.batch, seq_len=a.seq, malloc=m,
                                             mallopt=ready[m]["mallopt"], **row, load_avg=round(os.getloadavg()[0], 2)))
    for p in procs.values(): p.stdin.close(); p.wait()
    return rows

def compare(m):
    from vrnx_nb.memory import estimate_memory
    est = estimate_memory("smollm2-135m", m["method"], r=m["r"], batch_size=m["batch"], seq_len=m["seq"], gradient_checkpointing=m["checkpointing"],
                          dtype="float32", device="cpu", overhead_gb=m["baseline_gb"], allocator="release" if m.get("mallopt") else "default")
    g = lambda k, nd=3: round(m[k], nd) if m.get(k) is not None else None
    return dict(method=m["method"], gradient_checkpointing=m["checkpointing"], malloc=m["malloc"], mallopt=m.get("mallopt"),
                batch_size=m["batch"], seq_len=m["seq"], steps=m["steps"], r=m["r"], baseline_gb=round(m["baseline_gb"], 3),
                measured_peak_gb=round(m["peak_gb"], 3), estimated_gb=round(est.total, 3),
                rel_error=round((est.total - m["peak_gb"]) / m["peak_gb"], 4),
                est_weights_gb=round(est.weights, 3), est_states_gb=round(est.trainable + est.gradients + est.optimizer, 3),
                est_activations_gb=round(est.activations, 3), est_retained_gb=round(est.retained, 3), anon_at_peak_gb=g("anon_at_peak_gb"), file_at_peak_gb=g("file_at_peak_gb"),
                heap_used_at_peak_gb=g("heap_used_at_peak_gb"), heap_free_at_peak_gb=g("heap_free_at_peak_gb"),
                mmapped_at_peak_gb=g("mmapped_at_peak_gb"), trainable_params=m["trainable"], est_trainable_params=est.trainable_params,
                step_s=round(m["step_s"], 2), first_step_s=g("first_step_s", 2), sys_s_per_step=g("sys_s_per_step", 2),
                minor_faults_per_step=int(m["minor_faults_per_step"]) if m.get("minor_faults_per_step") is not None else None,
                load_avg=g("load_avg", 2), note=m["note"])

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4); ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=2, help="optimizer steps (the peak is reached in step 2, once AdamW's states exist)")
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--runs", default=",".join(f"{m}{'+gc' if c else ''}" for m, c in RUNS), help="e.g. full,lora,lora+gc")
    ap.add_argument("--malloc", default=",".join(MALLOCS), help=f"allocator settings to measure each run under, of {','.join(MALLOCS)}")
    ap.add_argument("--recompute", action="store_true", help="re-estimate from the saved raw measurements, without training")
    ap.add_argument("--append", action="store_true", help="add these runs to the saved raw measurements (replacing the same run and setting)")
    ap.add_argument("--time-modes", action="store_true", help="paired step times of the --malloc settings, one process each, step by step in turn")
    ap.add_argument("--rounds", type=int, default=3, help="--time-modes: timed steps per setting")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--timed-child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(Path(__file__).parent/"results"/"memory_accuracy.csv"))
    a = ap.parse_args(argv)
    mallocs = [x for x in a.malloc.split(",") if x]
    bad = [x for x in mallocs if x not in MALLOCS and not x.startswith("trim:")]
    if bad: ap.error(f"--malloc: expected some of {','.join(MALLOCS)}, got {','.join(bad)}")
    if a.child:
        m, _, gc = a.child.partition("+"); return child(m, gc == "gc", a.batch, a.seq, a.steps, a.r, mallocs[0])
    if a.timed_child: return timed_child(a.timed_child, a.batch, a.seq, a.r, mallocs[0])
    if a.time_modes:
        out = Path(a.out).with_name(Path(a.out).stem + "_step_time.csv")
        old = list(csv.DictReader(open(out))) if a.append and out.exists() else []
        rows = []
        for run in filter(None, a.runs.split(",")):
            new = time_modes(run, a)
            old = [o for o in old if (o["method"], int(o["batch_size"]), int(o["seq_len"])) != (run, a.batch, a.seq)]
            rows += new
            for mode in sorted({x["malloc"] for x in new}):
                t = sorted(x["step_s"] for x in new if x["malloc"] == mode)
                print(f"{run:8s} {mode:8s} median step {t[len(t)//2]:.2f} s  (steps {t})", flush=True)
        rows = old + rows
        with open(out, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0])); w.writeheader(); w.writerows(rows)
        print(f"wrote {out}"); return
    raw_path = Path(a.out).with_name(Path(a.out).stem + "_raw.json")
    if a.recompute: raw = json.loads(raw_path.read_text())
    else:
        raw = json.loads(raw_path.read_text()) if a.append and raw_path.exists() else []
        for malloc in mallocs:
            for run in filter(None, a.runs.split(",")):
                m = measure(run, a, malloc); print(json.dumps(m), flush=True)
                same = lambda o: (o["method"], o["checkpointing"], o["malloc"], o["batch"], o["seq"]) == (m["method"], m["checkpointing"], malloc, a.batch, a.seq)
                raw = [o for o in raw if not same(o)] + [m]
                raw_path.parent.mkdir(parents=True, exist_ok=True); raw_path.write_text(json.dumps(raw, indent=1))
    order = {k: i for i, k in enumerate(MALLOCS)}
    raw.sort(key=lambda o: (order.get(o["malloc"], 9), [r for r, _ in RUNS].index(o["method"]), o["checkpointing"]))
    rows = [compare(m) for m in raw]
    with open(a.out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0])); w.writeheader(); w.writerows(rows)
    for r in rows: print(f"{r['method']:8s} ckpt={r['gradient_checkpointing']!s:5s} malloc={r['malloc']:7s} measured {r['measured_peak_gb']:.2f} GB  "
                         f"estimated {r['estimated_gb']:.2f} GB  error {r['rel_error']:+.1%}  step {r['step_s']:.1f} s")
    print(f"process baseline (RSS after imports): {min(r['baseline_gb'] for r in rows):.2f}-{max(r['baseline_gb'] for r in rows):.2f} GB; wrote {a.out}")
    for malloc in MALLOCS:
        sel = [r for r in rows if r["malloc"] == malloc]
        if sel:
            w = max(sel, key=lambda r: abs(r["rel_error"]))
            print(f"worst relative error, malloc={malloc}: {w['rel_error']:+.1%} ({w['method']}{' +checkpointing' if w['gradient_checkpointing'] else ''})")

if __name__ == "__main__": main()
