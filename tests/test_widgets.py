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
