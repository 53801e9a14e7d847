"Model resolution: aliases, local folders, hub ids offline, remote code off by default."
import os, subprocess, sys
import pytest
from vrnx_nb.models import resolve_model_path, load_model, tiny_model_path


def test_hub_id_offline_names_model_and_env(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match=r"someone/absent-model.*HF_HUB_OFFLINE"):
        load_model("someone/absent-model")


def test_unknown_name_suggests_alias():
    with pytest.raises(ValueError, match=r"Unknown model 'smollm'.*Did you mean 'smollm2-135m'"):
        resolve_model_path("smollm")


def test_folder_without_config(tmp_path):
    with pytest.raises(ValueError, match=r"expected a config.json"):
        resolve_model_path(tmp_path)


def test_local_folder_loads_and_remote_code_is_off():
    path = tiny_model_path()
    model, tok = load_model(str(path), device="cpu")
    assert model.config.vocab_size == len(tok)
    import inspect
    assert inspect.signature(load_model).parameters["trust_remote_code"].default is False


def test_concurrent_cache_builds_do_not_collide(tmp_path):
    "Two processes building the tiny model into an empty cache both succeed and leave one folder."
    env = {**os.environ, "VRNX_CACHE": str(tmp_path)}
    code = "from vrnx_nb.models import tiny_model_path; print(tiny_model_path())"
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300)[0].strip().splitlines()[-1] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert outs[0] == outs[1]
    assert sorted(x.name for x in tmp_path.iterdir() if not x.name.startswith(".")) == [os.path.basename(outs[0])]


def test_model_name_of_wrong_type():
    with pytest.raises(ValueError, match=r"model: expected a name or a path, got int"):
        resolve_model_path(3)
