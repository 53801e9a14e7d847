"""Load time of the embedded model: first load (GGUF -> de-quantize -> cache folder) vs later loads (cache hit).

Run: .venv/bin/python bench/model_load.py   -> bench/results/model_load.csv
Each measurement runs in a fresh process with an empty (first) or warm (cached) VRNX_CACHE.
"""
import csv, os, subprocess, sys, tempfile, time
from pathlib import Path

CODE = "import time; t=time.time(); from vrnx_nb.models import load_model; m,t_=load_model('smollm2-135m'); print(time.time()-t)"

def timed(cache: str) -> float:
    out = subprocess.run([sys.executable, "-c", CODE], env={**os.environ, "VRNX_CACHE": cache, "HF_HUB_OFFLINE": "1"},
                         capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])

if __name__ == "__main__":
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        rows.append(("first_load_gguf_convert", timed(cache)))
        for i in range(3): rows.append((f"cached_load_{i+1}", timed(cache)))
    out = Path(__file__).parent/"results"/"model_load.csv"
    out.parent.mkdir(exist_ok=True)
    with open(out, "w", newline="") as f:
        w = csv.writer(f); w.writerow(["run", "seconds_incl_imports", "cpu_count"])
        for name, s in rows: w.writerow([name, f"{s:.2f}", os.cpu_count()])
    for name, s in rows: print(f"{name:<26} {s:6.1f} s")
    cached = min(s for n, s in rows[1:])
    print(f"first load / cached load: {rows[0][1]/cached:.1f}x")
