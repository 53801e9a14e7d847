"""A classification head on the LM (peft SEQ_CLS) against the generative route on legal, same data, steps and balancing.

Usage: python experiments/seq_cls_trial.py --n-train 200 --steps 40 [--out experiments/seq_cls.csv]
Trains LoRA r=16 (all linear layers) plus a 9-way head on SmolLM2-135M, rare labels oversampled (square-root weights,
as `finetune(balance="oversample")`), scores val and the whole test split, and appends one row per decision rule
(argmax, offsets fitted on val) with macro-F1 and accuracy and their 95% bootstrap CIs.
"""
import argparse, csv, os, time
from pathlib import Path
import numpy as np, torch

def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n-train", type=int, default=200); p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=8); p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--min-per-label", type=int, default=None); p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="experiments/seq_cls.csv")
    a = p.parse_args()
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from peft import LoraConfig, get_peft_model
    from vrnx_nb.models import resolve_model_path, quiet_libraries
    from vrnx_nb.tasks import load_task
    from vrnx_nb.training import label_balance_weights, balanced_sampler
    from vrnx_nb.calibration import fit_calibration
    from vrnx_nb.evaluation import classification_metrics
    quiet_libraries(); torch.manual_seed(a.seed)
    task = load_task("legal", n_train=a.n_train, seed=a.seed, min_per_label=a.min_per_label)
    path = resolve_model_path("smollm2-135m")
    tok = AutoTokenizer.from_pretrained(path); tok.pad_token = tok.pad_token or tok.eos_token
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(task.labels), dtype=torch.float32)
    model.config.pad_token_id = tok.pad_token_id
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="SEQ_CLS"))
    code = {l: i for i, l in enumerate(task.labels)}
    train = task.train
    sampler = list(balanced_sampler(label_balance_weights([e.target for e in train]), a.seed))
    while len(sampler) < a.steps * a.batch_size: sampler += list(balanced_sampler(label_balance_weights([e.target for e in train]), a.seed + len(sampler)))
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=a.lr)
    enc = lambda exs: tok([e.input for e in exs], return_tensors="pt", padding=True, truncation=True, max_length=512)
    t0 = time.time(); model.train()
    for step in range(a.steps):
        batch = [train[i] for i in sampler[step*a.batch_size:(step+1)*a.batch_size]]
        out = model(**enc(batch), labels=torch.tensor([code[e.target] for e in batch]))
        out.loss.backward(); opt.step(); opt.zero_grad()
        for g in opt.param_groups: g["lr"] = a.lr * (1 - (step + 1) / a.steps)
    train_s = time.time() - t0
    model.eval()
    @torch.no_grad()
    def scores(exs):
        return np.concatenate([torch.log_softmax(model(**enc(exs[i:i+16])).logits.float(), -1).numpy() for i in range(0, len(exs), 16)])
    t1 = time.time(); lv, lt = scores(task.val), scores(task.test); eval_s = time.time() - t1
    rule = fit_calibration(lv, [e.target for e in task.val], task.labels, normalize=False)
    refs = [e.target for e in task.test]
    rows = []
    for name, preds in (("argmax", [task.labels[j] for j in lt.argmax(1)]), ("calibrated", rule.decide(lt))):
        m = classification_metrics(preds, refs, task.labels)
        rows.append({"approach": "seq_cls head + lora r16", "n_train": a.n_train, "min_per_label": a.min_per_label or "", "steps": a.steps,
                     "batch_size": a.batch_size, "lr": a.lr, "balance": "oversample", "decision": name, "n_test": len(refs),
                     "macro_f1": round(m["metrics"]["macro_f1"], 4), "macro_f1_low": round(m["ci"]["macro_f1"][0], 4),
                     "macro_f1_high": round(m["ci"]["macro_f1"][1], 4), "accuracy": round(m["metrics"]["accuracy"], 4),
                     "accuracy_low": round(m["ci"]["accuracy"][0], 4), "accuracy_high": round(m["ci"]["accuracy"][1], 4),
                     "top_share": round(max(preds.count(l) for l in set(preds)) / len(preds), 3),
                     "train_s": round(train_s, 1), "eval_s": round(eval_s, 1), "threads": torch.get_num_threads(),
                     "load_avg": round(os.getloadavg()[0], 2), "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S")})
        print(rows[-1], flush=True)
    out = Path(a.out); new = not out.exists()
    with open(out, "a", newline="") as f:
        w = csv.DictWriter(f, list(rows[0])); w.writeheader() if new else None; w.writerows(rows)

if __name__ == "__main__": main()
