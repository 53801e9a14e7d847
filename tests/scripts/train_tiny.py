"""Train LoRA on the tiny model (used by tests/test_training.py: resume after SIGKILL, DDP with torchrun).

python tests/scripts/train_tiny.py OUT_DIR [--max-steps N] [--sleep S] [--n-train N]
--sleep slows every step down so that a test can kill the run mid-training.
"""
import argparse, json, os, time, warnings
from transformers import TrainerCallback
from vrnx_nb.tasks import load_task
from vrnx_nb.training import finetune

class Slow(TrainerCallback):
    def __init__(self, s): self.s = s
    def on_step_end(self, args, state, control, **kw): time.sleep(self.s)

p = argparse.ArgumentParser()
p.add_argument("out"); p.add_argument("--max-steps", type=int, default=8); p.add_argument("--sleep", type=float, default=0)
p.add_argument("--n-train", type=int, default=64); p.add_argument("--batch-size", type=int, default=8)
p.add_argument("--lr", type=float, default=3e-3)
a = p.parse_args()
warnings.filterwarnings("ignore")
res = finetune("tiny", load_task("legal", n_train=a.n_train), method="lora", r=8, learning_rate=a.lr, max_steps=a.max_steps,
               batch_size=a.batch_size, eval_steps=2, max_val_examples=16, output_dir=a.out, early_stopping_patience=None,
               device="cpu", callbacks=[Slow(a.sleep)] if a.sleep else None)
if int(os.environ.get("RANK", "0")) == 0:
    print("RESULT " + json.dumps({"global_step": res.global_step, "train": res.losses("train"), "val": res.losses("val"),
                                  "resumed_from": res.resumed_from, "world_size": res.world_size, "best_val_loss": res.best_val_loss}))
