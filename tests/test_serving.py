"""The server lifecycle against real processes: `transformers serve` (tiny model) stops with its `with` block, on an
error inside it, and when the parent is SIGKILLed (no orphans); process groups reach grandchildren; the names the
other modules import from `vrnx_nb.augmentation` are the serving module's own."""
import os, signal, subprocess, sys, textwrap, time, urllib.request

import psutil, pytest

from vrnx_nb.serving import free_port, local_teacher, spawn_group, stop_group, wait_http

SERVER_ENV = {"OMP_NUM_THREADS": "1"}


def alive(pid:int) -> bool:
    try: return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess: return False


def wait_dead(pid:int, timeout:float=15.0) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not alive(pid): return True
        time.sleep(0.2)
    return not alive(pid)


def test_augmentation_reexports_the_serving_names():
    import vrnx_nb.augmentation as aug, vrnx_nb.serving as serving
    assert aug.local_teacher is serving.local_teacher
    assert aug.TeacherEndpoint is serving.TeacherEndpoint
    assert aug.free_port is serving.free_port


def test_stop_group_reaches_grandchildren_and_sigterm_ignorers():
    code = ("import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "subprocess.Popen([sys.executable, '-c', 'import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)']); "
            "print('ready', flush=True); time.sleep(60)")
    proc = spawn_group([sys.executable, "-c", code])
    deadline = time.time() + 20
    while time.time() < deadline and not psutil.Process(proc.pid).children(): time.sleep(0.1)
    kids = [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    assert kids, "the child did not start its grandchild"
    t0 = time.time()
    stop_group(proc, grace=0.5)
    assert time.time() - t0 < 6
    assert all(wait_dead(p, 5) for p in [proc.pid] + kids), [p for p in [proc.pid] + kids if alive(p)]


def test_wait_http_reports_an_exited_server_and_a_silent_port():
    proc = spawn_group([sys.executable, "-c", "import sys; print('bad flag', file=sys.stderr); raise SystemExit(2)"])
    with pytest.raises(RuntimeError, match="exited with code 2"):
        wait_http(f"http://127.0.0.1:{free_port()}/health", proc, timeout=30, tail=lambda: "bad flag")
    t0 = time.time()
    with pytest.raises(TimeoutError, match="did not answer"):
        wait_http(f"http://127.0.0.1:{free_port()}/health", timeout=1.0)
    assert time.time() - t0 < 5


def test_local_teacher_stops_on_error():
    pids = []
    with pytest.raises(RuntimeError, match="boom"):
        with local_teacher("tiny", env=SERVER_ENV) as ep:
            pids = [ep.pid] + [c.pid for c in psutil.Process(ep.pid).children(recursive=True)]
            with urllib.request.urlopen(ep.base_url.removesuffix("/v1") + "/health", timeout=5) as r: assert r.status == 200
            raise RuntimeError("boom")
    assert pids and all(wait_dead(p, 5) for p in pids), [p for p in pids if alive(p)]
    assert not os.path.exists(ep.log_path)


PARENT = textwrap.dedent("""
    import sys, time
    from vrnx_nb.serving import local_teacher
    with local_teacher("tiny", env={"OMP_NUM_THREADS": "1"}) as ep:
        print(ep.pid, flush=True)
        time.sleep(600)
""")


def test_no_orphan_when_parent_is_killed():
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = parent.stdout.readline()
        assert line.strip().isdigit(), f"parent did not start a server: {line!r}"
        pid = int(line)
        assert alive(pid)
    finally:
        parent.send_signal(signal.SIGKILL); parent.wait(10)
    assert wait_dead(pid, 15), f"server {pid} outlived its killed parent"
