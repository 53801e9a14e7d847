"""The README's "Measured here" table, read from the benchmark CSVs in bench/results/ and experiments/results.csv.

    python bench/measured.py          # prints the markdown table
"""
from pathlib import Path
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT/"bench"/"results"

def csv(name): return pd.read_csv(BENCH/f"{name}.csv")


def load_row():
    d = csv("model_load").set_index("run")["seconds_incl_imports"]
    cached = d[d.index.str.startswith("cached")]
    return f"first load (GGUF → cache) {d['first_load_gguf_convert']:.1f} s, cached {cached.min():.1f}-{cached.max():.1f} s"

def train_row():
    d = csv("train_throughput"); tok = d.groupby("kind")["useful_tokens_per_s"].mean()
    share = d.groupby("kind")["useful_share_of_adjacent_peak"].mean()
    shares = ", ".join(f"{k} {share[k]:.1%}" for k in ("lora", "full", "qlora", "adapter", "trl-lora", "naive-lora") if k in share)
    adj = d["adjacent_peak_gflops"]
    return (f"LoRA {tok['lora']/tok['naive-lora']:.2f}× the naive padded Trainer, {tok['lora']/tok['trl-lora']:.2f}× TRL "
            f"`SFTTrainer` (padding-free, completion-only) in useful tokens/s ({tok['lora']:.0f} vs {tok['naive-lora']:.0f} "
            f"and {tok['trl-lora']:.0f}, {d['threads'].iloc[0]} threads); share of the matmul peak measured next to each run "
            f"({adj.min():.0f}-{adj.max():.0f} GFLOP/s): {shares}")

def memory_row():
    d = csv("memory_accuracy"); d = d[~d["gradient_checkpointing"].astype(bool)]
    part = lambda m: ", ".join(f"{r.method} {r.batch_size}×{r.seq_len} {r.rel_error:+.0%}"
                               for r in d[d["malloc"] == m].itertuples())
    return (f"(estimate − measured) / measured: glibc defaults {part('default')}; freed memory handed back "
            f"(`release_memory=True`) {part('release')}")

def eval_row():
    d = csv("eval_throughput"); gen = d[d["config"].str.endswith("generate")]
    s = gen.pivot(index="task", columns="batch_size", values="seconds")
    per = ", ".join(f"{t} {s.loc[t, 1]/s.loc[t, 16]:.2f}×" for t in s.index)
    same = (gen[gen.batch_size == 16]["same_as_batch1"] == gen[gen.batch_size == 16]["n"]).all()
    return (f"{s[1].sum()/s[16].sum():.2f}× overall in examples/s ({per}); batch 16 replies equal batch 1's: {same}")

def teacher_row():
    d = csv("augment_throughput"); out = []
    for (mode, con), g in d.groupby(["mode", "constrained"]):
        b1, b8 = g[g.batch == 1].iloc[0], g[g.batch == 8].iloc[0]
        out.append(f"{mode}{' (constrained JSON)' if con else ''}: {b8.parsed_share:.0%} parsed, {b8.kept_share:.0%} kept, "
                   f"batch 8 vs 1 {b8.kept_per_min/b1.kept_per_min:.2f}× kept/min")
    return f"embedded teacher, {int(d['requests'].iloc[0])} legal requests: " + "; ".join(out)

def deploy_row():
    d = csv("deploy"); size = d.groupby("format")["size_mb"].first()
    ci = d[d.format != "merged"].groupby("format")["in_merged_ci"].all()
    inside = ", ".join(f"{f} {'inside' if ok else 'not always inside'}" for f, ok in ci.items())
    rss = d.groupby("format")["gen_model_rss_mb"].mean()
    return (f"{size['gptq']:.1f} MB (GPTQ) vs {size['merged']:.1f} MB (merged) on disk; model RSS while generating on the CPU "
            f"{rss['gptq']:.0f} vs {rss['merged']:.0f} MB (the CPU path de-packs 4-bit weights to float); score vs the merged "
            f"model's 95% CI ({', '.join(sorted(d.task.unique()))}): {inside}")

def measured_table(results) -> str:
    "Markdown: one row per benchmark (figure, command, CSV), then the zero-shot scores of `results` (experiments CSV)."
    rows = [("embedded model load", load_row(), "python bench/model_load.py", "model_load.csv"),
            ("training throughput", train_row(), "python bench/train_throughput.py", "train_throughput.csv, matmul_peak.csv"),
            ("memory estimate vs measured peak RSS, SmolLM2-135M", memory_row(), "python bench/memory_accuracy.py",
             "memory_accuracy.csv"),
            ("evaluation throughput, batch 16 vs batch 1", eval_row(), "python bench/eval_throughput.py --n 32",
             "eval_throughput.csv"),
            ("teacher throughput", teacher_row(), "python bench/augment_throughput.py", "augment_throughput.csv"),
            ("4-bit export vs merged bf16", deploy_row(), "python bench/deploy.py", "deploy.csv")]
    table = "| what | figure | command | results (`bench/results/`) |\n|---|---|---|---|\n"
    table += "\n".join(f"| {w} | {f} | `{c}` | `{r}` |" for w, f, c, r in rows)
    plain = ~results["calibrate"].astype(str).isin(["True", "1"])
    zs = results[(results.method == "zero-shot") & plain].groupby("task").first()
    zero = "; ".join(f"{t} {r.metric} {r.score:.3f} [{r.ci_low:.3f}, {r.ci_high:.3f}] on {r.n_test} test examples"
                     + (f" ({r.other_metrics.split(';')[0]})" if t == "legal" else "") for t, r in zs.iterrows())
    return table + f"\n\nZero-shot SmolLM2-135M (95% bootstrap CI, `experiments/results.csv`): {zero}."


if __name__ == "__main__":
    from vrnx_nb.experiments import read_results
    print(measured_table(read_results(ROOT/"experiments"/"results.csv")))
