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
