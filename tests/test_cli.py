"The `vrnx` commands take their defaults from the config dataclasses: no option restates a default that could drift."
import dataclasses, inspect
import pytest
from vrnx_nb.checks import option_defaults
from vrnx_nb import deploy, experiments, training
from vrnx_nb.deploy import ExportConfig, _export_parser
from vrnx_nb.experiments import ExperimentConfig, _experiment_parser
from vrnx_nb.training import TrainConfig, _train_parser

class _Captured(ValueError): "Raised by a stand-in for the expensive call; main_* report it as an error and return 2."

def _capture(monkeypatch, module, name) -> dict:
    seen = {}
    def fake(*args, **kwargs): seen.update(args=args, kwargs=kwargs); raise _Captured("captured")
    monkeypatch.setattr(module, name, fake)
    return seen

def test_train_options_default_to_trainconfig():
    pairs = option_defaults(_train_parser(), TrainConfig)
    assert {k for k, (cli, cfg) in pairs.items() if cli != cfg} == {"method"}  # lora by design: it needs no bitsandbytes
    assert pairs["method"] == ("lora", TrainConfig.method)
    assert {"r", "learning_rate", "epochs", "batch_size", "max_steps", "early_stopping_patience", "resume", "packing",
            "balance"} <= set(pairs)

def test_vrnx_train_without_flags_passes_trainconfigs_defaults(monkeypatch):
    seen = _capture(monkeypatch, training, "finetune")
    assert training.main_train(["--model", "tiny"]) == 2 and seen["args"][0] == "tiny"
    as_run = TrainConfig(**{**seen["kwargs"], "method": TrainConfig.method})
    assert dataclasses.asdict(as_run) == dataclasses.asdict(TrainConfig())
    assert seen["kwargs"]["method"] == "lora"

def test_finetune_signature_defaults_are_trainconfigs():
    params = inspect.signature(training.finetune).parameters
    fields = [f.name for f in dataclasses.fields(TrainConfig)]
    assert {f: params[f].default for f in fields} == {f.name: f.default for f in dataclasses.fields(TrainConfig)}

def test_export_options_and_signature_default_to_exportconfig(monkeypatch):
    pairs = option_defaults(_export_parser(), ExportConfig)
    assert {k for k, (cli, cfg) in pairs.items() if cli != cfg} == set()
    assert set(pairs) == {f.name for f in dataclasses.fields(ExportConfig)} - {"seed"}
    params = inspect.signature(deploy.export).parameters
    fields = dataclasses.fields(ExportConfig)
    assert {f.name: params[f.name].default for f in fields} == {f.name: f.default for f in fields}
    seen = _capture(monkeypatch, deploy, "export")
    assert deploy.main_export(["--model", "tiny"]) == 2
    kw = {k: v for k, v in seen["kwargs"].items() if k in ExportConfig.__dataclass_fields__}
    assert ExportConfig(seen["args"][1], **kw) == ExportConfig()

def test_experiment_options_leave_the_defaults_to_the_config(monkeypatch, tmp_path):
    pairs = option_defaults(_experiment_parser(), ExperimentConfig)
    assert {"model", "r", "n_train", "method", "epochs", "lora_dropout", "teacher", "quality_threshold"} <= set(pairs)
    # an option left out is None: the config gets the grid's or the dataclass's default
    assert {k: cli for k, (cli, _) in pairs.items() if cli is not None} == {}
    seen = _capture(monkeypatch, experiments, "run_grid")
    assert experiments.main_experiment(["methods", "--task", "legal", "--results", str(tmp_path/"r.csv")]) == 2
    cfgs = seen["args"][0]
    assert len(cfgs) == 6
    for c in cfgs:
        plain = ExperimentConfig(c.task, c.method, augment=c.augment)
        assert {k: getattr(c, k) for k in pairs} == {k: getattr(plain, k) for k in pairs}, c.label

# --- vrnx augment

def test_augment_options_default_to_the_pipelines():
    from vrnx_nb.augmentation import SyntheticPipeline, _augment_parser
    pairs = option_defaults(_augment_parser(), SyntheticPipeline)
    # teacher_model and adapt depend on the teacher: the local one (smollm2-135m, adapted) or an endpoint (gpt-4-turbo, not)
    assert {k for k, (cli, cfg) in pairs.items() if cli != cfg} == {"teacher_model", "adapt"}
    assert pairs["adapt"][0] is None and pairs["teacher_model"][0] is None
    assert {"mode", "classifier_threshold", "quality_threshold", "quality_real_pass", "diversity_weight", "concurrency", "max_tokens", "seed",
            "base_url", "api_key_env", "device"} <= set(pairs)


def _captured_pipeline(monkeypatch, argv) -> "SyntheticPipeline":
    from vrnx_nb import augmentation
    seen = {}
    def fake(self, *args, **kwargs): seen["pipe"] = self; raise _Captured("captured")
    monkeypatch.setattr(augmentation.SyntheticPipeline, "generate", fake)
    assert augmentation.main_augment(argv) == 2
    return seen["pipe"]


def test_vrnx_augment_offline_default_is_the_adapted_local_teacher(monkeypatch):
    from vrnx_nb.augmentation import SyntheticPipeline, LOCAL_TEACHER
    pipe = _captured_pipeline(monkeypatch, [])
    assert (pipe.teacher_model, pipe.adapt, pipe.local, pipe.base_url) == (LOCAL_TEACHER, True, True, None) == ("smollm2-135m", True, True, None)
    assert (pipe._mode("classification"), pipe._mode("summarization")) == ("label", "two_step")
    plain = SyntheticPipeline(teacher_model=LOCAL_TEACHER)   # every other setting is the dataclass's
    skip = {"teacher_model", "adapt", "cache_path", "teacher"}
    assert {f.name: getattr(pipe, f.name) for f in dataclasses.fields(pipe) if f.name not in skip} == \
           {f.name: getattr(plain, f.name) for f in dataclasses.fields(plain) if f.name not in skip}
    assert _captured_pipeline(monkeypatch, ["--no-adapt"]).adapt is False
    assert _captured_pipeline(monkeypatch, ["--mode", "json"]).adapt is False   # an adapted teacher writes plain text
    flags = _captured_pipeline(monkeypatch, ["--mode", "label", "--classifier-threshold", "0.7", "--teacher-model", "tiny"])
    assert (flags.mode, flags.classifier_threshold, flags.teacher_model, flags.adapt) == ("label", 0.7, "tiny", True)
    endpoint = _captured_pipeline(monkeypatch, ["--base-url", "http://127.0.0.1:9/v1"])
    assert (endpoint.teacher_model, endpoint.adapt, endpoint._mode("classification")) == ("gpt-4-turbo", False, "json")


def test_vrnx_augment_refuses_adapt_with_an_endpoint(capsys):
    from vrnx_nb.augmentation import main_augment
    assert main_augment(["--base-url", "http://127.0.0.1:9/v1", "--adapt"]) == 2
    assert "--adapt: the teacher is tuned in this process" in capsys.readouterr().err
    assert main_augment(["--classifier-threshold", "2", "--no-adapt"]) == 2
    assert "SyntheticPipeline.classifier_threshold: expected a number in (0, 1] or None, got 2.0" in capsys.readouterr().err

# --- vrnx demo --augment

def test_demo_augment_is_off_by_default_and_uses_the_adapted_local_teacher(monkeypatch, tmp_path):
    from vrnx_nb import augmentation, cli
    assert cli._demo_parser().parse_args([]).augment == 0   # off: the demo's time is unchanged
    seen = {}
    def fake(self, seeds, target_count, *a, **kw): seen.update(pipe=self, n=target_count, seeds=len(seeds)); raise _Captured("captured")
    monkeypatch.setattr(augmentation.SyntheticPipeline, "generate", fake)
    with pytest.raises(_Captured):
        cli.main_demo(["--model", "tiny", "--n-train", "12", "--min-per-label", "1", "--augment", "3", "--preview", "0", "--out", str(tmp_path)])
    pipe = seen["pipe"]
    assert (pipe.teacher_model, pipe.adapt, pipe.local, seen["n"], seen["seeds"]) == ("tiny", True, True, 3, 12)
    assert pipe._mode("classification") == "label" and pipe.cache_path == str(tmp_path/"teacher_replies.jsonl")
