"""Evaluation: bad inputs give clear errors; batching does not change outputs; TAT-QA rules on hand-checked dev cases;
loading runs; per-label scores, confusion matrix and the collapse warning on hand-made cases."""
import copy, json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from vrnx_nb.tasks import Task, Example, load_task, render_prompt, render_pair, data_dir
from vrnx_nb.models import tiny_model, tiny_model_path
from vrnx_nb.evaluation import (bootstrap_ci, classification_metrics, rouge_metrics, task_metrics, tatqa_em_f1, parse_tatqa_answer,
                                generate_batched, label_logliks, evaluate, results_table, plot_results, main_eval, Scores, _length_groups,
                                _prefix_clusters, _common_len, collapse_warning, is_skewed, per_label_table, plot_confusion)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return tiny_model()


@pytest.fixture(scope="module")
def varied():
    "The tiny model with weights redrawn at a larger scale: its greedy replies differ from prompt to prompt."
    model, tok = tiny_model()
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters(): p.normal_(0, 0.3 if p.dim() > 1 else 1.0)
    return model, tok


@pytest.fixture(scope="module")
def legal(): return load_task("legal")


@pytest.fixture(scope="module")
def finance(): return load_task("finance")


# --- bad input -------------------------------------------------------------------------------------------------------

def test_tokenizer_without_chat_template(tiny, legal):
    model, tok = tiny
    bare = copy.deepcopy(tok); bare.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        evaluate((model, bare), legal, limit=2, n_boot=10)


def test_empty_split(tiny, legal):
    empty = replace(legal, splits={**legal.splits, "test": []})
    with pytest.raises(ValueError, match="split 'test' is empty"):
        evaluate(tiny, empty, n_boot=10)
    with pytest.raises(ValueError, match="no split 'dev'"):
        evaluate(tiny, legal, split="dev", n_boot=10)


def test_task_kind_without_metric(tiny, legal):
    odd = replace(legal); odd.kind = "translation"  # Task() itself refuses unknown kinds; a later edit must still be caught
    with pytest.raises(ValueError, match="no metric for task kind 'translation'"):
        evaluate(tiny, odd, limit=2, n_boot=10)
    with pytest.raises(ValueError, match="no metric for task kind 'translation'"):
        task_metrics(odd, ["Other"], legal.test[:1])


def test_predictions_references_length_mismatch(legal):
    with pytest.raises(ValueError, match="2 predictions, 3 references"):
        classification_metrics(["Other", "Other"], ["Other", "Other", "Arbitration"], legal.labels)
    with pytest.raises(ValueError, match="1 predictions, 2 references"):
        rouge_metrics(["a"], ["a", "b"])
    with pytest.raises(ValueError, match="differ in length"):
        task_metrics(legal, ["Other"] * 3, legal.test[:2])
    with pytest.raises(ValueError, match="empty"):
        rouge_metrics([], [])


def test_other_bad_arguments(tiny, legal):
    with pytest.raises(ValueError, match="mode must be"):
        evaluate(tiny, legal, mode="beam", limit=2)
    with pytest.raises(ValueError, match="needs a classification task"):
        evaluate(tiny, "medical", mode="loglik", limit=2)
    with pytest.raises(ValueError, match="limit must be a positive integer"):
        evaluate(tiny, legal, limit=0)
    with pytest.raises(ValueError, match="Cannot evaluate a int"):
        evaluate(42, legal, limit=2)
    with pytest.raises(ValueError, match="outside the label set"):
        classification_metrics(["Other"], ["Nonsense"], ["Other"])
    with pytest.raises(ValueError, match="no runs"):
        results_table([])
    with pytest.raises(ValueError, match="missing \\['task'\\]"):
        results_table([{"method": "lora", "score": .5}])
    with pytest.raises(ValueError, match="reference method 'full' is not among"):
        results_table([{"method": "lora", "task": "legal", "score": .5}], reference="full")


def test_cli_errors_exit_2(capsys):
    assert main_eval(["--model", "tiny", "--task", "nope"]) == 2
    assert "Unknown task 'nope'" in capsys.readouterr().err


# --- batching --------------------------------------------------------------------------------------------------------

def test_length_groups_bound_padding():
    lengths = [1181, 395, 1179, 381, 90, 100]
    groups = _length_groups(lengths, 1.25)
    assert sorted(i for g in groups for i in g) == list(range(6))
    for g in groups: assert max(lengths[i] for i in g) <= 1.25 * min(lengths[i] for i in g)
    assert len(groups) == 3


@pytest.mark.parametrize("name,n", [("legal", 24), ("finance", 6)])
def test_batch_1_and_16_same_outputs(varied, name, n):
    "Finance prompts range from ~300 to ~1,600 tokens: prefill groups and stitched caches are exercised."
    model, tok = varied
    task = load_task(name)
    prompts = [render_prompt(task, e, tok) for e in task.test[:n]]
    # no stop tokens: the random tiny model may end at once on some tasks; here every row writes 10 tokens
    one = generate_batched(model, tok, prompts, batch_size=1, max_new_tokens=10, sort=False, stop=set(), return_ids=True)
    many = generate_batched(model, tok, prompts, batch_size=16, max_new_tokens=10, stop=set(), return_ids=True)
    assert one == many
    assert all(len(x) == 10 for x in one) and len({tuple(x) for x in one}) > 1  # not a degenerate constant output


def test_questions_on_one_table_share_their_context(varied, finance):
    "Finance prompts put the report first: questions on one table share ~1,000 tokens, computed once, with the same replies."
    model, tok = varied
    exs = finance.test[:14]  # 6 + 6 + 2 questions on three tables
    prompts = [render_prompt(finance, e, tok) for e in exs]
    enc = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    clusters = _prefix_clusters(enc, _common_len(enc), 32)  # past the instruction all prompts share
    assert sorted(len(c) for c in clusters) == [2, 6, 6]
    assert all(len({exs[i].meta["table_uid"] for i in c}) == 1 for c in clusters)
    import vrnx_nb.evaluation as ev
    from unittest import mock
    with mock.patch.object(ev, "_extend_prefix", wraps=ev._extend_prefix) as extend:
        many = generate_batched(model, tok, prompts, batch_size=16, max_new_tokens=8, stop=set(), return_ids=True)
    assert extend.call_count == 3  # each table's context computed once
    for p, got in zip(prompts, many):  # the plain loop: `model.generate` on each prompt alone
        x = tok(p, add_special_tokens=False, return_tensors="pt")
        out = model.generate(**x, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
        assert got == out[0, x["input_ids"].shape[1]:].tolist()
    comps = [" 12.5 million<|im_end|>", " 3.2%<|im_end|>", " Revenue<|im_end|>"]
    np.testing.assert_allclose(label_logliks(model, tok, prompts, comps, batch_size=16),
                               label_logliks(model, tok, prompts, comps, batch_size=1, share_prefix=False), atol=1e-3)


def test_early_stopped_rows_match_generate(varied, legal):
    "A row that hits the stop token leaves the batch; the others continue exactly as `model.generate` does alone."
    model, tok = varied
    prompts = [render_prompt(legal, e, tok) for e in legal.test[:6]]
    enc0 = tok(prompts[0], add_special_tokens=False)["input_ids"]
    # make a common generated token a stop token so that rows finish at different steps
    first = generate_batched(model, tok, prompts, batch_size=1, max_new_tokens=6, stop=set())
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in first]
    stop = {ids[0][1]} if len(ids[0]) > 1 else {ids[0][0]}
    batched = generate_batched(model, tok, prompts, batch_size=16, max_new_tokens=6, stop=stop)
    for p, got in zip(prompts, batched):
        x = tok(p, add_special_tokens=False, return_tensors="pt")
        out = model.generate(**x, max_new_tokens=6, do_sample=False, eos_token_id=sorted(stop), pad_token_id=tok.pad_token_id)
        new = [t for t in out[0, x["input_ids"].shape[1]:].tolist()]
        cut = next((i for i, t in enumerate(new) if t in stop), len(new))
        assert got == tok.decode(new[:cut], skip_special_tokens=True).strip()
    assert any(len(b) < len(f) for b, f in zip(batched, first))  # some row really stopped early


def test_loglik_batch_invariant_and_matches_forward(varied):
    model, tok = varied
    legal = load_task("legal")
    prompts = [render_prompt(legal, e, tok) for e in legal.test[:10]]
    comps = [render_pair(legal, replace(legal.test[0], target=l), tok)["completion"] for l in legal.labels]
    a = label_logliks(model, tok, prompts, comps, batch_size=1)
    b = label_logliks(model, tok, prompts, comps, batch_size=16)
    np.testing.assert_allclose(a, b, atol=1e-3)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    for i in (3, 7):  # every label scored alone by a plain forward pass: the packed, block-masked scoring agrees
        p = tok(prompts[i], add_special_tokens=False)["input_ids"]
        for j, comp in enumerate(comps):
            c = tok(comp, add_special_tokens=False)["input_ids"]; c = c[:c.index(end) + 1]
            with torch.no_grad(): lp = torch.log_softmax(model(torch.tensor([p + c])).logits[0], -1)
            assert abs(b[i, j] - sum(lp[len(p) - 1 + k, t].item() for k, t in enumerate(c))) < 1e-3, (i, j)


# --- metrics ---------------------------------------------------------------------------------------------------------

def _dev_question(uid_prefix):
    for ctx in json.loads((data_dir()/"tatqa_dev.json").read_text()):
        for q in ctx["questions"]:
            if q["uid"].startswith(uid_prefix): return q
    raise KeyError(uid_prefix)


# (uid prefix, prediction, expected (EM, F1)), checked by hand against the rules of TAT-QA's tatqa_metric.py
TATQA_CASES = [
    ("4960801d", "$1,496.5 million", (1.0, 1.0)),   # span, scale million
    ("4960801d", "1496.5 million", (1.0, 1.0)),     # $ and comma dropped
    ("4960801d", "$1,496.5", (0.0, 0.0)),           # missing scale: 1496.5 != 1496500000
    ("4960801d", "$1,496.5 billion", (0.0, 0.0)),   # wrong scale
    ("eb787966", "-12.6 million", (1.0, 1.0)),      # arithmetic
    ("eb787966", "(12.6) million", (1.0, 1.0)),     # bracket = negative
    ("eb787966", "12.6 million", (0.0, 0.0)),       # sign matters; arithmetic F1 = EM
    ("05b670d3", "-22.22%", (1.0, 1.0)),            # percent scale
    ("05b670d3", "-0.2222", (1.0, 1.0)),            # plain value of a percentage
    ("05b670d3", "-22.2%", (0.0, 0.0)),
    ("593c4388", "time-and-material type | cost-plus type | fixed-price type", (1.0, 1.0)),  # any order
    ("593c4388", "fixed-price type | cost-plus type", (0.0, 0.86)),  # 3 of 4 words: P=1, R=.75
    ("c3993366", "57,768 | 73,260 thousand", (1.0, 1.0)),  # multi-span with scale
    ("f4142349", "2019", (1.0, 1.0)),
    ("f4142349", "The year 2019.", (0.0, 0.0)),      # text is not a number, so '2019' is not normalised to '2019.0': no overlap
]


@pytest.mark.parametrize("uid,pred,expected", TATQA_CASES)
def test_tatqa_hand_checked(uid, pred, expected):
    q = _dev_question(uid)
    assert tatqa_em_f1(pred, q["answer"], q["answer_type"], q["scale"]) == expected


def test_tatqa_every_dev_target_matches_its_gold(finance):
    res = task_metrics(finance, [e.target for e in finance.examples], finance.examples, n_boot=10)
    assert res["metrics"] == {"exact_match": 1.0, "f1": 1.0}
    shuffled = [finance.examples[(i + 1) % len(finance.examples)].target for i in range(len(finance.examples))]
    assert task_metrics(finance, shuffled, finance.examples, n_boot=10)["metrics"]["exact_match"] < 0.05


def test_parse_answer():
    assert parse_tatqa_answer("Answer: 5 | 6 million\nmore text") == (["5", "6"], "million")
    assert parse_tatqa_answer("13.2%") == (["13.2%"], "percent")
    assert parse_tatqa_answer("") == ([], "")


def test_bootstrap_seeded_and_sensible():
    x = np.r_[np.ones(30), np.zeros(20)]
    assert bootstrap_ci(x, seed=1) == bootstrap_ci(x, seed=1)
    lo, hi = bootstrap_ci(x, n_boot=2000)
    assert lo < 0.6 < hi and 0.1 < hi - lo < 0.4   # binomial: ~ +-1.96*sqrt(.24/50) = +-0.136
    assert bootstrap_ci(np.ones(10)) == (1.0, 1.0)


# --- loading and the whole call --------------------------------------------------------------------------------------

def test_peft_adapter_folder_and_duck_typed_result(legal, tmp_path):
    from peft import LoraConfig, get_peft_model
    from vrnx_nb.models import load_model
    # three labels of equal token length (a random model otherwise picks the shortest label, 'Other', every time)
    labs = ["Jurisdiction", "Contract by using", "Choice of law"]
    exs = [replace(e, target=labs[i % 3]) for i, e in enumerate(legal.test[:8])]
    three = replace(legal, labels=labs, examples=exs, splits={"test": list(range(8))})
    base, tok = load_model(str(tiny_model_path()), dtype=torch.float32, device="cpu")
    torch.manual_seed(1)
    peft = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)).eval()
    with torch.no_grad():  # a strong random adapter: the label it picks varies from clause to clause
        for n, p in peft.named_parameters():
            if "lora_" in n: p.normal_(0, 0.8)
    peft.save_pretrained(tmp_path/"run")
    direct = evaluate((peft, tok), three, n_boot=20, method="lora")
    from_dir = evaluate(str(tmp_path/"run"), three, n_boot=20, method="lora", save_dir=tmp_path)
    run = SimpleNamespace(output_dir=str(tmp_path/"run"), base_model=str(tiny_model_path()), method="lora")
    from_obj = evaluate(run, three, n_boot=20)
    assert from_obj.method == "lora"
    rows = [json.loads(l) for l in open(from_dir.predictions_path)]
    assert len(rows) == 8 and {"id", "input", "prediction", "reference", "scores"} <= set(rows[0])
    assert [r["id"] for r in rows] == [e.id for e in exs] and [r["reference"] for r in rows] == [e.target for e in exs]
    # each saved prediction is the label the adapter model scores highest by plain forward passes (no batching, no file)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    expected = []
    for e in exs:
        p = tok(render_prompt(three, e, tok), add_special_tokens=False)["input_ids"]
        lls = []
        for label in labs:
            c = tok(render_pair(three, replace(e, target=label), tok)["completion"], add_special_tokens=False)["input_ids"]
            c = c[:c.index(end) + 1]
            with torch.no_grad(): lp = torch.log_softmax(peft(torch.tensor([p + c])).logits[0], -1)
            lls.append(sum(lp[len(p) - 1 + k, t].item() for k, t in enumerate(c)))
        assert np.sort(lls)[-1] - np.sort(lls)[-2] > 0.01  # a clear winner: rounding cannot flip it
        expected.append(labs[int(np.argmax(lls))])
    assert len(set(expected)) > 1  # not one label throughout, so the comparison below can tell rows apart
    assert [r["prediction"] for r in rows] == expected
    assert [r["scores"]["correct"] for r in rows] == [int(x == e.target) for x, e in zip(expected, exs)]
    assert direct.metrics == from_dir.metrics == from_obj.metrics
    assert from_dir.metrics["accuracy"] == pytest.approx(np.mean([x == e.target for x, e in zip(expected, exs)]))


def test_scores_and_table_and_plot(tiny, tmp_path):
    s = evaluate(tiny, "medical", limit=4, max_new_tokens=4, n_boot=50, method="zero-shot")
    assert isinstance(s, Scores) and s.n == 4 and s.examples_per_s > 0 and set(s.ci) == {"rougeL", "rouge1", "rouge2"}
    runs = [s, {"method": "full", "task": "medical", "score": .4, "ci": (.3, .5)},
            {"method": "full", "task": "legal", "metrics": {"accuracy": .8}}, {"method": "zero-shot", "task": "legal", "score": .4}]
    t = results_table(runs)
    assert list(t.index) == ["zero-shot", "full"]
    assert list(t.columns) == ["legal accuracy", "medical ROUGE-L", "average", "% of full fine-tuning"]
    assert t.loc["full", "average"] == 60.0 and t.loc["full", "% of full fine-tuning"] == 100.0
    png = tmp_path/"r.png"; plot_results(t, png)
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_cli_prints_scores_with_ci(capsys):
    assert main_eval(["--model", "tiny", "--task", "legal", "--limit", "4", "--n-boot", "20"]) == 0
    out = capsys.readouterr().out
    assert "legal (zero-shot, loglik): macro_f1" in out and ", accuracy " in out and "[" in out  # skewed labels: macro-F1 first


def test_bottleneck_adapter_model_generates_batch_invariant(legal):
    "The training module's bottleneck wrapper (forward(*args, **kwargs)) goes through the same batched decoding."
    from vrnx_nb import training  # the package's own module: a broken import fails here, it is not skipped
    model, tok = tiny_model()
    torch.manual_seed(0)
    wrapped = training.BottleneckModel(model, training.BottleneckConfig(r=8)).eval()
    with torch.no_grad():
        for n, p in wrapped.named_parameters():
            if "adapter" in n: p.normal_(0, 0.5)
    prompts = [render_prompt(legal, e, tok) for e in legal.test[:6]]
    one = generate_batched(wrapped, tok, prompts, batch_size=1, max_new_tokens=5, stop=set(), return_ids=True)
    assert one == generate_batched(wrapped, tok, prompts, batch_size=16, max_new_tokens=5, stop=set(), return_ids=True)
    s = evaluate((wrapped, tok), legal, limit=4, n_boot=20, method="adapter")
    assert s.n == 4 and s.method == "adapter"


def test_rows_join_a_running_batch_with_the_same_replies(varied, legal):
    "Continuous batching: when rows stop, waiting prompts are prefilled and join the batch mid-decode; replies are unchanged."
    model, tok = varied
    prompts = [render_prompt(legal, e, tok) for e in legal.test[:12]]
    first = generate_batched(model, tok, prompts, batch_size=1, max_new_tokens=8, stop=set(), return_ids=True)
    stop = {first[0][2], first[5][1]}  # rows end at different steps
    import vrnx_nb.evaluation as ev
    from unittest import mock
    with mock.patch.object(ev, "_join_rows", wraps=ev._join_rows) as join:
        many = generate_batched(model, tok, prompts, batch_size=4, max_new_tokens=8, stop=stop, return_ids=True)
    assert join.call_count >= 1  # prompts really joined rows that were still writing
    one = generate_batched(model, tok, prompts, batch_size=1, max_new_tokens=8, stop=stop, return_ids=True)
    assert many == one
    assert len({len(x) for x in one}) > 2  # replies of several lengths: rows left at different steps


def test_shared_report_is_kept_once_not_per_row(varied, finance):
    "With questions on one report, the batch cache holds each row's own question; the ~600-token report sits once."
    import vrnx_nb.evaluation as ev
    model, tok = varied
    prompts = [render_prompt(finance, e, tok) for e in finance.test[:6]]  # six questions on one table
    enc = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    st = ev._Cascade(model); st.prefixes[0] = ev._shared_prefix(model, enc, ev._cache_arg(model))
    clusters = ev._prefix_clusters(enc, st.prefixes[0][0], 32)
    gid = ev._prefix_ids(model, enc, list(range(6)), clusters, st, 32)
    assert len(set(gid)) == 1  # one shared prefix for all six (here the common prefix already spans the report)
    _, cache, mask, last = ev._prefill(model, enc, tok.pad_token_id, st, gid)
    shared = st.prefixes[gid[0]][0]
    assert shared > 500 and mask.shape[1] < 100 and min(map(len, enc)) > shared  # rows hold tens of tokens; the report sits once
    assert last.tolist() == [len(e) - 1 for e in enc]  # positions continue after the shared report


def test_models_that_cannot_split_attention_use_plain_batches(varied, legal):
    "A model whose attention cannot be split (here: logit soft-capping) is batched without shared prefixes, same replies."
    import vrnx_nb.evaluation as ev
    model, tok = tiny_model()
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters(): p.normal_(0, 0.3 if p.dim() > 1 else 1.0)
    assert ev._cascade_ok(model)
    model.config.attn_logit_softcapping = 30.0  # a Gemma-2 style setting that the cascade attention does not implement
    ev._CASCADE_OK.pop(model, None)
    assert not ev._cascade_ok(model)
    prompts = [render_prompt(legal, e, tok) for e in legal.test[:6]]
    one = generate_batched(model, tok, prompts, batch_size=1, max_new_tokens=6, stop=set(), return_ids=True)
    assert one == generate_batched(model, tok, prompts, batch_size=16, max_new_tokens=6, stop=set(), return_ids=True)
    comps = [" Other<|im_end|>", " Arbitration<|im_end|>"]
    np.testing.assert_allclose(label_logliks(model, tok, prompts, comps, batch_size=1), label_logliks(model, tok, prompts, comps, batch_size=16), atol=1e-3)


def test_unfused_attention_path_gives_the_same_replies(varied, finance):
    "Off a CPU the cascade attention runs as plain float32 matmuls (scores in chunks); forced here, replies are those of the fused path."
    import vrnx_nb.evaluation as ev
    from unittest import mock
    model, tok = varied
    prompts = [render_prompt(finance, e, tok) for e in finance.test[:8]]  # 6 questions on one table, 2 on the next
    fused = generate_batched(model, tok, prompts, batch_size=16, max_new_tokens=6, stop=set(), return_ids=True)
    with mock.patch.object(ev, "_fused", lambda q: False), mock.patch.object(ev, "_SCORES_PER_CHUNK", 4096):  # small chunks: several per prefill
        plain = generate_batched(model, tok, prompts, batch_size=16, max_new_tokens=6, stop=set(), return_ids=True)
    assert plain == fused
    one = generate_batched(model, tok, prompts, batch_size=1, max_new_tokens=6, stop=set(), return_ids=True, share_prefix=False)
    assert fused == one


def test_half_precision_models_share_prefixes():
    "SmolLM2 in bfloat16 and float16 passes the cascade check (it failed when probed on special tokens, where the model runs to extremes)."
    import vrnx_nb.evaluation as ev
    from vrnx_nb.models import load_model
    for dtype in (torch.bfloat16, torch.float16):
        model, _ = load_model("smollm2-135m", dtype=dtype, device="cpu")
        assert ev._cascade_ok(model), dtype


# --- per-label scores, confusion matrix, collapse warning ------------------------------------------------------------

HAND_LABELS = ["Other", "Arbitration", "Choice of law", "Limitation of liability"]
HAND_REFS = ["Other", "Other", "Other", "Other", "Arbitration", "Arbitration", "Choice of law", "Choice of law"]
HAND_PREDS = ["Other", "Other", "Arbitration", None, "Arbitration", "Other", "Choice of law", "Other"]


def test_per_label_scores_on_a_hand_made_example():
    "Worked by hand: Other 2 of 4 right and predicted 4 times; Arbitration 1 of 2, predicted 2; Choice of law 1 of 2, predicted 1."
    m = classification_metrics(HAND_PREDS, HAND_REFS, HAND_LABELS, n_boot=10)
    per = m["per_label"]
    assert list(per) == HAND_LABELS and m["labels"] == HAND_LABELS
    assert per["Other"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 4, "predicted": 4}
    assert per["Arbitration"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2, "predicted": 2}
    assert per["Choice of law"] == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2/3), "support": 2, "predicted": 1}
    assert per["Limitation of liability"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0, "predicted": 0}
    from sklearn.metrics import precision_recall_fscore_support
    seen = HAND_LABELS[:3]
    p, r, f, n = precision_recall_fscore_support(HAND_REFS, [x or "<none>" for x in HAND_PREDS], labels=seen, zero_division=0)
    np.testing.assert_allclose([[per[l][k] for l in seen] for k in ("precision", "recall", "f1")], [p, r, f])
    assert [per[l]["support"] for l in seen] == n.tolist()
    assert m["metrics"]["macro_f1"] == pytest.approx(np.mean(f))  # macro-F1 = mean per-label F1 over the labels that occur


def test_confusion_matrix_shape_and_values():
    m = classification_metrics(HAND_PREDS, HAND_REFS, HAND_LABELS, n_boot=10)
    assert m["confusion"] == [[2, 1, 0, 0, 1],  # Other: 2 right, 1 as Arbitration, 1 unmatched (last column)
                              [1, 1, 0, 0, 0],
                              [1, 0, 1, 0, 0],
                              [0, 0, 0, 0, 0]]
    from sklearn.metrics import confusion_matrix
    sk = confusion_matrix(HAND_REFS, [x or "-" for x in HAND_PREDS], labels=HAND_LABELS)
    np.testing.assert_array_equal(np.array(m["confusion"])[:, :4], sk)
    every_named = classification_metrics(["Other", "Arbitration", "Other"], ["Other", "Other", "Arbitration"], HAND_LABELS, n_boot=10)
    assert np.array(every_named["confusion"]).shape == (4, 4)  # no unmatched column when every prediction named a label
    assert every_named["confusion"][0][:2] == [1, 1] and every_named["confusion"][1][:2] == [1, 0]


def test_per_label_table_and_confusion_plot(tmp_path):
    m = classification_metrics(HAND_PREDS, HAND_REFS, HAND_LABELS, n_boot=10)
    t = per_label_table(m)
    assert list(t.columns) == ["label", "precision", "recall", "f1", "support", "predicted"] and list(t.label) == HAND_LABELS
    assert t.support.tolist() == [4, 2, 2, 0] and t.predicted.tolist() == [4, 2, 1, 0]
    fig = plot_confusion(m, tmp_path/"c.png")
    assert (tmp_path/"c.png").read_bytes()[:4] == b"\x89PNG"
    ax = fig.axes[0]
    assert [x.get_text() for x in ax.get_xticklabels()] == HAND_LABELS + ["unmatched"]
    assert [x.get_text() for x in ax.get_yticklabels()] == \
        ["Other (4)", "Arbitration (2)", "Choice of law (2)", "Limitation of liability (0)"]
    np.testing.assert_array_equal(ax.collections[0].get_array().reshape(4, 5), m["confusion"])
    shares = plot_confusion(m, normalize=True).axes[0].collections[0].get_array().reshape(4, 5)
    np.testing.assert_allclose(shares[0], [.5, .25, 0, 0, .25]); np.testing.assert_allclose(shares[3], 0)
    s = Scores("medical", "summarization", "rougeL", {"rougeL": .3}, {"rougeL": (.2, .4)}, 4)
    with pytest.raises(ValueError, match="task 'medical' .*no per-label scores"): plot_confusion(s)
    with pytest.raises(ValueError, match="no per-label scores"): per_label_table(s)


def test_collapse_warning_at_97_percent_not_at_80():
    refs = ["Other"]*450 + ["Arbitration"]*50
    assert collapse_warning(["Other"]*485 + ["Arbitration"]*15, refs) == \
        "predicts 'Other' for 97% of the test examples (485 of 500); the majority label is 90% of the references"
    assert collapse_warning(["Other"]*400 + ["Arbitration"]*100, refs) is None
    assert collapse_warning(["Other"]*474 + ["Arbitration"]*26, refs) is None  # 94.8%: just under the threshold
    assert collapse_warning(["Other"]*475 + ["Arbitration"]*25, refs).startswith("predicts 'Other' for 95% ")
    at80 = collapse_warning(["Other"]*400 + ["Arbitration"]*100, refs, "dev", threshold=.8)
    assert "for 80% of the dev examples (400 of 500)" in at80
    with pytest.raises(ValueError, match="differ in length"): collapse_warning(["Other"], refs)


def test_summary_leads_with_macro_f1_on_skewed_labels():
    ci = {"accuracy": (.85, .95), "macro_f1": (.05, .2)}
    def scores(supports):
        return Scores("legal", "classification", "accuracy", {"accuracy": .9, "macro_f1": .1}, ci, sum(supports.values()),
                      0, per_label={l: {"support": n} for l, n in supports.items()})
    lead = lambda s: s.summary().split(": ", 1)[1].split(" ")[0]
    assert lead(scores({"Other": 90, "Arbitration": 10})) == "macro_f1"  # 90% of the split
    assert lead(scores({"a": 50, "b": 40, "c": 10})) == "macro_f1"       # 50 > 3 x 10
    assert lead(scores({"a": 40, "b": 30, "c": 30})) == "accuracy"       # balanced enough: unchanged
    line = scores({"Other": 90, "Arbitration": 10}).summary()
    assert "macro_f1 0.100 [0.050, 0.200], accuracy 0.900 [0.850, 0.950]; n=100" in line and "\n" not in line
    assert is_skewed(["a"]*7 + ["b"]*3) and not is_skewed(["a"]*6 + ["b"]*4)


def test_evaluate_fills_per_label_and_warns_on_collapse(tiny, legal, tmp_path):
    from collections import Counter
    s = evaluate(tiny, legal, limit=24, n_boot=20, save_dir=tmp_path)
    rows = [json.loads(l) for l in open(s.predictions_path)]
    preds, refs = Counter(r["prediction"] for r in rows), Counter(r["reference"] for r in rows)
    assert s.labels == legal.labels and np.array(s.confusion).shape == (9, 9)
    assert {l: v["support"] for l, v in s.per_label.items()} == {l: refs[l] for l in legal.labels}
    assert {l: v["predicted"] for l, v in s.per_label.items()} == {l: preds[l] for l in legal.labels}
    label, count = preds.most_common(1)[0]
    if count/24 >= .95:  # this tiny model answers one label throughout
        assert s.warnings == [collapse_warning([r["prediction"] for r in rows], [r["reference"] for r in rows])]
        assert s.warnings[0].startswith(f"predicts {label!r} for {count/24:.0%} of the test examples ({count} of 24); ")
    else: assert s.warnings == []
    summ = evaluate(tiny, "medical", limit=2, max_new_tokens=2, n_boot=10)
    assert summ.per_label is None and summ.confusion is None and summ.warnings == []


def test_cli_prints_warnings_after_the_summary(capsys):
    import vrnx_nb.evaluation as ev
    from unittest import mock
    with mock.patch.object(ev, "collapse_warning", return_value="predicts 'Other' for 100% of the test examples (4 of 4)"):
        assert main_eval(["--model", "tiny", "--task", "legal", "--limit", "4", "--n-boot", "20"]) == 0
    lines = capsys.readouterr().out.splitlines()
    i = next(k for k, l in enumerate(lines) if l.startswith("legal (zero-shot, loglik): "))
    assert lines[i + 1] == "warning: predicts 'Other' for 100% of the test examples (4 of 4)"


def test_run_folder_calibration_is_applied(tmp_path):
    "evaluate applies the calibration.json a run folder holds (and says so); calibration=None forces the argmax."
    from vrnx_nb.training import finetune
    from vrnx_nb.calibration import Calibration, save_calibration
    task = load_task("legal", n_train=16)
    run = finetune("tiny", task, method="lora", r=4, max_steps=1, batch_size=4, max_val_examples=4, output_dir=str(tmp_path/"run"))
    last = task.labels[-1]
    save_calibration(Calibration(task.labels, [0.0] * (len(task.labels) - 1) + [100.0]), run.output_dir)
    auto = evaluate(run, task, limit=8, n_boot=50)
    plain = evaluate(run, task, limit=8, n_boot=50, calibration=None)
    assert auto.calibrated and not plain.calibrated
    assert auto.per_label[last]["predicted"] == 8 and "calibrated" in auto.summary()
    assert plain.per_label[last]["predicted"] < 8


def test_calibration_argument_of_the_wrong_type():
    "A calibration that is neither 'auto', a Calibration nor None is refused, naming what was expected."
    with pytest.raises(ValueError, match=r"calibration: expected 'auto', a Calibration or None, got dict"):
        evaluate(tiny_model(), load_task("legal", n_train=16), limit=2, calibration={"offsets": [0.0]})
