"""Synthetic data augmentation against real servers: `transformers serve` (tiny model) on loopback, a fault-injecting
proxy in front of it (HTTP 500s, delay, concurrency and request counting), kill-and-resume, bad input.
The server lifecycle itself (no orphans) is tested in test_serving.py."""
import json, os, shutil, signal, subprocess, sys, textwrap, threading, time, urllib.request
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from vrnx_nb.tasks import Example, load_task
from vrnx_nb.augmentation import SyntheticPipeline, TeacherError, main_augment, ReplyCache
from vrnx_nb.serving import free_port, local_teacher

SERVER_ENV = {"OMP_NUM_THREADS": "1"}


class Proxy:
    "Loopback proxy to an OpenAI-compatible server: fails the first `fail_first` POSTs with `status`, delays, counts."
    def __init__(self, upstream:str, fail_first:int=0, status:int=500, delay:float=0.0):
        self.upstream, self.fail_left, self.status, self.delay = upstream.rstrip("/"), fail_first, status, delay
        self.posts = self.failed = self.forwarded = self.inflight = self.max_inflight = 0
        self.auth = set()
        self.lock = threading.Lock()
        proxy = self
        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a): pass
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with proxy.lock:
                    proxy.posts += 1; proxy.inflight += 1; proxy.max_inflight = max(proxy.max_inflight, proxy.inflight)
                    proxy.auth.add(self.headers.get("Authorization", ""))
                    fail = proxy.fail_left > 0
                    if fail: proxy.fail_left -= 1; proxy.failed += 1
                try:
                    if fail: return self._send(proxy.status, b'{"error": {"message": "injected failure", "type": "server_error"}}')
                    time.sleep(proxy.delay)
                    req = urllib.request.Request(proxy.upstream + self.path.removeprefix("/v1"), data=body, method="POST",
                                                 headers={"Content-Type": "application/json"})
                    with urllib.request.urlopen(req, timeout=120) as r: status, data = r.status, r.read()
                    with proxy.lock: proxy.forwarded += 1
                    self._send(status, data)
                finally:
                    with proxy.lock: proxy.inflight -= 1
            def _send(self, status, data):
                self.send_response(status); self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data))); self.end_headers(); self.wfile.write(data)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler); self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True); self.thread.start()

    @property
    def url(self): return f"http://127.0.0.1:{self.server.server_address[1]}/v1"
    def close(self): self.server.shutdown(); self.server.server_close()


from test_serving import wait_dead  # the process helpers live with the serving tests (pytest puts tests/ on the path)


@pytest.fixture(scope="module")
def legal():
    return load_task("legal", n_train=30, seed=0)


@pytest.fixture(scope="module")
def server():
    with local_teacher("tiny", env=SERVER_ENV) as ep:
        yield ep
    assert wait_dead(ep.pid), "server still running after local_teacher exited"


def pipe_for(ep, url, **kw):
    kw.setdefault("max_tokens", 8); kw.setdefault("concurrency", 4); kw.setdefault("backoff", 0.05)
    kw.setdefault("price_per_1k_prompt", 0.001); kw.setdefault("price_per_1k_completion", 0.002)
    return SyntheticPipeline(teacher_model=ep.model, base_url=url, **kw)


# ---------------------------------------------------------------- real server: HTTP path, concurrency, retries, cache

def test_http_path_concurrency_and_retry(server, legal, tmp_path, monkeypatch):
    proxy = Proxy(server.base_url, fail_first=2, status=500, delay=0.3)
    try:
        monkeypatch.setenv("VRNX_TEST_KEY", "sk-test-SECRET-123456")
        pipe = pipe_for(server, proxy.url, cache_path=str(tmp_path/"replies.jsonl"), api_key_env="VRNX_TEST_KEY")
        syn = pipe.generate(legal.train, 8, "Classify Terms of Service clauses", task=legal)
        u = pipe.usage
        assert (u.requests, u.calls, u.cached, u.failed) == (8, 8, 0, 0)
        assert u.retries >= 2 and proxy.failed == 2          # both 500s were retried, none lost
        assert proxy.forwarded == 8                           # every request reached the model once
        assert 2 <= proxy.max_inflight <= 4                   # concurrent, and bounded by `concurrency`
        assert u.prompt_tokens > 0 and u.completion_tokens > 0
        assert u.cost == pytest.approx(u.prompt_tokens/1000*0.001 + u.completion_tokens/1000*0.002)
        kept = pipe.filter(syn)
        rep = pipe.report()
        # every request is accounted for: kept, or rejected with a stage and a reason
        assert int(rep.table["count"].sum()) + len(kept) == 8
        assert all(r["stage"] and r["reason"] for r in pipe.rejected)
        # the key was sent (read from the environment at call time) but is stored nowhere
        assert "Bearer sk-test-SECRET-123456" in proxy.auth
        assert "SECRET" not in (tmp_path/"replies.jsonl").read_text()
        assert "SECRET" not in repr(pipe) and "SECRET" not in repr(rep) and "SECRET" not in str(vars(pipe))
        assert len((tmp_path/"replies.jsonl").read_text().splitlines()) == 8
    finally: proxy.close()


def test_rerun_with_cache_costs_nothing(server, legal, tmp_path):
    proxy = Proxy(server.base_url)
    try:
        cache = str(tmp_path/"replies.jsonl")
        first = pipe_for(server, proxy.url, cache_path=cache)
        a = first.generate(legal.train, 6, "Classify Terms of Service clauses", task=legal)
        assert (first.usage.calls, proxy.posts) == (6, 6)
        again = pipe_for(server, proxy.url, cache_path=cache)
        b = again.generate(legal.train, 6, "Classify Terms of Service clauses", task=legal)
        assert (again.usage.calls, again.usage.cached, again.usage.cost, proxy.posts) == (0, 6, 0.0, 6)
        assert [e.input for e in a] == [e.input for e in b]
        assert [r["reason"] for r in first.rejected] == [r["reason"] for r in again.rejected]
        other_seed = pipe_for(server, proxy.url, cache_path=cache, seed=1)
        other_seed.generate(legal.train, 6, "Classify Terms of Service clauses", task=legal)
        assert other_seed.usage.calls == 6 and proxy.posts == 12
    finally: proxy.close()


RUNNER = textwrap.dedent("""
    import sys
    from vrnx_nb.tasks import load_task
    from vrnx_nb.augmentation import SyntheticPipeline
    url, model, cache, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    legal = load_task("legal", n_train=30, seed=0)
    pipe = SyntheticPipeline(teacher_model=model, base_url=url, cache_path=cache, concurrency=1, max_tokens=8)
    pipe.generate(legal.train, n, "Classify Terms of Service clauses", task=legal)
    print("finished", pipe.usage.calls)
""")


def test_killed_run_resumes_without_paying_twice(server, legal, tmp_path):
    proxy = Proxy(server.base_url, delay=0.4)
    cache, n = tmp_path/"replies.jsonl", 12
    try:
        proc = subprocess.Popen([sys.executable, "-c", RUNNER, proxy.url, server.model, str(cache), str(n)],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.time() + 90
        while time.time() < deadline and (not cache.exists() or len(cache.read_text().splitlines()) < 3):
            assert proc.poll() is None, proc.stdout.read().decode()
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL); proc.wait(10)
        done = len(ReplyCache(cache))
        assert 3 <= done < n, done
        paid_before = proxy.forwarded
        resumed = pipe_for(server, proxy.url, cache_path=str(cache), concurrency=1)
        resumed.generate(legal.train, n, "Classify Terms of Service clauses", task=legal)
        assert resumed.usage.cached == done and resumed.usage.calls == n - done
        # at most the one request in flight at the moment of the kill was paid twice
        assert proxy.forwarded <= n + 1, (proxy.forwarded, paid_before)
        third = pipe_for(server, proxy.url, cache_path=str(cache), concurrency=1)
        before = proxy.posts
        third.generate(legal.train, n, "Classify Terms of Service clauses", task=legal)
        assert third.usage.calls == 0 and proxy.posts == before
    finally: proxy.close()


def test_cli_against_endpoint(server, tmp_path, capsys):
    out = tmp_path/"kept.jsonl"
    rc = main_augment(["--task", "legal", "--n-seed", "20", "--target-count", "4", "--base-url", server.base_url,
                       "--teacher-model", server.model, "--max-tokens", "8", "--cache", str(tmp_path/"c.jsonl"), "--out", str(out)])
    assert rc == 0 and out.exists()
    text = capsys.readouterr().out
    assert "Generated:" in text and "overall (kept / requested)" in text


# ---------------------------------------------------------------- bad input

def test_unreachable_endpoint_fails_fast(legal):
    port = free_port()   # nothing listens there
    pipe = SyntheticPipeline(teacher_model="m", base_url=f"http://127.0.0.1:{port}/v1", max_retries=2, cache_path=False)
    t0 = time.time()
    with pytest.raises(TeacherError, match="Cannot reach the teacher"):
        pipe.generate(legal.train, 3, "x", task=legal)
    assert time.time() - t0 < 10


def test_silent_endpoint_fails_within_bounded_time(legal):
    import socket
    sock = socket.socket(); sock.bind(("127.0.0.1", 0)); sock.listen(16)   # accepts connections, never answers
    try:
        pipe = SyntheticPipeline(teacher_model="m", base_url=f"http://127.0.0.1:{sock.getsockname()[1]}/v1",
                                 timeout=1.0, max_retries=1, backoff=0.1, cache_path=False)
        t0 = time.time()
        with pytest.raises(TeacherError, match="No reply from the teacher"):
            pipe.generate(legal.train, 4, "x", task=legal)
        assert time.time() - t0 < 15
    finally: sock.close()


def test_missing_api_key_for_openai(legal, monkeypatch):
    monkeypatch.delenv("VRNX_NO_SUCH_KEY", raising=False)
    pipe = SyntheticPipeline(api_key_env="VRNX_NO_SUCH_KEY", cache_path=False, connect_timeout=0.5)
    with pytest.raises(ValueError, match="set the environment variable VRNX_NO_SUCH_KEY"):
        pipe.generate(legal.train, 2, "x", task=legal)


@pytest.mark.parametrize("kw, msg", [
    (dict(quality_threshold=1.2), "SyntheticPipeline.quality_threshold: expected a number in [0, 1] or None, got 1.2"),
    (dict(quality_threshold=-0.01), "SyntheticPipeline.quality_threshold: expected a number in [0, 1] or None, got -0.01"),
    (dict(diversity_weight=2), "SyntheticPipeline.diversity_weight: expected a number in [0, 1], got 2"),
    (dict(diversity_weight=float("nan")), "SyntheticPipeline.diversity_weight: expected a number in [0, 1], got nan"),
    (dict(concurrency=0), "SyntheticPipeline.concurrency: expected a positive integer, got 0"),
    (dict(max_retries=-1), "SyntheticPipeline.max_retries: expected an integer >= 0, got -1"),
    (dict(timeout=0), "SyntheticPipeline.timeout: expected a positive number, got 0"),
    (dict(base_url="localhost:8000"), "SyntheticPipeline.base_url: expected a URL starting with http:// or https:// or None, got 'localhost:8000'"),
    (dict(api_key_env="sk-live-abcdef"), "SyntheticPipeline.api_key_env: expected the NAME of an environment variable"),
    (dict(teacher_model=""), "SyntheticPipeline.teacher_model: expected a non-empty model name"),
    (dict(price_per_1k_prompt=-1), "SyntheticPipeline.price_per_1k_prompt: expected a number >= 0, got -1"),
    (dict(classifier_threshold=0), "SyntheticPipeline.classifier_threshold: expected a number in (0, 1] or None, got 0"),
    (dict(classifier_threshold=1.5), "SyntheticPipeline.classifier_threshold: expected a number in (0, 1] or None, got 1.5"),
    (dict(adapt="yes"), "SyntheticPipeline.adapt: expected one of [True, False], got 'yes'"),
    (dict(adapt=True), "SyntheticPipeline.adapt: expected False unless teacher_model is a base model to tune here"),
    (dict(adapt_config={"max_steps": 2}), "SyntheticPipeline.adapt_config: expected an AdaptConfig or None, got {'max_steps': 2}"),
    (dict(adapt_cache=""), "SyntheticPipeline.adapt_cache: expected a folder path or None, got ''"),
    (dict(classifier_model=42), "SyntheticPipeline.classifier_model: expected None, a model alias or folder"),
])
def test_bad_config(kw, msg):
    with pytest.raises(ValueError) as e: SyntheticPipeline(**kw)
    assert msg in str(e.value)
    assert "sk-live-abcdef" not in str(e.value)


def fake(messages, request): return json.dumps({"input": "a new clause about the service terms .", "target": "Other"})


@pytest.mark.parametrize("seeds, count, msg", [
    ([], 5, "seed_examples is empty"),
    (None, 5, "seed_examples is empty"),
    ([{"input": "only an input"}], 5, "missing field(s) ['target']"),
    ([{"text": "x", "label": "Other"}], 5, "missing field(s) ['input', 'target']"),
    ([Example("   ", "Other")], 5, "field 'input' is empty"),
    ([Example("a clause", "Not a label")], 5, "not in the task's label set"),
    ([Example("a clause", "Other")], 0, "target_count must be an integer >= 1"),
    ([Example("a clause", "Other")], -3, "target_count must be an integer >= 1"),
    ([Example("a clause", "Other")], 2.5, "target_count must be an integer >= 1"),
])
def test_bad_input(legal, seeds, count, msg):
    pipe = SyntheticPipeline(teacher=fake, teacher_model="fake")
    with pytest.raises(ValueError) as e: pipe.generate(seeds, count, "Classify clauses", task=legal)
    assert msg in str(e.value)


def test_malformed_replies_are_recorded_not_raised(legal):
    replies = ['{"input": "cut', "no json here", '{"input": 3, "target": {"a": 1}}', "", '```json\n{"text": "the clause .", "label": "Other"}\n```']
    pipe = SyntheticPipeline(teacher=lambda m, r: replies[r["index"] % len(replies)], teacher_model="fake")
    syn = pipe.generate(legal.train, 10, "Classify clauses", task=legal)
    assert len(syn) == 2
    reasons = sorted(r["reason"] for r in pipe.rejected)
    assert reasons == sorted(["unterminated_json", "no_json", "target_not_text", "empty_reply"]*2)


# ---------------------------------------------------------------- an endpoint that is not the API

class NotTheAPI:
    "Loopback server that answers every POST with HTTP 200 and `body` (a web page, plain text, another API's JSON)."
    def __init__(self, body:bytes, content_type:str):
        self.posts = 0
        outer = self
        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a): pass
            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                outer.posts += 1
                self.send_response(200); self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body))); self.end_headers(); self.wfile.write(body)
        class Quiet(ThreadingHTTPServer):
            daemon_threads = True
            def handle_error(self, request, client_address): pass
        self.server = Quiet(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
    @property
    def url(self): return f"http://127.0.0.1:{self.server.server_address[1]}"
    def close(self): self.server.shutdown(); self.server.server_close()


PAGE = (b"<!DOCTYPE html>\n<html><head><title>Grafana</title></head><body><div id='app'>Loading</div>"
        + b"<p>" + b"lorem ipsum " * 80 + b"</p></body></html>")


@pytest.mark.parametrize("body, ctype, what", [
    (PAGE, "text/html", "a web page (HTML)"),
    (b"Not Found: try /api/v2", "text/plain", "something that is not a chat completion"),
    (b'{"model": "llama3", "message": {"role": "assistant", "content": "hi"}, "done": true}', "application/json",
     "something that is not a chat completion"),
])
def test_endpoint_that_is_not_the_api_stops_with_a_teacher_error(legal, body, ctype, what):
    srv = NotTheAPI(body, ctype)
    try:
        pipe = SyntheticPipeline(teacher_model="m", base_url=srv.url, concurrency=2, cache_path=False, max_retries=3)
        t0 = time.time()
        with pytest.raises(TeacherError) as e: pipe.generate(legal.train, 8, "Classify clauses", task=legal)
        msg = str(e.value)
        assert what in msg and "Check base_url" in msg and srv.url in msg
        squeeze = lambda t: "".join(t.split())
        assert squeeze(body.decode())[:50] in squeeze(msg)   # what came back, quoted
        assert len(msg) < 650 and "</body>" not in msg         # but only its start (about 200 characters)
        assert "AttributeError" not in msg
        assert srv.posts <= 2 and time.time() - t0 < 10  # the first reply stops the run: no retries, no more requests
    finally: srv.close()


# ---------------------------------------------------------------- the in-process teacher (tiny model)

from vrnx_nb.augmentation import LocalTeacher, build_label_request, profile_seeds


@pytest.fixture(scope="module")
def tiny_teacher():
    return LocalTeacher("tiny", device="cpu", threads=1)


@pytest.fixture
def no_http(monkeypatch):
    "Any use of the HTTP client path fails the test."
    import vrnx_nb.augmentation as aug
    def boom(*a, **k): raise AssertionError("the local teacher must not use HTTP")
    monkeypatch.setattr(aug, "_import_openai", boom); monkeypatch.setattr(aug, "_check_reachable", boom)


def replies(path) -> dict:
    return {r["key"]: r["reply"] for r in map(json.loads, Path(path).read_text().splitlines())}


def test_local_teacher_label_mode_caches_and_resumes_with_the_same_replies(legal, tiny_teacher, tmp_path, no_http):
    full = tmp_path/"full.jsonl"
    pipe = SyntheticPipeline(teacher_model=tiny_teacher, cache_path=str(full), max_tokens=10, concurrency=4)
    assert pipe.local and pipe._mode("classification") == "label"
    syn = pipe.generate(legal.train, 8, task=legal)
    assert (pipe.usage.requests, pipe.usage.calls, pipe.usage.cost) == (8, 8, 0.0)
    assert syn and all(e.target == e.meta["asked_label"] and e.meta["mode"] == "label" for e in syn)
    assert len(replies(full)) == 8
    # a run killed after 3 replies, resumed at another batch size, ends with exactly the same replies
    killed = tmp_path/"killed.jsonl"
    killed.write_text("\n".join(full.read_text().splitlines()[:3]) + "\n")
    resumed = SyntheticPipeline(teacher_model=tiny_teacher, cache_path=str(killed), max_tokens=10, concurrency=3)
    again = resumed.generate(legal.train, 8, task=legal)
    assert (resumed.usage.cached, resumed.usage.calls) == (3, 5)
    assert replies(killed) == replies(full)
    assert [(e.input, e.target) for e in again] == [(e.input, e.target) for e in syn]
    # a rerun pays nothing; another seed asks new requests
    third = SyntheticPipeline(teacher_model=tiny_teacher, cache_path=str(full), max_tokens=10, concurrency=8)
    third.generate(legal.train, 8, task=legal)
    assert (third.usage.calls, third.usage.cached) == (0, 8)
    other = SyntheticPipeline(teacher_model=tiny_teacher, cache_path=str(full), max_tokens=10, seed=1)
    other.generate(legal.train, 8, task=legal)
    assert other.usage.calls == 8


def test_label_mode_asks_for_rare_labels_and_fixes_the_label(legal):
    prof = profile_seeds(legal.train, legal)
    asked = Counter(build_label_request(prof, legal.train, i, seed=3)["target_label"] for i in range(400))
    assert asked["Other"]/400 < 0.5 * prof.labels["Other"]/prof.n
    assert {l for l, c in prof.labels.items() if c} <= set(asked)
    # the label of an example is the one asked for, whatever the teacher writes
    pipe = SyntheticPipeline(teacher=lambda m, r: 'Label: Arbitration\nText: "we may change these terms ."', teacher_model="fake", mode="label")
    syn = pipe.generate(legal.train, 12, "Classify clauses", task=legal)
    assert len(syn) == 12 and all(e.target == e.meta["asked_label"] for e in syn)
    assert {e.target for e in syn} != {"Arbitration"}


def recording(teacher, seen:list):
    "Wrap `teacher.complete` to keep every conversation it is asked."
    real = teacher.complete
    def complete(conversations, seeds, **kw):
        seen.extend(conversations); return real(conversations, seeds, **kw)
    return complete


def test_two_step_summarization_asks_the_target_of_each_new_input(tiny_teacher, monkeypatch, no_http):
    med = load_task("medical", n_train=20, seed=0)
    seen = []
    monkeypatch.setattr(tiny_teacher, "complete", recording(tiny_teacher, seen))
    pipe = SyntheticPipeline(teacher_model=tiny_teacher, cache_path=False, max_tokens=10, concurrency=4)
    assert pipe._mode("summarization") == "two_step"
    syn = pipe.generate(med.train, 4, task=med)
    n_inputs = 4 - sum(not r["reason"].startswith("target_") for r in pipe.rejected)
    assert n_inputs >= 1 and pipe.usage.requests == 4 + n_inputs == len(seen)
    asked_targets = [c[-1]["content"] for c in seen if c[-1]["content"].startswith(med.instruction)]
    assert len(asked_targets) == n_inputs
    for e in syn:
        assert f"{med.instruction}\n\n{e.input}" in asked_targets    # its target was asked for its own input
        assert e.meta["mode"] == "two_step" and e.target.strip()


def test_two_step_qa_keeps_a_seed_context(tiny_teacher, monkeypatch, no_http):
    fin = load_task("finance", n_train=12, seed=0)
    from vrnx_nb.augmentation import split_question
    contexts = {split_question(e.input)[0] for e in fin.train}
    seen = []
    monkeypatch.setattr(tiny_teacher, "complete", recording(tiny_teacher, seen))
    pipe = SyntheticPipeline(teacher_model=tiny_teacher, cache_path=False, max_tokens=8, concurrency=3)
    syn = pipe.generate(fin.train, 3, task=fin)
    assert syn, pipe.rejected
    for e in syn:
        ctx, q = split_question(e.input)
        assert ctx in contexts and q                                   # a seed's table and paragraphs, a new question
        assert any(c[-1]["content"] == f"{fin.instruction}\n\nQuestion: {q}" and ctx in c[0]["content"] for c in seen)


def test_trained_run_as_teacher(legal, tmp_path, no_http):
    from vrnx_nb.training import finetune
    run = finetune("tiny", legal, method="lora", max_steps=1, output_dir=str(tmp_path/"run"), device="cpu")
    pipe = SyntheticPipeline(teacher_model=run, cache_path=str(tmp_path/"c.jsonl"), max_tokens=6, concurrency=2)
    assert pipe.local and pipe.teacher_name == str(Path(run.output_dir).absolute())
    syn = pipe.generate(legal.train, 2, task=legal)
    assert pipe.usage.calls == 2 and all(e.meta["teacher"] == pipe.teacher_name for e in syn)
    type_name = type(pipe.local_teacher().model).__name__
    assert "Peft" in type_name, type_name                             # the adapter is loaded, not the bare base model
    # another run folder is another teacher: nothing from this one's cache is reused
    shutil.copytree(run.output_dir, tmp_path/"run2")
    other = SyntheticPipeline(teacher_model=str(tmp_path/"run2"), cache_path=str(tmp_path/"c.jsonl"), max_tokens=6, concurrency=2)
    other.generate(legal.train, 2, task=legal)
    assert other.local and (other.usage.cached, other.usage.calls) == (0, 2)


@pytest.mark.parametrize("kw, msg", [
    (dict(mode="free text"), "SyntheticPipeline.mode: expected one of ['json', 'label', 'two_step'] or None, got 'free text'"),
    (dict(top_p=0), "SyntheticPipeline.top_p: expected a number in (0, 1], got 0"),
    (dict(top_p=1.5), "SyntheticPipeline.top_p: expected a number in (0, 1], got 1.5"),
    (dict(teacher_model=42), "SyntheticPipeline.teacher_model: expected a non-empty model name"),
    (dict(teacher_model="tiny", base_url="http://127.0.0.1:9/v1", adapt=True), "SyntheticPipeline.adapt: expected False unless"),
])
def test_bad_local_config(kw, msg):
    with pytest.raises(ValueError) as e: SyntheticPipeline(**kw)
    assert msg in str(e.value)


def test_mode_that_does_not_fit_the_task(legal, tiny_teacher):
    med = load_task("medical", n_train=10, seed=0)
    with pytest.raises(ValueError, match="mode 'label' is for classification tasks; this one is 'summarization'"):
        SyntheticPipeline(teacher_model=tiny_teacher, mode="label", cache_path=False).generate(med.train, 2, task=med)
    with pytest.raises(ValueError, match="'two_step' is for summarization and QA"):
        SyntheticPipeline(teacher_model=tiny_teacher, mode="two_step", cache_path=False).generate(legal.train, 2, task=legal)
    # endpoints keep asking for JSON unless told otherwise
    assert SyntheticPipeline(teacher_model="m", base_url="http://127.0.0.1:1/v1")._mode("classification") == "json"


# ---------------------------------------------------------------- structured outputs: response_format, xgrammar

import warnings
import vrnx_nb.augmentation as aug
from vrnx_nb.augmentation import reply_errors, task_schema, SUPPORT_FILE


class ChatServer:
    "Loopback chat-completions endpoint. `accept`: a reply that matches the schema it is sent; `refuse`: HTTP 400 to "
    "response_format; `ignore`: takes it and answers plain text. Keeps every request body."
    def __init__(self, behaviour:str):
        self.behaviour, self.bodies = behaviour, []
        outer = self
        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a): pass
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                outer.bodies.append(body)
                rf, n = body.get("response_format"), len(outer.bodies)
                if rf and outer.behaviour == "refuse":
                    return self._send(400, {"error": {"message": "Unrecognized request argument supplied: response_format",
                                                      "type": "invalid_request_error"}})
                if rf and outer.behaviour == "accept":
                    props = rf["json_schema"]["schema"]["properties"]
                    text = json.dumps({k: p["enum"][n % len(p["enum"])] if "enum" in p else f"we may close account {n} at any time ."
                                       for k, p in props.items()})
                elif outer.behaviour == "ignore": text = f"Sure! Here is a clause: we may close account {n} at any time."
                else: text = json.dumps({"input": f"we may close account {n} at any time .", "target": "Other"})
                self._send(200, {"id": f"c{n}", "object": "chat.completion", "created": 0, "model": body["model"],
                                 "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}],
                                 "usage": {"prompt_tokens": 10, "completion_tokens": 12, "total_tokens": 22}})
            def _send(self, status, obj):
                data = json.dumps(obj).encode()
                self.send_response(status); self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data))); self.end_headers(); self.wfile.write(data)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler); self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
    @property
    def url(self): return f"http://127.0.0.1:{self.server.server_address[1]}/v1"
    def with_rf(self): return [("response_format" in b) for b in self.bodies]
    def close(self): self.server.shutdown(); self.server.server_close()


def ours(caught): return [w for w in caught if "response_format" in str(w.message)]


def run_endpoint(srv, cache, legal, n=4, **kw):
    "A json-mode run against `srv`; returns the pipeline, its examples and the response_format warnings it raised."
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe = SyntheticPipeline(teacher_model="m", base_url=srv.url, cache_path=str(cache), concurrency=2, backoff=0.01, **kw)
        syn = pipe.generate(legal.train, n, "Classify Terms of Service clauses", task=legal)
    return pipe, syn, ours(caught)


def test_endpoint_that_takes_response_format_gets_the_schema(legal, tmp_path):
    srv = ChatServer("accept")
    try:
        pipe, syn, warned = run_endpoint(srv, tmp_path/"c.jsonl", legal)
        assert warned == [] and srv.with_rf() == [True]*4
        rf = srv.bodies[0]["response_format"]
        assert rf["type"] == "json_schema" and rf["json_schema"]["strict"] is True and rf["json_schema"]["name"] == "legal_example"
        schema = rf["json_schema"]["schema"]
        assert schema["properties"]["label"] == {"type": "string", "enum": legal.labels}
        assert schema["required"] == ["label", "text"] and schema["additionalProperties"] is False
        assert "maxLength" not in json.dumps(schema)                         # endpoints get the portable subset
        assert len(syn) == 4 and all(e.target in legal.labels for e in syn)
        assert pipe.response_format_support() == "json_schema"
        known = json.loads((tmp_path/SUPPORT_FILE).read_text())
        assert known[pipe._endpoint_key()]["response_format"] == "json_schema"
        assert all(json.loads(l)["constrained"] == "response_format" for l in (tmp_path/"c.jsonl").read_text().splitlines())
    finally: srv.close()


def test_endpoint_that_refuses_response_format_falls_back_once_and_remembers(legal, tmp_path, monkeypatch):
    srv = ChatServer("refuse")
    try:
        pipe, syn, warned = run_endpoint(srv, tmp_path/"c.jsonl", legal)
        assert len(warned) == 1 and "refused response_format" in str(warned[0].message) and "HTTP 400" in str(warned[0].message)
        sent = srv.with_rf()
        first_plain = sent.index(False)
        assert 1 <= sum(sent) <= 2 and not any(sent[first_plain:])          # only the first wave (concurrency 2) asked with it
        assert sum(not s for s in sent) == 4 and len(syn) == 4                # every request answered, without response_format
        assert pipe.usage.retries == 0 and pipe.usage.failed == 0             # a refusal is not a retry
        assert pipe.response_format_support() == "refused"
        assert json.loads((tmp_path/SUPPORT_FILE).read_text())[pipe._endpoint_key()]["response_format"] == "refused"
        # the rerun is free; a second run with new requests asks without it, and does not warn again
        before = len(srv.bodies)
        again, _, warned = run_endpoint(srv, tmp_path/"c.jsonl", legal)
        assert (again.usage.calls, again.usage.cached, len(srv.bodies)) == (0, 4, before)
        _, more, warned = run_endpoint(srv, tmp_path/"c.jsonl", legal, seed=1)
        assert len(more) == 4 and srv.with_rf()[before:] == [False]*4 and warned == []
        # a new process knows it from the file beside the cache (and warns once there)
        monkeypatch.setattr(aug, "_SUPPORT", {}); monkeypatch.setattr(aug, "_WARNED", set())
        before = len(srv.bodies)
        fresh, _, warned = run_endpoint(srv, tmp_path/"c.jsonl", legal, seed=2)
        assert srv.with_rf()[before:] == [False]*4 and fresh.response_format_support() == "refused" and len(warned) == 1
    finally: srv.close()


def test_endpoint_that_ignores_response_format(legal, tmp_path):
    srv = ChatServer("ignore")
    try:
        pipe, syn, warned = run_endpoint(srv, tmp_path/"c.jsonl", legal)
        assert srv.with_rf() == [True]*4 and pipe.response_format_support() == "ignored"
        assert len(warned) == 1 and "ignores response_format" in str(warned[0].message)
        assert "none of 4 complete replies matched the schema" in str(warned[0].message)
        _, _, warned = run_endpoint(srv, tmp_path/"c.jsonl", legal, seed=1)
        assert srv.with_rf()[4:] == [False]*4 and warned == []
    finally: srv.close()


def test_two_complete_replies_decide_nothing(legal, tmp_path):
    srv = ChatServer("ignore")
    try:
        pipe, _, warned = run_endpoint(srv, tmp_path/"c.jsonl", legal, n=2)
        assert pipe.response_format_support() is None and warned == []       # too few to tell: asked with it again next time
        run_endpoint(srv, tmp_path/"c.jsonl", legal, n=2, seed=1)
        assert srv.with_rf() == [True]*4
    finally: srv.close()


def test_transformers_serve_takes_response_format_without_error(server, legal):
    rf = aug.response_format(task_schema(legal))
    body = json.dumps({"model": server.model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "response_format": rf}).encode()
    req = urllib.request.Request(server.base_url + "/chat/completions", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r: out = json.loads(r.read())
    assert r.status == 200 and out["choices"][0]["message"]["content"] is not None   # accepted (and not honoured: 4 random tokens)
    assert reply_errors(out["choices"][0]["message"]["content"], task_schema(legal))


def test_cli_max_tokens_default_is_the_pipeline_default(tmp_path):
    srv = ChatServer("accept")
    try:
        rc = main_augment(["--task", "legal", "--n-seed", "20", "--target-count", "2", "--base-url", srv.url, "--teacher-model", "m",
                           "--cache", str(tmp_path/"c.jsonl"), "--out", str(tmp_path/"k.jsonl")])
        assert rc == 0 and {b["max_tokens"] for b in srv.bodies} == {SyntheticPipeline.max_tokens} == {384}
    finally: srv.close()


def short_seeds(legal, n=16):
    return [Example(e.input[:n], e.target, id=e.id) for e in legal.train]


def test_local_constrained_json_always_parses_with_a_label_of_the_enum(legal, tiny_teacher, tmp_path, no_http):
    seeds = short_seeds(legal)
    pipe = SyntheticPipeline(teacher_model=tiny_teacher, mode="json", cache_path=str(tmp_path/"a.jsonl"), max_tokens=96, concurrency=4)
    syn = pipe.generate(seeds, 12, task=legal)
    assert pipe.schema["properties"]["text"]["maxLength"] == 24 and pipe.schema["properties"]["label"]["enum"] == legal.labels
    recs = [json.loads(l) for l in (tmp_path/"a.jsonl").read_text().splitlines()]
    assert len(recs) == 12 and pipe.rejected == [] and len(syn) == 12
    assert all(r["constrained"] == "xgrammar" and r["finish_reason"] == "stop" for r in recs)
    assert all(reply_errors(r["reply"], pipe.schema) == [] for r in recs)
    assert all(e.target in legal.labels for e in syn) and len({e.target for e in syn}) > 1
    # batched under the grammar, each row still samples with its own seed: another batch size, the same replies
    other = SyntheticPipeline(teacher_model=tiny_teacher, mode="json", cache_path=str(tmp_path/"b.jsonl"), max_tokens=96, concurrency=5)
    other.generate(seeds, 12, task=legal)
    assert replies(tmp_path/"b.jsonl") == replies(tmp_path/"a.jsonl")
    # unconstrained, the same random model writes no JSON at all: the constraint did the work
    free = SyntheticPipeline(teacher_model=tiny_teacher, mode="json", structured=False, cache_path=False, max_tokens=24, concurrency=4)
    assert free.generate(seeds, 4, task=legal) == []


def test_local_reply_cut_at_max_tokens_is_truncated(legal, tiny_teacher, no_http):
    pipe = SyntheticPipeline(teacher_model=tiny_teacher, mode="json", cache_path=False, max_tokens=5, concurrency=4)
    assert pipe.generate(short_seeds(legal), 4, task=legal) == []
    assert Counter(r["reason"] for r in pipe.rejected) == {"truncated": 4}


def test_missing_xgrammar_fails_before_loading_the_model(legal, monkeypatch):
    monkeypatch.setitem(sys.modules, "xgrammar", None)   # as if not installed
    pipe = SyntheticPipeline(teacher_model="tiny", mode="json", cache_path=False)
    with pytest.raises(ImportError, match=r"pip install xgrammar .*structured=False"): pipe.generate(legal.train, 2, task=legal)
    assert pipe._teachers == {}
    # JSON without the constraint does not need it
    SyntheticPipeline(teacher_model="tiny", mode="json", structured=False, cache_path=False, max_tokens=2).generate(legal.train, 1, task=legal)


def test_bad_structured_flag():
    with pytest.raises(ValueError, match=r"SyntheticPipeline.structured: expected one of \[True, False\], got 'yes'"): SyntheticPipeline(structured="yes")


# ---------------------------------------------------------------- seed adaptation and the classifier stage (issue 17 items 4, 5)

def _adapt_kw(tmp_path, **kw):
    from vrnx_nb.adapt import AdaptConfig
    return {**dict(teacher_model="tiny", adapt=True, adapt_config=AdaptConfig(max_steps=2, r=4), adapt_cache=str(tmp_path/"adapted"),
                   max_tokens=10, concurrency=4, device="cpu"), **kw}


@pytest.fixture
def count_finetunes(monkeypatch):
    "Counts the LoRA runs `adapt_teacher` / `train_seed_classifier` start (they import finetune when called)."
    import vrnx_nb.training as training
    calls, real = [], training.finetune
    def counting(model, task, **kw): calls.append(task.name); return real(model, task, **kw)
    monkeypatch.setattr(training, "finetune", counting)
    return calls


def test_adapted_teacher_is_trained_once_per_seeds_and_asked_by_the_pipeline(legal, tmp_path, no_http, count_finetunes):
    seeds = legal.train[:12]
    first = SyntheticPipeline(cache_path=str(tmp_path/"r.jsonl"), **_adapt_kw(tmp_path))
    syn = first.generate(seeds, 4, task=legal)
    assert count_finetunes == ["legal-generator"] and first.adapted is not None
    assert first.teacher_name == str(Path(first.adapted.output_dir).absolute()) != "tiny"
    assert all(e.meta["teacher"] == first.teacher_name and e.target == e.meta["asked_label"] for e in syn)
    assert {json.loads(l)["model"] for l in (tmp_path/"r.jsonl").read_text().splitlines()} == {first.teacher_name}
    # the same seeds: the same adapter from the cache, not trained again, and every reply from the reply cache
    again = SyntheticPipeline(cache_path=str(tmp_path/"r.jsonl"), **_adapt_kw(tmp_path))
    again.generate(seeds, 4, task=legal)
    assert count_finetunes == ["legal-generator"] and again.adapted.output_dir == first.adapted.output_dir
    assert (again.usage.cached, again.usage.calls) == (4, 0)
    # one seed changed: another adapter, trained, and asked under its own name (nothing reused)
    changed = [Example(seeds[0].input + " indeed", seeds[0].target)] + seeds[1:]
    other = SyntheticPipeline(cache_path=str(tmp_path/"r.jsonl"), **_adapt_kw(tmp_path))
    other.generate(changed, 4, task=legal)
    assert count_finetunes == ["legal-generator"]*2 and other.adapted.output_dir != first.adapted.output_dir
    assert (other.usage.cached, other.usage.calls) == (0, 4)
    assert len([p for p in (tmp_path/"adapted").iterdir() if p.is_dir()]) == 2


def test_adapted_teacher_writes_inputs_and_the_base_teacher_the_targets(tmp_path, no_http, count_finetunes):
    med = load_task("medical", n_train=6, seed=0)
    pipe = SyntheticPipeline(cache_path=str(tmp_path/"m.jsonl"), **_adapt_kw(tmp_path, max_tokens=16))
    assert pipe._mode("summarization") == "two_step"
    syn = pipe.generate(med.train, 4, task=med)
    n_inputs = 4 - sum(not r["reason"].startswith("target_") for r in pipe.rejected)
    models = Counter(json.loads(l)["model"] for l in (tmp_path/"m.jsonl").read_text().splitlines())
    assert models == Counter({pipe.teacher_name: 4, "tiny": n_inputs}) and n_inputs >= 1   # step 2 from the untuned base
    assert count_finetunes == ["medical-generator"] and all(e.meta["mode"] == "two_step" for e in syn)
    assert set(pipe._teachers) == {"tiny", pipe.teacher_name}   # both kept loaded for the next round


def test_adapt_needs_a_task_and_a_plain_text_mode(legal, tmp_path):
    with pytest.raises(ValueError, match=r"SyntheticPipeline.adapt: expected False without a task"):
        SyntheticPipeline(cache_path=False, **_adapt_kw(tmp_path)).generate(legal.train, 2, "Classify clauses")
    with pytest.raises(ValueError, match=r"SyntheticPipeline.adapt: expected False in mode 'json'"):
        SyntheticPipeline(cache_path=False, mode="json", **_adapt_kw(tmp_path)).generate(legal.train, 2, task=legal)
    assert not (tmp_path/"adapted").exists()   # refused before any training


def _pool_judge(legal, pool):
    "A stand-in seed classifier: 0.8 on a pool clause's own label, uniform on any other text."
    truth, L = {e.input: e.target for e in pool}, legal.labels
    def judge(texts):
        import numpy as np
        out = np.full((len(texts), len(L)), 1/len(L))
        for i, t in enumerate(texts):
            if t in truth: out[i] = 0.2/(len(L) - 1); out[i, L.index(truth[t])] = 0.8
        return out
    return judge


def test_classifier_stage_runs_after_decontamination_with_its_retention(legal):
    pool = [e for e in load_task("legal").train if e.id not in {s.id for s in legal.train}][:40]
    def teacher(messages, request):   # half the replies are pool clauses under their own label, half under the asked one
        e = pool[request["index"] % len(pool)]
        return json.dumps({"input": e.input, "target": e.target if request["index"] % 2 else request["target_label"]})
    pipe = SyntheticPipeline(teacher=teacher, teacher_model="fake", cache_path=False, quality_threshold=0.0,
                             classifier_threshold=0.5, classifier_model=_pool_judge(legal, pool))
    syn = pipe.generate(legal.train, 40, task=legal)
    kept = pipe.filter(syn)
    rep = pipe.report()
    stages = list(rep.stages.stage)
    assert stages.index("decontamination") + 1 == stages.index("classifier") == stages.index("quality") - 1
    row = rep.stages.set_index("stage").loc["classifier"]
    rejected = Counter(r["reason"] for r in pipe.rejected if r["stage"] == "classifier")
    assert row["out"] == row["in"] - sum(rejected.values()) and set(rejected) <= {"other_label", "low_confidence"}
    assert rejected["other_label"] >= 1   # the replies filed under a label that is not theirs
    truth = {e.input: e.target for e in pool}
    assert kept and all(truth[e.input] == e.target and e.meta["classifier_p"] == 0.8 for e in kept)
    assert int(rep.table["count"].sum()) + len(kept) == 40
    # off: no classifier row, the same report as before
    plain = SyntheticPipeline(teacher=teacher, teacher_model="fake", cache_path=False, quality_threshold=0.0)
    plain.filter(plain.generate(legal.train, 40, task=legal))
    assert "classifier" not in set(plain.report().stages.stage)


def test_classifier_stage_needs_a_classification_task(legal):
    med = load_task("medical", n_train=10, seed=0)
    pipe = SyntheticPipeline(teacher=fake, teacher_model="fake", cache_path=False, classifier_threshold=0.5)
    with pytest.raises(ValueError, match=r"SyntheticPipeline.classifier_threshold: expected None for a summarization task"):
        pipe.generate(med.train, 2, task=med)
    with pytest.raises(ValueError, match=r"SyntheticPipeline.classifier_threshold: expected None without a task"):
        pipe.generate(legal.train, 2, "Classify clauses")


def test_classifier_stage_trains_the_seed_classifier_from_the_teachers_base(legal, tmp_path, no_http, count_finetunes):
    seeds = legal.train[:12]
    pipe = SyntheticPipeline(cache_path=False, classifier_threshold=0.01, **_adapt_kw(tmp_path, max_tokens=16))
    kept = pipe.filter(pipe.generate(seeds, 4, task=legal))
    assert count_finetunes == ["legal-generator", "legal-seeds"]
    assert any(p.name.startswith("tiny-legal-classifier-") for p in (tmp_path/"adapted").iterdir())
    io = {s: (i, o) for s, i, o in pipe._stage_io}
    assert io["classifier"][0] == io["decontamination"][1]
    judged = kept + [r["example"] for r in pipe.rejected if r["stage"] == "classifier"]
    assert len(judged) == io["classifier"][0] and all(0 <= e.meta["classifier_p"] <= 1 for e in judged)
    pipe.filter(pipe.generate(seeds, 4, task=legal))   # the same seeds: both runs found in the cache
    assert count_finetunes == ["legal-generator", "legal-seeds"]


def test_experiments_filter_synthetic_data_with_the_pipelines_classifier_stage(tmp_path):
    "vrnx_nb.experiments applies ExperimentConfig.classifier_threshold through SyntheticPipeline.filter (one place)."
    from vrnx_nb.experiments import ExperimentConfig, synthetic_examples
    pool = load_task("legal").train
    def scripted(messages, request):   # real clauses from outside the seeds, with their true labels
        e = pool[(7*request["index"]) % len(pool)]
        return json.dumps({"input": e.input, "target": e.target})
    cfg = ExperimentConfig("legal", "lora", model="tiny", r=4, augment=6, quality_threshold=0.0, teacher="scripted",
                           classifier_threshold=0.01, n_train=8, max_steps=2, batch_size=4, limit=4, max_val_examples=4)
    task = load_task("legal", n_train=cfg.n_train, seed=cfg.seed)
    kept, meta = synthetic_examples(cfg, task, tmp_path, teacher_fn=scripted)
    assert kept and all(e.meta["classifier_label"] == e.target and e.meta["classifier_p"] >= 0.01 for e in kept)
    assert meta["kept"] == len(kept) and meta["generated"] >= len(kept)
    assert any(p.name.startswith("tiny-legal-classifier-") for p in (tmp_path/"adapted").iterdir())  # tuned from cfg.model


def test_quality_threshold_is_calibrated_on_the_seeds_so_real_clauses_pass():
    "Default: the threshold 90% of the seeds reach out of fold; held-out real clauses pass at about that rate (0.85 failed most)."
    from vrnx_nb.augmentation import QualityClassifier, corrupt_examples
    from vrnx_nb.checks import default_of
    task = load_task("legal", n_train=50, seed=0); ids = {e.input for e in task.train}
    pool = [e for e in load_task("legal").train if e.input not in ids][:120]
    def teacher(messages, request):
        e = pool[request["index"] % len(pool)]
        return json.dumps({"input": e.input, "target": e.target}), {"prompt_tokens": 1, "completion_tokens": 1}
    assert default_of(SyntheticPipeline, "quality_threshold") is None and default_of(SyntheticPipeline, "quality_real_pass") == 0.9
    runs = {}
    for name, kw in {"calibrated": {}, "fixed": dict(quality_threshold=0.85)}.items():
        pipe = SyntheticPipeline(teacher=teacher, teacher_model="fake", cache_path=False, seed=0, **kw)
        pipe.filter(pipe.generate(task.train, len(pool), "Classify clauses", task=task))
        st, rep = pipe.report().stages.set_index("stage"), pipe.report()
        runs[name] = (st.loc["quality", "out"]/st.loc["quality", "in"], pipe.quality_threshold_used, rep)
    share, th, rep = runs["calibrated"]
    assert th == pipe.quality.threshold_for(0.9) and th < 0.85, th
    assert share >= 0.8 and runs["fixed"][0] < share, (share, runs["fixed"][0])
    assert f"quality threshold {th:.2f} (90% of the seeds pass, out of fold)" in repr(rep)
    assert "quality threshold 0.85 (fixed)" in repr(runs["fixed"][2])
    # the corruptions of the same clauses still mostly fail at the calibrated threshold
    fake = pipe.quality.score(corrupt_examples(pool, "classification", list(task.labels), seed=1))
    assert (fake < th).mean() > 3*(1 - share)
    # fewer than 6 seeds: no out-of-fold scores, the classifier's boundary 0.5 and the report says why
    few = SyntheticPipeline(teacher=teacher, teacher_model="fake", cache_path=False)
    few.filter(few.generate(task.train[:4], 4, "Classify clauses", task=task))
    assert few.quality_threshold_used == 0.5 and "too few to calibrate" in repr(few.report())


@pytest.mark.parametrize("kw, msg", [
    (dict(quality_real_pass=0), "SyntheticPipeline.quality_real_pass: expected a number in (0, 1], got 0"),
    (dict(quality_real_pass=1.5), "SyntheticPipeline.quality_real_pass: expected a number in (0, 1], got 1.5"),
    (dict(quality_threshold="0.8"), "SyntheticPipeline.quality_threshold: expected a number in [0, 1] or None, got '0.8'"),
])
def test_bad_quality_settings(kw, msg):
    with pytest.raises(ValueError) as e: SyntheticPipeline(**kw)
    assert msg in str(e.value)


# ---------------------------------------------------------------- continuous batching and token budgets (issue 17 item 6)

def test_local_teacher_same_seed_same_reply_at_batch_1_and_4(tiny_teacher, legal, monkeypatch):
    "Each request samples with its own generator: batch 1 in order and batch 4 (sorted, rows refilled) give one reply each."
    import vrnx_nb.generation as G
    convs = [[{"role": "user", "content": f"Write clause {i} about " + "the terms " * (i % 4)}] for i in range(7)]
    seeds = [11 * i + 5 for i in range(7)]
    one = tiny_teacher.complete(convs, seeds, max_new_tokens=12, temperature=0.9, top_p=0.95, batch_size=1)
    widths, step = [], G._step
    def counted(model, rows, st, arg): widths.append(len(rows)); return step(model, rows, st, arg)
    monkeypatch.setattr(G, "_step", counted)
    done = []
    four = tiny_teacher.complete(convs, seeds, max_new_tokens=12, temperature=0.9, top_p=0.95, batch_size=4,
                                 on_reply=lambda i, r: done.append(i))
    assert [r["text"] for r in four] == [r["text"] for r in one] and len({r["text"] for r in one}) == 7
    assert [r["usage"] for r in four] == [r["usage"] for r in one]
    assert max(widths) == 4 and sorted(done) == list(range(7))   # never more than 4 rows; every reply reported once
    assert tiny_teacher.complete(convs[:3], [1, 2, 3], max_new_tokens=12, batch_size=2)[0]["text"] != one[0]["text"]
    # under the grammar, too: each request keeps its own matcher through refills
    sch = {"type": "object", "properties": {"label": {"type": "string", "enum": legal.labels},
                                            "text": {"type": "string", "minLength": 1, "maxLength": 12}},
           "required": ["label", "text"], "additionalProperties": False}
    c1 = tiny_teacher.complete(convs, seeds, max_new_tokens=80, json_schema=sch, batch_size=1)
    c4 = tiny_teacher.complete(convs, seeds, max_new_tokens=80, json_schema=sch, batch_size=4)
    assert [r["text"] for r in c4] == [r["text"] for r in c1]
    assert all(r["finish_reason"] == "stop" and reply_errors(r["text"], sch) == [] for r in c4)


def test_pipeline_keeps_concurrency_rows_in_flight_over_all_requests(legal, tiny_teacher, monkeypatch, no_http):
    "The pipeline hands the teacher every pending request at once, `concurrency` rows decoding, not chunks of that size."
    calls, real = [], tiny_teacher.complete
    def complete(conversations, seeds, **kw):
        calls.append((len(conversations), kw["batch_size"])); return real(conversations, seeds, **kw)
    monkeypatch.setattr(tiny_teacher, "complete", complete)
    pipe = SyntheticPipeline(teacher_model=tiny_teacher, cache_path=False, max_tokens=6, concurrency=3)
    pipe.generate(legal.train, 8, task=legal)
    assert calls == [(8, 3)] and pipe.usage.calls == 8


def test_constrained_schema_fits_the_token_limit(legal, tiny_teacher):
    "In process, the text cap is lowered until the object with any seed's text cut at the cap fits `max_tokens`."
    tok = tiny_teacher.tokenizer
    n = lambda s: len(tok(s, add_special_tokens=False)["input_ids"])
    for max_tokens in (48, 96, 160):
        pipe = SyntheticPipeline(teacher_model=tiny_teacher, mode="json", cache_path=False, max_tokens=max_tokens)
        pipe.profile, pipe._task = profile_seeds(legal.train, legal), legal
        cap = pipe._schema(legal.train)["properties"]["text"]["maxLength"]
        assert cap < 1.5 * max(len(e.input) for e in legal.train)  # tighter than the length filter's bound
        longest = max(legal.labels, key=n)
        worst = max(n(json.dumps({"label": longest, "text": e.input[:cap]}, ensure_ascii=False)) for e in legal.train)
        assert worst + 1 <= max_tokens, (max_tokens, cap, worst)   # + the stop token
        assert worst + 1 >= 0.6 * max_tokens                        # and the bound is not far below it
    # short seeds keep the length filter's bound
    pipe = SyntheticPipeline(teacher_model=tiny_teacher, mode="json", cache_path=False, max_tokens=96)
    pipe.profile, pipe._task = profile_seeds(short_seeds(legal), legal), legal
    assert pipe._schema(short_seeds(legal))["properties"]["text"]["maxLength"] == 24
