"""Evaluation: bad inputs give clear errors; loading runs; scores, tables, plots and the CLI; per-label table, confusion
plot, the collapse warning and calibration on hand-made cases; the names that moved to `metrics` and `generation` still
import from here."""
import copy, json
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from vrnx_nb.tasks import load_task, render_prompt, render_pair
from vrnx_nb.models import tiny_model, tiny_model_path
from vrnx_nb.evaluation import (classification_metrics, task_metrics, evaluate, results_table, plot_results, main_eval,
                                Scores, collapse_warning, is_skewed, per_label_table, plot_confusion)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return tiny_model()


@pytest.fixture(scope="module")
def legal(): return load_task("legal")


# --- the names from metrics and generation ---------------------------------------------------------------------------

# `vrnx_nb.evaluation.__all__` before the metrics and the inference engine moved to their own modules
OLD_ALL = ['SCALES', 'METRICS', 'METRIC_LABELS', 'TASK_ORDER', 'FULL_NAMES', 'bootstrap_ci', 'match_label',
           'classification_metrics', 'collapse_warning', 'is_skewed', 'rouge_metrics', 'scale_factor', 'is_number',
           'to_number', 'tatqa_normalize', 'tatqa_answer_strings', 'parse_tatqa_answer', 'tatqa_em_f1', 'task_metrics',
           'stop_token_ids', 'generate_batched', 'scored_completion_ids', 'label_logliks', 'load_for_eval',
           'default_max_new_tokens', 'Scores', 'evaluate', 'per_label_table', 'plot_confusion', 'results_table',
           'plot_results', 'main_eval']


def test_moved_names_still_import_from_evaluation():
    "Every name evaluation exported still imports from it (also by `*`), and a moved name is the new module's object."
    import vrnx_nb.evaluation as ev, vrnx_nb.metrics as mt, vrnx_nb.generation as gen
    assert set(OLD_ALL) <= set(ev.__all__)
    star = {}; exec("from vrnx_nb.evaluation import *", star)
    assert set(OLD_ALL) <= set(star)
    moved = [n for n in OLD_ALL if hasattr(mt, n) or hasattr(gen, n)]
    assert len(moved) == 18 and "generate_batched" in moved and "classification_metrics" in moved
    for n in moved: assert getattr(ev, n) is getattr(mt, n, None) or getattr(ev, n) is getattr(gen, n, None), n
    assert ev._macro_f1 is mt._macro_f1  # the calibration module imports it from evaluation


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
            {"method": "full", "task": "legal", "metrics": {"accuracy": .8}},
            {"method": "zero-shot", "task": "legal", "score": .4}]
    t = results_table(runs)
    assert list(t.index) == ["zero-shot", "full"]
    assert list(t.columns) == ["legal accuracy", "medical ROUGE-L", "average", "% of full fine-tuning"]
    assert t.loc["full", "average"] == 60.0 and t.loc["full", "% of full fine-tuning"] == 100.0
    png = tmp_path/"r.png"; plot_results(t, png)
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_cli_prints_scores_with_ci(capsys):
    assert main_eval(["--model", "tiny", "--task", "legal", "--limit", "4", "--n-boot", "20"]) == 0
    out = capsys.readouterr().out
    # skewed labels: macro-F1 first
    assert "legal (zero-shot, loglik): macro_f1" in out and ", accuracy " in out and "[" in out


# --- per-label table, confusion plot, collapse warning (the hand-made case of tests/test_metrics.py) ------------------

HAND_LABELS = ["Other", "Arbitration", "Choice of law", "Limitation of liability"]
HAND_REFS = ["Other", "Other", "Other", "Other", "Arbitration", "Arbitration", "Choice of law", "Choice of law"]
HAND_PREDS = ["Other", "Other", "Arbitration", None, "Arbitration", "Other", "Choice of law", "Other"]


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
    run = finetune("tiny", task, method="lora", r=4, max_steps=1, batch_size=4, max_val_examples=4,
                   output_dir=str(tmp_path/"run"))
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
