"Wizard logic that a notebook cell cannot hold: a real HTTP teacher and the API key, ipywidgets missing."
import json, os, subprocess, sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
import pytest
from vrnx_nb.tasks import load_task

KEY = "sk-test-wizard-0123456789abcdef"


class _Teacher(BaseHTTPRequestHandler):
    "An OpenAI-compatible /v1/chat/completions that answers with a held-out clause and records the Authorization header."
    seen, pool = [], []
    def log_message(self, *a): pass
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        type(self).seen.append({"auth": self.headers.get("Authorization"), "body": body})
        ex = self.pool[len(self.seen) % len(self.pool)]
        reply = {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                 "choices": [{"index": 0, "finish_reason": "stop",
                              "message": {"role": "assistant", "content": json.dumps({"input": ex.input, "target": ex.target})}}],
                 "usage": {"prompt_tokens": 10, "completion_tokens": 20, "total_tokens": 30}}
        data = json.dumps(reply).encode()
        self.send_response(200); self.send_header("Content-Type", "application/json"); self.send_header("Content-Length", str(len(data)))
        self.end_headers(); self.wfile.write(data)


@pytest.fixture
def teacher_url():
    task = load_task("legal")
    _Teacher.seen, _Teacher.pool = [], task.train[100:140]
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Teacher)
    t = threading.Thread(target=srv.serve_forever, daemon=True); t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1"
    srv.shutdown(); srv.server_close()


def test_api_key_reaches_teacher_but_is_never_kept(teacher_url, tmp_path):
    pytest.importorskip("ipywidgets")
    from vrnx_nb.widgets import AugmentWizard
    task = load_task("legal", n_train=30)
    aw = AugmentWizard(task, teacher="url", base_url=teacher_url, teacher_model="teacher-x", target_count=6, chunk=3,
                       quality_threshold=0.0, cache_path=str(tmp_path/"replies.jsonl"))
    aw.api_key.value = KEY
    aw.run_button.click()
    assert aw.api_key.value == ""                      # blanked at once, before the run ends
    assert aw.wait(60) == "done", aw.state.runner.trace
    assert len(_Teacher.seen) == 6 and {s["auth"] for s in _Teacher.seen} == {f"Bearer {KEY}"}
    assert {s["body"]["model"] for s in _Teacher.seen} == {"teacher-x"}
    assert aw.progress.value == 6 and aw.state.frame().shape[0] == 6
    assert KEY not in os.environ.values() and not any(k.startswith("VRNX_TEACHER_KEY") for k in os.environ)  # one-off variable gone
    assert KEY not in json.dumps(aw.api_key.get_state(), default=str)
    for obj in (aw.state, aw.state.pipeline, aw.state.runner):
        assert KEY not in repr(obj) and KEY not in repr(vars(obj))
    assert KEY not in (tmp_path/"replies.jsonl").read_text()


def test_bad_key_or_dead_endpoint_is_reported_and_key_variable_removed(tmp_path):
    pytest.importorskip("ipywidgets")
    import socket
    from vrnx_nb.widgets import AugmentWizard
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]   # closed again: nothing listens there
    aw = AugmentWizard(load_task("legal", n_train=30), teacher="url", base_url=f"http://127.0.0.1:{port}/v1", target_count=3,
                       cache_path=str(tmp_path/"r.jsonl"), pipeline_kwargs={"connect_timeout": 2.0})
    aw.api_key.value = KEY
    aw.run_button.click()
    assert aw.wait(60) == "error"
    assert "Cannot reach the teacher" in aw.status.value and KEY not in aw.status.value
    assert KEY not in os.environ.values() and aw.api_key.value == ""


def test_states_work_without_ipywidgets_and_wizards_say_what_to_install():
    code = ("import sys; sys.modules['ipywidgets'] = None\n"
            "from vrnx_nb.widgets import TrainState, ResultsState, require_widgets, AugmentWizard\n"
            "s = ResultsState([{'method': 'a', 'task': 'legal', 'score': 0.5}]); print(len(s.table()))\n"
            "try: AugmentWizard('legal')\n"
            "except ImportError as e: print('ERR', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0] == "1"
    assert "ERR The wizards need ipywidgets: `pip install ipywidgets`" in out.stdout


def test_train_state_export_step(tmp_path):
    "The wizard's export step: refused before training, then a gptq folder calibrated on the state's task, in the background."
    from vrnx_nb.widgets import TrainState
    from vrnx_nb.deploy import read_export
    task = load_task("legal", n_train=16)
    st = TrainState("tiny", task, method="lora", r=4, epochs=1, output_dir=str(tmp_path/"run"),
                    finetune_kwargs=dict(max_steps=2, batch_size=4, max_val_examples=4))
    with pytest.raises(ValueError, match="no finished run"): st.start_export("gptq")
    st.run()
    with pytest.raises(ValueError, match="format: expected one of"): st.start_export("gguf")
    st.start_export("gptq", n_calibration=4)
    assert st.exporter.wait(120) == "done", st.exporter.error
    assert st.exported.output_dir == str(tmp_path/"run") + "-gptq"
    info = read_export(st.exported.output_dir)
    assert (info["format"], info["quantization"]["n_calibration"], info["task"]) == ("gptq", 4, "legal")
    st.start_export("gptq"); st.exporter.wait(60)   # the folder exists now: the thread reports the error
    assert st.exporter.status == "error" and "already exists" in st.exporter.error


# --- label balancing, calibration and the per-label dashboard (issue 14) ---

def _balanced_task():
    "A small classification task whose two labels are equally common."
    from vrnx_nb.tasks import make_task
    rows = [{"input": f"clause {i} about {t}", "target": t} for i, t in enumerate(["fees", "courts"]*20)]
    return make_task("toy", rows, "classification", "Which topic?", val_size=8, test_size=8)


def test_strategy_state_balances_a_skewed_task_only():
    from vrnx_nb.widgets import StrategyState
    legal = load_task("legal", n_train=40)
    st = StrategyState(n_examples=40, gpu="CPU only", task="legal")   # a bundled name is loaded
    test_counts = dict(load_task("legal").label_counts("train"))
    assert st.label_counts() == test_counts and st.task.name == "legal"
    assert st.strategy.balance == "oversample"
    html = st.summary_html()
    assert "<td>balance</td><td><b>oversample</b></td>" in html and "Skewed labels: &#x27;Other&#x27; is" in html
    assert st.strategy.finetune_kwargs()["balance"] == "oversample"
    st.task = _balanced_task(); st.update()
    assert st.strategy.balance is None and "<td>balance</td><td><b>off</b></td>" in st.summary_html()
    assert any("Labels balanced enough" in r for r in st.strategy.reasons)
    st.task = load_task("medical"); st.update()    # not classification: no label counts, no balancing line
    assert st.label_counts() is None and st.strategy.balance is None
    assert not any("label" in r.lower() and "balanc" in r.lower() for r in st.strategy.reasons)
    assert StrategyState(40, "CPU only").strategy.balance is None                 # no task: as before
    assert StrategyState(40, "CPU only", task=legal).label_counts()["Other"] == legal.label_counts()["Other"]


class _FakeResult:
    def __init__(self, output_dir): self.output_dir, self.history, self.global_step = output_dir, [], 1


def _record_finetune(monkeypatch, tmp_path):
    "Replace `finetune` by a recorder; the list of its calls' keyword arguments."
    import vrnx_nb.training
    calls = []
    def fake(model, task, **kw):
        calls.append(kw); return _FakeResult(str(tmp_path/f"run{len(calls)}"))
    monkeypatch.setattr(vrnx_nb.training, "finetune", fake)
    return calls


def test_train_balance_defaults_from_a_skewed_strategy_and_reaches_finetune(monkeypatch, tmp_path):
    from vrnx_nb.widgets import TrainState, StrategyState
    calls = _record_finetune(monkeypatch, tmp_path)
    legal = load_task("legal", n_train=40)
    skewed = StrategyState(40, "CPU only", task=legal).strategy
    ts = TrainState.from_strategy(skewed, model="tiny", task=legal)
    assert ts.balance == "oversample" and "balance" not in ts.finetune_kwargs
    ts.run()
    assert calls[-1]["balance"] == "oversample" and calls[-1]["method"] == skewed.method
    plain = TrainState.from_strategy(StrategyState(40, "CPU only", task=_balanced_task()).strategy, model="tiny", task=legal)
    plain.run()
    assert plain.balance is None and calls[-1]["balance"] is None
    moved = TrainState("tiny", legal, finetune_kwargs={"balance": "weight", "max_steps": 1})  # given in the dict: one value
    moved.run()
    assert moved.balance == "weight" and calls[-1]["balance"] == "weight" and calls[-1]["max_steps"] == 1
    with pytest.raises(ValueError, match="balance given twice"):
        TrainState("tiny", legal, balance="oversample", finetune_kwargs={"balance": "weight"})
    with pytest.raises(ValueError, match="balance must be None or one of"): TrainState("tiny", legal, balance="smote").check()
    with pytest.raises(ValueError, match="needs a classification task; 'medical' is summarization"):
        TrainState("tiny", "medical", balance="weight").check()
    with pytest.raises(ValueError, match="calibrate_after needs a classification task; 'finance' is qa"):
        TrainState("tiny", "finance", calibrate_after=True).check()
    n = len(calls)
    with pytest.raises(ValueError, match="calibrate_limit must be"):
        TrainState("tiny", legal, calibrate_after=True, calibrate_limit=0).run()
    assert len(calls) == n   # refused before training


def test_train_wizard_balance_dropdown_and_calibrate_checkbox(monkeypatch, tmp_path):
    pytest.importorskip("ipywidgets")
    from vrnx_nb.widgets import TrainWizard, StrategyWizard
    import vrnx_nb.calibration
    calls = _record_finetune(monkeypatch, tmp_path)
    cals = []
    monkeypatch.setattr(vrnx_nb.calibration, "calibrate", lambda res, task, limit=None: cals.append((res, task.name, limit)))
    legal = load_task("legal", n_train=40)
    sw = StrategyWizard(40, "CPU only", task=legal)
    tw = TrainWizard(sw, model="tiny", task=legal, calibrate_limit=16)
    assert tw.balance.value == "oversample" and tw.balance.options == ("none", "oversample", "weight")
    assert tw.calibrate_after.value is False and tw.calibrate_after.layout.display is None
    tw.balance.value, tw.calibrate_after.value = "weight", True
    tw.run_button.click()
    assert tw.wait(30) == "done", tw.state.runner.trace
    assert calls[-1]["balance"] == "weight" and cals == [(tw.state.result, "legal", 16)]
    tw.balance.value, tw.calibrate_after.value = "none", False
    tw.run_button.click(); tw.wait(30)
    assert calls[-1]["balance"] is None and len(cals) == 1
    tw.balance.value, tw.calibrate_after.value = "oversample", True
    tw.task.value = "medical"                      # summarization: both controls hidden and off
    assert tw.balance.layout.display == "none" and tw.calibrate_after.layout.display == "none"
    tw.run_button.click(); tw.wait(30)
    assert calls[-1]["balance"] is None and len(cals) == 1, tw.status.value
    tw.task.value = "legal"
    assert tw.balance.layout.display is None
    sw.state.task = _balanced_task(); sw.state.update(); tw.fill_from_strategy()   # "from strategy" follows the plan
    assert tw.balance.value == "none"


def test_train_state_real_tiny_run_balances_and_saves_calibration(tmp_path):
    "A real 1-step run of the tiny model: the balance reaches the run's config, calibration.json is written and read back."
    from vrnx_nb.widgets import TrainState
    from vrnx_nb.calibration import load_calibration
    task = load_task("legal", n_train=16)
    ts = TrainState("tiny", task, method="lora", r=4, epochs=1, output_dir=str(tmp_path/"run"), balance="weight",
                    calibrate_after=True, calibrate_limit=24,
                    finetune_kwargs=dict(max_steps=1, batch_size=4, max_val_examples=4))
    phases = []
    ts.on_update = lambda s: phases.append(s.phase)
    ts.run()
    assert ts.result.config["balance"] == "weight"
    assert "calibrating" in phases
    cal = load_calibration(ts.result.output_dir)
    assert cal is not None and cal == ts.calibration
    assert (cal.n, cal.split, cal.labels) == (24, "val", task.labels)
    assert cal.fitted_macro_f1 >= cal.argmax_macro_f1


def _collapsed_scores(method="collapsed"):
    "Classification Scores built by hand from predictions that are all 'Other' (as a collapsed model gives)."
    from vrnx_nb.evaluation import Scores, classification_metrics, collapse_warning
    refs = ["Other"]*17 + ["Arbitration"]*2 + ["Jurisdiction"]
    preds = ["Other"]*17 + ["Arbitration", "Other", "Other"]   # one Arbitration right, the other and Jurisdiction missed
    m = classification_metrics(preds, refs, labels=["Other", "Arbitration", "Jurisdiction"])
    w = collapse_warning(preds, refs)
    assert w is not None
    return Scores("legal", "classification", "accuracy", m["metrics"], m["ci"], len(refs), m["unmatched"], method=method,
                  per_label=m["per_label"], confusion=m["confusion"], labels=m["labels"], warnings=[w])


def test_results_state_warnings_and_per_label_view():
    import matplotlib.pyplot as plt
    from vrnx_nb.widgets import ResultsState, WARN_COLOR
    s = _collapsed_scores()
    summ = {"method": "zero-shot", "task": "medical", "score": 0.2}
    rs = ResultsState([summ, s])
    assert rs.per_label_runs() == ["collapsed · legal"] and rs.detail == "collapsed · legal"
    assert rs.warnings() == [("collapsed · legal", s.warnings[0])]
    html = rs.warnings_html()
    assert f"color:{WARN_COLOR}" in html and "predicts &#x27;Other&#x27; for 95% of the test examples (19 of 20)" in html
    tab = rs.per_label_table()
    assert list(tab.label) == ["Other", "Arbitration", "Jurisdiction"]
    assert tab.set_index("label").loc["Jurisdiction", ["support", "predicted", "recall"]].tolist() == [1, 0, 0.0]
    before = plt.get_fignums()
    fig = rs.plot_confusion(normalize=False)
    assert plt.get_fignums() == before                 # closed in pyplot: no second copy under the cell
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["Other", "Arbitration", "Jurisdiction"]
    # Other->Other 17; Arbitration: 1 right, 1 -> Other; Jurisdiction -> Other 1
    assert sorted(t.get_text() for t in ax.texts if t.get_text()) == ["1", "1", "1", "17"]
    rs.selected = ["zero-shot · medical"]
    assert rs.warnings() == [] and rs.warnings_html() == ""
    rs.add(s.to_dict(), name="as a dict")               # a run read back from JSON keeps its per-label view
    assert rs.detail == "as a dict · legal" and len(rs.warnings()) == 1
    with pytest.raises(ValueError, match="has no per-label scores"): rs.detail_run("zero-shot · medical")
    with pytest.raises(ValueError, match="no run with per-label scores"): ResultsState([summ]).per_label_table()


def test_dashboard_shows_warning_confusion_and_per_label_table():
    pytest.importorskip("ipywidgets")
    from vrnx_nb.widgets import ResultsDashboard
    d = ResultsDashboard([{"method": "zero-shot", "task": "medical", "score": 0.2}])
    assert d.warnings.value == "" and d.detail_box.layout.display == "none" and d.confusion.value == b""
    d.add(_collapsed_scores())
    assert "predicts &#x27;Other&#x27; for 95%" in d.warnings.value and "#d35400" in d.warnings.value
    assert d.detail_box.layout.display is None and d.confusion.value[:4] == b"\x89PNG"
    assert d.detail.options == ("collapsed · legal",) and d.detail.value == "collapsed · legal"
    assert "<td>Jurisdiction</td>" in d.per_label.value and "<td>0.89</td>" in d.per_label.value  # precision of Other: 17/19
    raw = d.confusion.value
    d.normalize.value = False
    assert d.confusion.value[:4] == b"\x89PNG" and d.confusion.value != raw
    d.add(_collapsed_scores("second"))
    assert d.detail.value == "second · legal" and d.state.detail == "second · legal"
    d.detail.value = "collapsed · legal"
    assert d.state.detail == "collapsed · legal"
    d.pick.value = ("zero-shot · medical",)
    assert d.warnings.value == ""                       # warnings follow the picked runs
    assert set(d.state.selected) == {"zero-shot · medical"}


def test_augment_state_leaves_the_quality_threshold_to_the_pipeline(tmp_path):
    "Unset, the wizard's pipeline calibrates its quality threshold on the seeds; the form's share of seeds passing goes through."
    from contextlib import ExitStack
    from vrnx_nb.augmentation import SyntheticPipeline
    from vrnx_nb.checks import default_of
    from vrnx_nb.widgets import AugmentState
    st = AugmentState(load_task("legal", n_train=16), teacher="callable", teacher_fn=lambda messages, request: "x",
                      cache_path=str(tmp_path/"replies.jsonl"))
    with ExitStack() as stack: pipe = st._pipeline(stack, None)
    assert pipe.quality_threshold is None
    assert pipe.quality_real_pass == default_of(SyntheticPipeline, "quality_real_pass")
    st.quality_real_pass = 0.8
    with ExitStack() as stack: assert st._pipeline(stack, None).quality_real_pass == 0.8
