"""Tests of vrnx_nb.training that a notebook cell cannot hold: kill and resume, DDP with torchrun, bad input."""
import json, os, signal, subprocess, sys, time, warnings
from pathlib import Path
import pytest, torch
from vrnx_nb.models import tiny_model
from vrnx_nb.tasks import load_task, render_pair, Task, Example
from vrnx_nb.training import (finetune, TrainConfig, tokenize_example, tokenize_split, PackedCollator, PaddedCollator, ONE_ROW, pack_rows,
                              SharedPrefixCollator, shared_prefix_len,
                              per_example_loss, load_trained, TrainResult, RUN_FILE)
from vrnx_nb.bottleneck import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT/"tests"/"scripts"/"train_tiny.py"
BIN = Path(sys.executable).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

@pytest.fixture(scope="module")
def tiny(): return tiny_model()

@pytest.fixture(scope="module")
def task(): return load_task("legal", n_train=16)

def _result(stdout:str) -> dict:
    lines = [l for l in stdout.splitlines() if l.startswith("RESULT ")]
    assert lines, f"no RESULT line in output:\n{stdout[-3000:]}"
    return json.loads(lines[-1][len("RESULT "):])

# --- loss on the completion only, packing ---

def test_label_mask_covers_completion_only(tiny, task):
    model, tok = tiny
    ex = task.train[3]
    row = tokenize_example(task, ex, tok)
    pair = render_pair(task, ex, tok)
    n_prompt = len(tok(pair["prompt"], add_special_tokens=False)["input_ids"])
    assert row["labels"][:n_prompt] == [-100]*n_prompt
    assert row["labels"][n_prompt:] == row["input_ids"][n_prompt:]
    assert tok.decode(row["input_ids"][n_prompt:]) == ex.target + "<|im_end|>\n"
    assert tok.decode(row["input_ids"][:n_prompt]) == pair["prompt"]

def test_packed_loss_equals_each_alone(tiny, task):
    model, tok = tiny
    rows, _ = tokenize_split(task, "train", tok, limit=3)
    model.train()  # the training path: no cache, packed rows
    try:
        packed = per_example_loss(model, PackedCollator(ONE_ROW)(rows))
        rowed = per_example_loss(model, PackedCollator(pad_token_id=tok.pad_token_id)(rows))
        alone = [per_example_loss(model, PackedCollator()([r]))[0] for r in rows]
        padded = per_example_loss(model, PaddedCollator(tok.pad_token_id)(rows))
    finally: model.eval()
    assert packed == pytest.approx(alone, abs=1e-4)
    assert padded == pytest.approx(alone, abs=1e-4)
    assert sorted(rowed) == pytest.approx(sorted(alone), abs=1e-4)
    # and the boundaries matter: as one plain sequence the second example would see the first one
    batch = PackedCollator(ONE_ROW)(rows[:2]); n0 = len(rows[0]["input_ids"]); lab = batch["labels"][0]
    with torch.no_grad(): logits = model(input_ids=batch["input_ids"], use_cache=False).logits[0].float()
    tok_loss = torch.nn.functional.cross_entropy(logits[:-1], lab[1:], ignore_index=-100, reduction="none")
    second = tok_loss[n0:][lab[n0+1:] != -100].mean().item()
    assert abs(second - alone[1]) > 1e-3

def test_packed_batch_has_no_padding(tiny, task):
    _, tok = tiny
    rows, _ = tokenize_split(task, "train", tok, limit=4)
    b = PackedCollator(ONE_ROW)(rows)
    assert b["input_ids"].shape == (1, sum(len(r["input_ids"]) for r in rows))
    assert (b["position_ids"][0] == 0).sum() == 4

def test_rows_no_longer_than_the_longest_example(tiny, task):
    _, tok = tiny
    long, *short = tokenize_split(task, "train", tok, limit=4)[0]
    short = [{"input_ids": r["input_ids"][-20:], "labels": r["labels"][-20:]} for r in short]  # completions kept
    rows = [long] + short
    lengths = [len(r["input_ids"]) for r in rows]
    b = PackedCollator(pad_token_id=tok.pad_token_id)(rows)
    assert tuple(b["input_ids"].shape) == (2, max(lengths))  # the long one alone, the three short ones together
    assert int((b["labels"] != -100).sum()) == sum(sum(x != -100 for x in r["labels"]) for r in rows)
    assert int(b["real_tokens"]) == sum(lengths)
    assert int((b["position_ids"] == 0).sum()) == len(rows) + 1  # each example starts a sequence, and the pads
    assert pack_rows([10, 10, 25], 20) == [[0, 1], [2]]

def test_shared_prefix_falls_back_when_it_would_pad_more(tiny, task):
    _, tok = tiny
    rows, _ = tokenize_split(task, "train", tok, limit=4)
    p = shared_prefix_len(rows)
    assert p > 16 and all(r["input_ids"][:p] == rows[0]["input_ids"][:p] for r in rows)
    first_loss = min(next(i for i, l in enumerate(r["labels"]) if l != -100) for r in rows)
    assert p < first_loss  # the logit predicting the first completion token is computed in the rows
    collate = SharedPrefixCollator(PackedCollator(pad_token_id=tok.pad_token_id), tok.pad_token_id)
    assert collate(rows)["prefix_ids"].shape == (1, p)
    long = {"input_ids": rows[0]["input_ids"][:p] + list(range(5, 5 + 600)) + rows[0]["input_ids"][p:],
            "labels": [-100] * (p + 600) + rows[0]["labels"][p:]}
    assert "prefix_ids" not in collate(rows + [long])  # every suffix row would pad to 600+ tokens

def test_shared_prefix_trains_like_full_sequences(task, tmp_path):
    runs = [finetune("tiny", task, method="lora", r=4, max_steps=3, batch_size=4, early_stopping_patience=None, seed=1,
                     share_prefix=share, output_dir=tmp_path/str(share)) for share in (True, False)]
    losses = [[h["loss"] for h in r.history if h["split"] == "train"] for r in runs]
    assert len(losses[0]) == 3 and losses[0] == pytest.approx(losses[1], abs=1e-4)

def test_logits_only_at_completion_match_full_logits(task, tmp_path):
    "VrnxTrainer's loss (logits only where a completion token follows) and its gradients equal the model's own to 1e-5."
    from transformers import TrainingArguments
    from peft import LoraConfig, get_peft_model
    from vrnx_nb.training import VrnxTrainer, completion_positions
    model, tok = tiny_model()
    torch.manual_seed(0)
    lora = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)).train()
    trainer = VrnxTrainer(model=lora, args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[]),
                          processing_class=tok)
    assert trainer.sliced_logits
    rows, _ = tokenize_split(task, "train", tok, limit=3)
    for batch in (PaddedCollator(tok.pad_token_id)(rows), PackedCollator(ONE_ROW)(rows)):
        keep = completion_positions(batch["labels"])
        assert 0 < keep.sum() < keep.numel() // 4  # few positions reach the vocabulary
        def run(sliced):
            lora.zero_grad(); trainer.sliced_logits = sliced
            loss = trainer.compute_loss(lora, {k: v.clone() if torch.is_tensor(v) else v for k, v in batch.items()})
            loss.backward()
            return loss.item(), [p.grad.clone() for p in lora.parameters() if p.requires_grad]
        (fast, g_fast), (full, g_full) = run(True), run(False)
        x = {k: v for k, v in batch.items() if k not in ("labels", "real_tokens", "token_weights")}
        with torch.no_grad(): own = lora(**x, labels=batch["labels"]).loss.item()
        assert fast == pytest.approx(own, abs=1e-5) and full == pytest.approx(own, abs=1e-5)
        assert len(g_fast) == len(g_full) > 0
        assert max((a - b).abs().max().item() for a, b in zip(g_fast, g_full)) < 1e-5
        assert max(g.abs().max().item() for g in g_fast) > 1e-4  # the gradients compared are not all zero

# --- bad input ---

def test_unknown_method_and_bad_rank(task, tmp_path):
    with pytest.raises(ValueError, match=r"TrainConfig\.method: expected one of \['full', 'lora', 'qlora', 'adapter'\], got 'prefix'"):
        finetune("tiny", task, method="prefix", output_dir=tmp_path)
    with pytest.raises(ValueError, match=r"TrainConfig\.r: expected a positive integer, got 0"): finetune("tiny", task, method="lora", r=0, output_dir=tmp_path)
    with pytest.raises(ValueError, match=r"TrainConfig\.r: expected a positive integer, got -4"): TrainConfig(method="lora", r=-4)
    with pytest.raises(ValueError, match=r"TrainConfig\.batch_size: expected a positive integer, got True"): TrainConfig(batch_size=True)
    with pytest.raises(TypeError, match="unknown argument"): finetune("tiny", task, method="lora", rank=8, output_dir=tmp_path)
    with pytest.warns(UserWarning, match="outside the usual LoRA range"): TrainConfig(method="lora", r=512)

def test_task_without_train_split(tmp_path):
    t = Task("toy", "classification", "Label it.", [Example("a", "x"), Example("b", "y")], splits={"val": [0, 1]})
    with pytest.raises(ValueError, match="no train split"): finetune("tiny", t, method="lora", output_dir=tmp_path)

def test_task_without_val_split_trains_without_early_stopping(task, tmp_path):
    from dataclasses import replace
    no_val = replace(task, splits={"train": task.splits["train"]})
    with pytest.warns(UserWarning, match="no val split"):
        res = finetune("tiny", no_val, method="lora", max_steps=2, output_dir=tmp_path, device="cpu")
    assert res.global_step == 2 and res.best_val_loss is None and res.losses("val") == []

def test_long_examples_truncated_with_count(tiny, task, tmp_path):
    _, tok = tiny
    lengths = sorted(len(tokenize_example(task, e, tok)["input_ids"]) for e in task.train)
    cap = lengths[len(lengths)//2]
    n_long = sum(n > cap for n in lengths)
    assert 0 < n_long < len(task.train)
    with pytest.warns(UserWarning, match=f"{n_long} of {len(task.train)} training examples are longer than max_length={cap}"):
        res = finetune("tiny", task, method="lora", max_length=cap, max_steps=1, max_val_examples=4, output_dir=tmp_path, device="cpu")
    assert res.n_truncated == n_long
    rows, n_cut = tokenize_split(task, "train", tok, max_length=cap)
    assert n_cut == n_long and max(len(r["input_ids"]) for r in rows) == cap
    assert all(any(l != -100 for l in r["labels"]) for r in rows)  # every example keeps its answer

def test_qlora_without_bitsandbytes(task, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes now raises ImportError
    with pytest.raises(ImportError, match="needs bitsandbytes"): finetune("tiny", task, method="qlora", output_dir=tmp_path)
    assert not (tmp_path/RUN_FILE).exists()

def test_output_dir_of_another_run(task, tmp_path):
    kw = dict(method="lora", r=4, max_steps=2, eval_steps=2, max_val_examples=4, output_dir=tmp_path, device="cpu")
    first = finetune("tiny", task, **kw)
    with pytest.raises(ValueError, match=r"holds another run \(differs in .*r"): finetune("tiny", task, **{**kw, "r": 8})
    other_task = load_task("legal", n_train=12)
    with pytest.raises(ValueError, match=r"holds another run \(differs in task"): finetune("tiny", other_task, **kw)
    again = finetune("tiny", task, **kw)  # same run: the finished result comes back, nothing retrained
    assert again.wall_time_s == first.wall_time_s
    replaced = finetune("tiny", task, **{**kw, "r": 8, "overwrite": True})
    assert replaced.trainable_params > first.trainable_params
    stranger = tmp_path/"stranger"; stranger.mkdir(); (stranger/"notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty and holds no vrnx run"): finetune("tiny", task, **{**kw, "output_dir": stranger})

def test_report_to_missing_integration_warns(task, tmp_path):
    import importlib.util
    if importlib.util.find_spec("wandb"): pytest.skip("wandb is installed")
    with pytest.warns(UserWarning, match="report_to='wandb'"):
        res = finetune("tiny", task, method="lora", max_steps=1, max_val_examples=4, report_to="wandb", output_dir=tmp_path, device="cpu")
    assert res.global_step == 1

def test_load_trained_needs_finished_run(tmp_path):
    with pytest.raises(ValueError, match="not a vrnx run folder"): load_trained(tmp_path)

# --- kill and resume, DDP ---

def test_resume_after_sigkill(tmp_path):
    args = ["--max-steps", "10", "--n-train", "48"]
    ref = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path/"ref"), *args], env=ENV, capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr[-3000:]
    ref = _result(ref.stdout)
    out = tmp_path/"killed"
    proc = subprocess.Popen([sys.executable, str(SCRIPT), str(out), *args, "--sleep", "0.5"], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if (out/"checkpoint-4"/"trainer_state.json").exists(): break
        time.sleep(0.1)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL); proc.wait()
    assert not (out/"result.json").exists()
    again = subprocess.run([sys.executable, str(SCRIPT), str(out), *args], env=ENV, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    res = _result(again.stdout)
    assert res["resumed_from"] and Path(res["resumed_from"]).name.startswith("checkpoint-")
    assert int(Path(res["resumed_from"]).name.split("-")[1]) >= 4
    assert res["global_step"] == ref["global_step"] == 10
    assert res["train"][-1][1] == pytest.approx(ref["train"][-1][1], abs=1e-3)
    assert res["best_val_loss"] == pytest.approx(ref["best_val_loss"], abs=1e-3)
    steps = [int(r["step"]) for r in __import__("csv").DictReader(open(out/"log.csv")) if r["split"] == "train"]
    assert steps == list(range(1, 11))  # the log continues where the checkpoint was, without duplicates

def _free_port() -> int:
    import socket
    with socket.socket() as s: s.bind(("127.0.0.1", 0)); return s.getsockname()[1]

def test_ddp_two_processes(tmp_path):
    cmd = [str(BIN/"torchrun"), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(SCRIPT), str(tmp_path/"ddp"),
           "--max-steps", "6", "--batch-size", "4", "--n-train", "32"]
    p = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, p.stderr[-3000:]
    res = _result(p.stdout)
    assert res["world_size"] == 2 and res["global_step"] == 6
    losses = [l for _, l in res["train"]]
    assert len(losses) == 6 and sum(losses[-2:]) < sum(losses[:2])
    assert (tmp_path/"ddp"/"adapter_model.safetensors").exists()

def test_adapter_with_checkpointing_trains_and_reloads(task, tmp_path):
    res = finetune("tiny", task, method="adapter", r=8, learning_rate=1e-2, max_steps=3, eval_steps=3, max_val_examples=4,
                   gradient_checkpointing=True, output_dir=tmp_path, device="cpu")
    assert res.global_step == 3 and res.losses()[-1][1] < res.losses()[0][1]
    assert sorted(p.name for p in tmp_path.glob("bottleneck_*")) == sorted([ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME])
    assert not list(tmp_path.glob("checkpoint-*")) and not (tmp_path/"model.safetensors").exists()
    model, tok = load_trained(res, device="cpu")
    base, _ = tiny_model()
    batch = PackedCollator()(tokenize_split(task, "val", tok, limit=4)[0])
    trained, plain = per_example_loss(model, batch), per_example_loss(base, batch)
    assert max(abs(a - b) for a, b in zip(trained, plain)) > 1e-3  # the adapter changed the model
    assert per_example_loss(load_trained(tmp_path, device="cpu")[0], batch) == pytest.approx(trained, abs=1e-6)

def test_bottleneck_names_stay_importable_from_training():
    "The adapter moved to `vrnx_nb.bottleneck`; `vrnx_nb.training` re-exports the same objects (tests, bench, users import them there)."
    import vrnx_nb.bottleneck as bn, vrnx_nb.training as tr
    for name in ("ADAPTER_CONFIG_NAME", "ADAPTER_WEIGHTS_NAME", "ADAPTER_TARGETS", "BottleneckConfig", "BottleneckLayer", "BottleneckModel"):
        assert getattr(tr, name) is getattr(bn, name) and name in tr.__all__ and name in bn.__all__
    assert tr.build_model("tiny", TrainConfig(method="adapter", r=4), device="cpu")[0].__class__ is bn.BottleneckModel

# --- balancing skewed labels ---

def test_oversample_trainer_draws_rare_labels_more(tmp_path):
    "With balance='oversample' the Trainer's own sampler draws rare-label clauses far above their share of the data."
    from collections import Counter
    from vrnx_nb.training import VrnxTrainer, label_balance_weights
    t = load_task("legal", n_train=100)
    targets = [e.target for e in t.train]
    seen = Counter()
    class Spy(PackedCollator):
        def __call__(self, features):
            seen.update(f["target"] for f in features); return super().__call__(features)
    model, tok = tiny_model()
    rows = [{**r, "target": e.target} for r, e in zip(tokenize_split(t, "train", tok)[0], t.train)]
    from transformers import TrainingArguments
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=10, max_steps=1, report_to=[], use_cpu=True,
                             remove_unused_columns=False, save_strategy="no", data_seed=0)
    for weights in (None, label_balance_weights(targets, power=1.0)):
        seen.clear()
        trainer = VrnxTrainer(model=model, args=args, train_dataset=rows, data_collator=Spy(), sample_weights=weights)
        for _ in range(3):
            for batch in trainer.get_train_dataloader(): pass
        share = 1 - seen["Other"] / sum(seen.values())
        if weights is None: assert share < 0.25, seen       # 9 of 100 clauses are unfair
        else: assert share > 0.6, seen                       # power 1: each label about 1/9 of the draws

def test_balance_bad_input():
    with pytest.raises(ValueError, match=r"TrainConfig\.balance: expected one of \['oversample', 'weight'\] or None, got 'smote'"):
        TrainConfig(balance="smote")
    with pytest.raises(ValueError, match=r"TrainConfig\.balance_power: expected a number in \(0, 1\], got 2"):
        TrainConfig(balance="weight", balance_power=2)

# --- memory before the first step, middle truncation ---

from transformers import TrainerCallback
from vrnx_nb.tasks import make_task
from vrnx_nb.memory import estimate_memory
from vrnx_nb.training import MemoryBudgetError, CUT_MARK

def _long_task(n:int=12, words:int=130):
    "A QA task whose inputs are a long 'table' with the question at the end (TAT-QA's layout)."
    rows = [{"input": "Table:\n" + " | ".join(f"row {i} {j} {j*7 % 13}" for j in range(words)) + f"\n\nQuestion: what is item {i}?",
             "target": f"answer {i}", "id": f"q{i}"} for i in range(n)]
    return make_task("longqa", rows, "qa", "Answer the question from the table.", val_size=2, test_size=0, id_field="id")

class _Seen(TrainerCallback):
    "Record the batch settings the Trainer really ran with."
    def on_train_begin(self, args, state, control, **kw):
        self.batch, self.accum, self.ckpt = args.per_device_train_batch_size, args.gradient_accumulation_steps, args.activation_checkpointing

def _need(tok, task, b, ckpt=False):
    "Estimated peak of b of the task's longest examples in padded rows (each fills a row of its own), float32 on the CPU."
    rows, _ = tokenize_split(task, "train", tok, 2048)
    top = sorted(rows, key=lambda r: -len(r["input_ids"]))[:b]
    answers = sorted((sum(l != -100 for l in r["labels"]) for r in rows), reverse=True)[:b]
    return estimate_memory(tiny_model()[0].config, "lora", r=4, batch_size=b, seq_len=len(top[0]["input_ids"]), dtype="float32",
                           device="cpu", gradient_checkpointing=ckpt, loss_tokens=sum(answers)).total

def test_memory_budget_adapts_batch_and_keeps_the_run_folder(tiny, tmp_path):
    _, tok = tiny
    task = _long_task()
    longest = max(len(r["input_ids"]) for r in tokenize_split(task, "train", tok)[0])
    assert 1000 < longest < 2048, longest  # long, and under the tiny model's context: nothing is cut
    budget = (_need(tok, task, 4) + _need(tok, task, 8))/2
    seen = _Seen()
    with pytest.warns(UserWarning, match=r"8 examples of up to .* over the .* budget \(memory_limit_gb\); training with "
                                         r"batch_size=4, grad_accum=2 \(still 8 examples per step\)"):
        res = finetune("tiny", task, method="lora", r=4, batch_size=8, max_steps=1, max_val_examples=2, memory_limit_gb=budget,
                       callbacks=[seen], output_dir=tmp_path/"run", device="cpu")
    assert (seen.batch, seen.accum, seen.ckpt) == (4, 2, False)
    assert res.memory_plan["batch_size"] == 4 and res.memory_plan["grad_accum"] == 2
    assert res.memory_plan["estimate_gb"] <= budget < res.memory_plan["requested_gb"]
    assert res.config["batch_size"] == 8  # the user's config, and the run's hash, are unchanged
    run = json.loads((tmp_path/"run"/RUN_FILE).read_text())
    assert run["config"]["batch_size"] == 8 and run["memory_plan"]["batch_size"] == 4
    assert run["hash"] == TrainConfig(method="lora", r=4, batch_size=8, max_steps=1, max_val_examples=2).fingerprint(
        model="tiny", task=run["task"])
    with warnings.catch_warnings():  # a budget the batch fits in: nothing changes, nothing is said
        warnings.simplefilter("error")
        res2 = finetune("tiny", task, method="lora", r=4, batch_size=8, max_steps=1, max_val_examples=2, memory_limit_gb=100.0,
                        output_dir=tmp_path/"fits", device="cpu")
    assert res2.memory_plan["batch_size"] == 8 and res2.memory_plan["changed"] == ""

def test_memory_budget_too_small_stops_with_the_numbers_and_the_fix(tiny, tmp_path):
    _, tok = tiny
    task = _long_task()
    longest = max(len(r["input_ids"]) for r in tokenize_split(task, "train", tok)[0])
    tight = _need(tok, task, 1, ckpt=True) - 0.002  # not even one checkpointed example fits
    with pytest.raises(MemoryBudgetError) as e:
        finetune("tiny", task, method="lora", r=4, batch_size=8, max_steps=1, memory_limit_gb=tight, output_dir=tmp_path/"a", device="cpu")
    msg = str(e.value)
    assert isinstance(e.value, MemoryError) and isinstance(e.value, ValueError)
    assert f"8 examples of up to {longest:,} tokens" in msg and f"over the {tight:.2f} GB budget (memory_limit_gb)" in msg
    assert f"needs about {_need(tok, task, 8):.2f} GB (estimated)" in msg
    assert "even batch_size=1 with gradient_checkpointing=True needs about" in msg
    cap = int(msg.split("max_length=")[1].split(" ")[0])
    assert 16 <= cap < longest
    with pytest.raises(MemoryBudgetError, match=r"batch_size=4, grad_accum=2 fits \(about .* GB\): pass it, or adapt_memory=True"):
        finetune("tiny", task, method="lora", r=4, batch_size=8, max_steps=1, memory_limit_gb=(_need(tok, task, 4) + _need(tok, task, 8))/2,
                 adapt_memory=False, output_dir=tmp_path/"b", device="cpu")
    with pytest.raises(ValueError, match=r"TrainConfig\.memory_limit_gb: expected a positive number or None, got 0"): TrainConfig(memory_limit_gb=0)
    with pytest.raises(ValueError, match=r"TrainConfig\.adapt_memory: expected True or False, got 'no'"): TrainConfig(adapt_memory="no")

def test_truncation_cuts_the_middle_and_keeps_question_and_answer(tiny, tmp_path):
    _, tok = tiny
    task = _long_task(n=6, words=300)
    ex = task.train[0]
    full = tokenize_example(task, ex, tok)
    cap = len(full["input_ids"]) // 2
    cut = tokenize_example(task, ex, tok, max_length=cap)
    text = tok.decode(cut["input_ids"])
    assert len(cut["input_ids"]) == cap and cut["truncated"] and cut["input_cut"] > 0
    assert cut["input_tokens"] == len(tok(ex.input, add_special_tokens=False)["input_ids"])
    question = ex.input[ex.input.rindex("Question:"):]
    assert question in text and text.endswith("<|im_start|>assistant\n" + ex.target + "<|im_end|>\n")  # the end of the input, the answer
    assert "Table:\nrow" in text and task.instruction in text and CUT_MARK.strip() in text  # its start, the instruction, the mark
    assert tok.decode([t for t, l in zip(cut["input_ids"], cut["labels"]) if l != -100]) == ex.target + "<|im_end|>\n"
    cuts = []
    rows, n_cut = tokenize_split(task, "train", tok, max_length=cap, cuts=cuts)
    assert n_cut == len(cuts) == sum(len(tokenize_example(task, e, tok)["input_ids"]) > cap for e in task.train)
    i, id_, n, of = max(cuts, key=lambda c: c[2])
    assert id_ == task.train[i].id and n == tokenize_example(task, task.train[i], tok, cap)["input_cut"]
    with pytest.warns(UserWarning, match=rf"{n_cut} of {len(rows)} training examples are longer than max_length={cap} tokens and were "
                                         rf"truncated: {n_cut} lost the middle of their input .*; the largest cut: example {i} "
                                         rf"\(id {id_}\): {n:,} of {of:,} input tokens cut from the middle"):
        finetune("tiny", task, method="lora", r=4, max_length=cap, max_steps=1, max_val_examples=2, output_dir=tmp_path, device="cpu")


# --- freed memory back to the OS (CPU, glibc) ---

_FRAGMENT = """
import sys, psutil, torch
from vrnx_nb.training import release_freed_memory
if sys.argv[1] == "release": print("applied", release_freed_memory())
warm = torch.ones(4 * 2**20); del warm  # one 16 MB tensor freed: glibc's dynamic threshold rises past 4 MB
proc = psutil.Process(); before = proc.memory_info().rss
big, small = [], []
for _ in range(64): big.append(torch.ones(2**20)); small.append(torch.ones(2**13))  # 4 MB blocks between live 32 KB ones
grown = proc.memory_info().rss - before
del big
print(grown, proc.memory_info().rss - before)
"""

@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_release_freed_memory_hands_freed_tensors_back():
    def run(mode):
        out = subprocess.run([sys.executable, "-c", _FRAGMENT, mode], capture_output=True, text=True, env=ENV, check=True).stdout
        return out, [int(x) for x in out.split()[-2:]]
    _, (grown, held) = run("glibc")
    assert grown > 200e6 and held > 0.8 * grown  # glibc's own settings: the freed 256 MB stay resident
    out, (grown, held) = run("release")
    assert "applied True" in out and grown > 200e6 and held < 0.1 * grown

def test_finetune_releases_freed_memory_on_the_cpu_when_asked(task, tmp_path, monkeypatch):
    import vrnx_nb.training as T
    calls = []
    monkeypatch.setattr(T, "release_freed_memory", lambda *a, **k: calls.append(a) or True)
    for on in (True, False):
        calls.clear()
        res = finetune("tiny", task, method="lora", r=4, max_steps=1, max_val_examples=2, release_memory=on,
                       output_dir=tmp_path/str(on), device="cpu")
        assert len(calls) == int(on) and res.config["release_memory"] is on
    # not part of what is trained: the run's hash is the same either way
    assert TrainConfig(release_memory=True).fingerprint() == TrainConfig().fingerprint()
    with pytest.raises(ValueError, match=r"TrainConfig\.release_memory: expected True or False, got 1"): TrainConfig(release_memory=1)
    from vrnx_nb.training import _train_parser
    assert _train_parser().parse_args(["--release-memory"]).release_memory is True
    assert _train_parser().parse_args([]).release_memory is False and TrainConfig().release_memory is False


def test_balanced_run_chooses_checkpoints_by_the_balanced_validation_loss(task, tmp_path):
    "With balance on, the logged validation loss is the label-weighted one (training's weights), not the plain mean."
    import csv
    from vrnx_nb.training import val_balance_weights, completion_loss
    import copy
    val_idx = task.splits["val"]
    rare = [i for i in val_idx if task.examples[i].target != "Other"][:4]
    mixed = rare + [i for i in val_idx if task.examples[i].target == "Other"][:4]
    task = copy.copy(task); task.splits = {**task.splits, "val": mixed}  # one eval batch holding rare and common labels
    run = finetune("tiny", task, method="lora", balance="oversample", max_steps=1, eval_steps=1, batch_size=8,
                   max_val_examples=8, max_length=256, output_dir=tmp_path/"run", overwrite=True)
    logged = [float(r["loss"]) for r in csv.DictReader(open(tmp_path/"run"/"log.csv")) if r["split"] == "val"][-1]
    model, tok = load_trained(run, device="cpu")
    rows = tokenize_split(task, "val", tok, 256, 8)[0]
    w = val_balance_weights([e.target for e in task.train], [e.target for e in task.val[:8]])
    assert len(set(w)) > 1, "the first 8 validation clauses should hold more than one label"
    for r, x in zip(rows, w): r["weight"] = x
    batch = PaddedCollator(tok.pad_token_id)(rows)
    with torch.no_grad(): logits = model(input_ids=batch["input_ids"]).logits
    weighted = completion_loss(logits, batch["labels"], batch["token_weights"]).item()
    plain = completion_loss(logits, batch["labels"]).item()
    assert abs(logged - weighted) < 1e-3, (logged, weighted, plain)
    assert abs(plain - weighted) > 1e-3, (plain, weighted)

# --- the LoRA scaling on the rank-r activations ---

@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_lora_scaled_in_the_rank_trains_bit_for_bit_like_peft(task, tmp_path, monkeypatch, method):
    "B(A(x) * s), flat 4-bit scales, shared unpacking buffers, no output copy: at s = 2 the losses and weights equal peft's."
    if method == "qlora": pytest.importorskip("bitsandbytes")
    from safetensors.torch import load_file
    import vrnx_nb.training as T
    switched, real, flattened, real_flat = [], T.scale_lora_in_rank, [], T.flatten_4bit_scales
    shared, real_share, unpacked, real_unpack = [], T.share_4bit_buffers, [], T._unpack_4bit
    monkeypatch.setattr(T, "_unpack_4bit", lambda *a: unpacked.append(1) or real_unpack(*a))
    def run(fast):
        monkeypatch.setattr(T, "scale_lora_in_rank", (lambda m: switched.append(real(m)) or switched[-1]) if fast else (lambda m: 0))
        flat = (lambda m: flattened.append(real_flat(m)) or flattened[-1]) if fast else (lambda m: 0)
        monkeypatch.setattr(T, "flatten_4bit_scales", flat)
        monkeypatch.setattr(T, "share_4bit_buffers", (lambda m: shared.append(real_share(m)) or shared[-1]) if fast else (lambda m: 0))
        res = finetune("tiny", task, method=method, r=4, max_steps=3, batch_size=4, max_val_examples=4, early_stopping_patience=None,
                       output_dir=tmp_path/str(fast), device="cpu")
        return [h["loss"] for h in res.history], load_file(str(Path(res.output_dir)/"adapter_model.safetensors"))
    (loss_fast, w_fast), (loss_peft, w_peft) = run(True), run(False)
    assert switched and switched[0] > 0  # the fast path really ran, in every adapted layer
    if method == "qlora": assert flattened and flattened[0] > 0  # and the 4-bit scales were flat (no copy of the base output)
    if method == "qlora": assert shared and shared[0] > 0 and unpacked  # and the 4-bit weights unpacked into shared buffers
    assert loss_fast == loss_peft and len(loss_fast) >= 3
    assert w_fast.keys() == w_peft.keys() and all(torch.equal(w_fast[k], w_peft[k]) for k in w_fast)
    assert any(not torch.equal(w_fast[k], torch.zeros_like(w_fast[k])) for k in w_fast if "lora_B" in k)  # B trained away from 0
