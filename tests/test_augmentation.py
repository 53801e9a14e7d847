"""Synthetic data augmentation against real servers: `transformers serve` (tiny model) on loopback, a fault-injecting
proxy in front of it (HTTP 500s, delay, concurrency and request counting), kill-and-resume, bad input.
The server lifecycle itself (no orphans) is tested in test_serving.py."""
import json, os, signal, subprocess, sys, textwrap, threading, time, urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import psutil, pytest

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


def alive(pid:int) -> bool:
    try: return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess: return False


def wait_dead(pid:int, timeout:float=15.0) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not alive(pid): return True
        time.sleep(0.2)
    return not alive(pid)


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
    (dict(quality_threshold=1.2), "quality_threshold must be a number in [0, 1]"),
    (dict(quality_threshold=-0.01), "quality_threshold must be a number in [0, 1]"),
    (dict(diversity_weight=2), "diversity_weight must be a number in [0, 1]"),
    (dict(diversity_weight=float("nan")), "diversity_weight must be a number in [0, 1]"),
    (dict(concurrency=0), "concurrency must be an integer >= 1"),
    (dict(max_retries=-1), "max_retries must be an integer >= 0"),
    (dict(timeout=0), "timeout must be a positive number"),
    (dict(base_url="localhost:8000"), "base_url must start with http"),
    (dict(api_key_env="sk-live-abcdef"), "NAME of an environment variable"),
    (dict(teacher_model=""), "teacher_model must be a non-empty"),
    (dict(price_per_1k_prompt=-1), "price_per_1k_prompt must be a number >= 0"),
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
