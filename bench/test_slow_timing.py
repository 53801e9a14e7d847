"""How long `make test-slow` takes: each tutorial under `nbdev-test --flags slow`, one at a time, wall and CPU seconds.

`make test-slow` runs every cell of `nbs/tutorials/`, the slow ones (SmolLM2-135M-Instruct) included, and `.ci/run`
runs it after the fast tests, all within 30 minutes on 2 cores. This script times each tutorial alone (the notebooks
are left as they are, unless `--save` writes the timed run's outputs back into them) and writes
bench/results/test_slow_timing.csv, one row per tutorial (rows of tutorials not timed this time are kept):
`wall_s` (what CI waits), `cpu_s` (user + system seconds of nbdev-test and its children: the work itself, which
other jobs on the machine inflate less), `nice` (this process's niceness: a reniced run on a busy machine gets a
smaller share of the cores, so its `wall_s` is pessimistic) and the 1-minute load average (at start, mean and max,
sampled every 10 s). It prints the totals last.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/test_slow_timing.py                         # every tutorial
    HF_HUB_OFFLINE=1 .venv/bin/python bench/test_slow_timing.py --notebooks legal medical --out /tmp/t.csv
    HF_HUB_OFFLINE=1 .venv/bin/python bench/test_slow_timing.py --save --cell-timeout 0   # also commit the outputs
"""
import argparse, csv, datetime, os, resource, subprocess, sys, threading, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TUTORIALS = ROOT/"nbs"/"tutorials"
OUT_CSV = Path(__file__).parent/"results"/"test_slow_timing.csv"
NBDEV_TEST = Path(sys.executable).parent/"nbdev-test"


def children_cpu_s() -> float:
    "User + system CPU seconds of the finished children of this process so far."
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def sample_load(samples:list, stop:threading.Event, every:float=10.0):
    "Append the 1-minute load average to `samples` every `every` seconds until `stop` is set."
    while not stop.is_set():
        samples.append(os.getloadavg()[0]); stop.wait(every)


def time_notebook(nb: Path, # the tutorial
                  cell_timeout:int|None=None, # nbdev-test's per-cell limit (None: its config)
                  save:bool=False, # write the outputs back into the notebook when it passes
                 ) -> dict:
    "Run `nbdev-test --flags slow nb` and return the CSV row: return code, wall and CPU seconds, load and niceness."
    cmd = [str(NBDEV_TEST), "--flags", "slow", str(nb)] + ([] if cell_timeout is None else ["--cell-timeout", str(cell_timeout)])
    cmd += ["--save"] if save else []
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    loads, stop = [], threading.Event()
    sampler = threading.Thread(target=sample_load, args=(loads, stop), daemon=True); sampler.start()
    cpu0, t0 = children_cpu_s(), time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall, cpu = time.perf_counter() - t0, children_cpu_s() - cpu0
    stop.set(); sampler.join()
    if p.returncode: print(f"{nb.name} failed (rc {p.returncode}):\n{(p.stdout + p.stderr)[-4000:]}", file=sys.stderr)
    return {"notebook": nb.name, "rc": p.returncode, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
            "cpu_count": os.cpu_count(), "nice": os.nice(0), "load_avg_1m_start": round(loads[0], 2),
            "load_avg_1m_mean": round(sum(loads)/len(loads), 2), "load_avg_1m_max": round(max(loads), 2), "date": datetime.date.today().isoformat(),
            "command": " ".join(["nbdev-test", *cmd[1:3], str(nb.relative_to(ROOT)), *cmd[4:]])}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--notebooks", nargs="*", help="tutorial names without .ipynb (default: every tutorial)")
    ap.add_argument("--cell-timeout", type=int, default=None, help="passed to nbdev-test (default: its config, 600 s)")
    ap.add_argument("--save", action="store_true", help="write each passing run's outputs back into its notebook")
    ap.add_argument("--out", default=str(OUT_CSV))
    a = ap.parse_args(argv)
    nbs = [TUTORIALS/f"{n}.ipynb" for n in a.notebooks] if a.notebooks else sorted(TUTORIALS.glob("*.ipynb"))
    missing = [str(p) for p in nbs if not p.exists()]
    if missing: raise SystemExit(f"no such tutorial: {', '.join(missing)} (expected names from {TUTORIALS})")
    out = Path(a.out); out.parent.mkdir(parents=True, exist_ok=True)
    timed = {p.name for p in nbs}
    kept = [r for r in csv.DictReader(open(out))] if out.exists() else []  # other tutorials' rows stay
    rows = [r for r in kept if r["notebook"] not in timed]
    for nb in nbs:
        row = time_notebook(nb, a.cell_timeout, a.save); print(row, flush=True)
        rows = sorted(rows + [row], key=lambda r: r["notebook"])
        with open(out, "w", newline="") as f:  # after each tutorial, so an interrupted run keeps what it timed
            w = csv.DictWriter(f, fieldnames=list(row), restval="", extrasaction="ignore"); w.writeheader(); w.writerows(rows)
    print(f"wrote {out}")
    rows = [r for r in rows if r["notebook"] in timed]
    wall, cpu = sum(r["wall_s"] for r in rows), sum(r["cpu_s"] for r in rows)
    print(f"total: wall {wall/60:.1f} min, CPU {cpu/60:.1f} min over {len(rows)} tutorials; "
          f"failed: {[r['notebook'] for r in rows if r['rc']] or 'none'}")


if __name__ == "__main__":
    main()
