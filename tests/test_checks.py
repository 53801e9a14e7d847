"One message form for bad config values across the stages' dataclasses, and the helpers behind it (vrnx_nb.checks)."
import dataclasses, re
import numpy as np
import pytest
from vrnx_nb.checks import (Kind, check_field, check_kwargs, config_kwargs, default_of, field_error, int_in, missing_fields,
                            number_in, one_of, positive_int, validate)
from vrnx_nb.bottleneck import BottleneckConfig
from vrnx_nb.deploy import ExportConfig
from vrnx_nb.experiments import ExperimentConfig
from vrnx_nb.training import TrainConfig

FORM = re.compile(r"^(?P<owner>\w+)\.(?P<field>\w+): expected (?P<what>.+), got (?P<got>.+)$")

def _message(make) -> str:
    with pytest.raises(ValueError) as e: make()
    return str(e.value)

# one bad value of each kind per config: (constructor, field, value)
POSITIVE = [(lambda: TrainConfig(r=0), "TrainConfig", "r"), (lambda: BottleneckConfig(r=0), "BottleneckConfig", "r"),
            (lambda: ExperimentConfig("legal", "lora", n_train=0), "ExperimentConfig", "n_train"),
            (lambda: ExportConfig(n_calibration=0), "ExportConfig", "n_calibration")]
CHOICE = [(lambda: TrainConfig(method="x"), "TrainConfig", "method"),
          (lambda: BottleneckConfig(act="x"), "BottleneckConfig", "act"),
          (lambda: ExperimentConfig("legal", "x"), "ExperimentConfig", "method"),
          (lambda: ExportConfig(dtype="x"), "ExportConfig", "dtype")]
FRACTION = [(lambda: TrainConfig(lora_dropout=1.5), "TrainConfig", "lora_dropout"),
            (lambda: BottleneckConfig(dropout=1.5), "BottleneckConfig", "dropout"),
            (lambda: ExperimentConfig("legal", "lora", lora_dropout=1.5), "ExperimentConfig", "lora_dropout")]

@pytest.mark.parametrize("make, owner, name", POSITIVE)
def test_a_bad_positive_integer_reads_the_same_in_every_config(make, owner, name):
    expected = str(field_error(owner, name, "a positive integer", 0))
    assert _message(make) == expected == f"{owner}.{name}: expected a positive integer, got 0"

@pytest.mark.parametrize("make, owner, name", CHOICE)
def test_a_bad_choice_reads_the_same_in_every_config(make, owner, name):
    m = FORM.match(_message(make))
    assert m, _message(make)
    assert (m["owner"], m["field"], m["got"]) == (owner, name, "'x'") and m["what"].startswith("one of [")

@pytest.mark.parametrize("make, owner, name", FRACTION)
def test_a_bad_fraction_reads_the_same_in_every_config(make, owner, name):
    assert _message(make) == f"{owner}.{name}: expected a number in [0, 1), got 1.5"

def test_every_config_uses_the_form_for_none_able_fields():
    for make, owner, name in [(lambda: TrainConfig(max_steps=-1), "TrainConfig", "max_steps"),
                              (lambda: ExperimentConfig("legal", "lora", limit=-1), "ExperimentConfig", "limit")]:
        assert _message(make) == f"{owner}.{name}: expected a positive integer or None, got -1"
    assert _message(lambda: ExportConfig(group_size=4)) == \
        "ExportConfig.group_size: expected an integer >= 8 or None, got 4"

def test_kinds_refuse_near_misses():
    assert [positive_int(v) for v in (1, np.int64(2), 0, True, 1.0, "1")] == [True, True, False, False, False, False]
    assert [number_in(0, 1)(v) for v in (0, 0.99, 1, False)] == [True, True, False, False]
    assert [one_of((4, 8))(v) for v in (4, 8, "4", 4.0)] == [True, True, False, False]
    assert (positive_int | None)(None) and not positive_int(None)
    with pytest.raises(TypeError): positive_int | 3

def test_check_field_and_validate():
    assert check_field("f", "n", 3, positive_int) == 3
    with pytest.raises(ValueError, match=r"^f\.n: expected an integer in 1\.\.4 for method 'lora', got 9$"):
        check_field("f", "n", 9, int_in(1, 4), note="for method 'lora'")
    with pytest.raises(ValueError, match=r"^f\.n: expected a positive integer or None, got 0$"):
        check_field("f", "n", 0, positive_int, none_ok=True)
    with pytest.raises(ValueError, match=r"got 'x{76}\.\.\.$"):  # long values are cut
        check_field("f", "n", "x" * 300, positive_int)
    @dataclasses.dataclass
    class C:
        a: int = 1
        b: str = "p"
        def __post_init__(self): validate(self, {"a": positive_int, "b": one_of("pq")})
    assert C(2, "q").a == 2
    with pytest.raises(ValueError, match=r"^C\.b: expected one of \['p', 'q'\], got 'r'$"): C(b="r")
    with pytest.raises(ValueError, match=r"^Other\.a: expected a negative number, got 1$"):
        validate(C(), {"a": Kind("a negative number", lambda v: v < 0)}, owner="Other")

def test_missing_fields():
    assert missing_fields("d", {"a": 1}, ["a"]) is None
    assert str(missing_fields("d", {"a": 1}, ["a", "b"], needs="the estimate")) == \
        "d: missing field(s) ['b']; the estimate needs the fields ['a', 'b']"

def test_defaults_and_kwargs_come_from_the_dataclass():
    import inspect
    @dataclasses.dataclass
    class C:
        r: int = 16 # rank
        tags: list = dataclasses.field(default_factory=lambda: ["x"]) # tags
    @config_kwargs(C)
    def build(name, # a name
              **kwargs):
        check_kwargs("build", C, kwargs); return C(**kwargs)
    assert default_of(C, "r") == 16 and default_of(C, "tags") == ["x"]
    with pytest.raises(ValueError, match="C has no field 'rank'"): default_of(C, "rank")
    params = inspect.signature(build).parameters
    assert params["r"].default == 16 and params["r"].kind is inspect.Parameter.KEYWORD_ONLY
    with pytest.raises(TypeError, match=r"build: unknown argument\(s\) \['rank'\]; C fields are \['r', 'tags'\]"):
        build("n", rank=3)
    from fastcore.docments import docments
    assert docments(build)["r"] == "rank"  # the docs show the dataclass's field comments
