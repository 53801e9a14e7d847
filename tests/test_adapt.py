"""Seed adaptation (vrnx_nb.adapt): the generator's direction per task kind, the cache key (same seeds reuse an adapter,
other seeds never do), the round trip into SyntheticPipeline, and LAMBADA's classifier filter."""
import json, shutil, time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from vrnx_nb import training
from vrnx_nb.adapt import (ADAPT_FILE, INPUT_PROMPT, AdaptConfig, SeedClassifier, StageResult, adapt_key, adapt_teacher,
                           classifier_filter, generator_messages, generator_task, label_prompt, train_seed_classifier)
from vrnx_nb.augmentation import SyntheticPipeline, build_input_request, build_label_request, profile_seeds, split_question
from vrnx_nb.calibration import task_logliks
from vrnx_nb.tasks import Example, load_task

TINY = dict(max_steps=2, r=4, device="cpu")


@pytest.fixture(scope="module")
def legal(): return load_task("legal", n_train=50, min_per_label=3)

@pytest.fixture(scope="module")
def seeds(legal): return legal.train[:12]

@pytest.fixture(scope="module")
def root(tmp_path_factory): return tmp_path_factory.mktemp("adapted")

@pytest.fixture(scope="module")
def adapted(seeds, legal, root): return adapt_teacher(seeds, legal, "tiny", cache_root=root, **TINY)


def test_config_fields_are_checked():
    assert AdaptConfig(r=8).lora_alpha == 16
    for bad, msg in [(dict(max_steps=0), "AdaptConfig.max_steps: expected a positive integer, got 0"),
                     (dict(batch_size=2.5), "AdaptConfig.batch_size: expected a positive integer, got 2.5"),
                     (dict(learning_rate=0), "AdaptConfig.learning_rate: expected a number in (0, 1), got 0"),
                     (dict(lora_alpha=-1), "AdaptConfig.lora_alpha: expected a positive integer or None, got -1"),
                     (dict(seed=-1), "AdaptConfig.seed: expected an integer >= 0, got -1")]:
        with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace(")", r"\)")): AdaptConfig(**bad)


def test_classification_direction_is_label_to_text(legal):
    gen = generator_task(legal.train, legal)
    assert len(gen.train) == len(legal.train) and gen.kind == "summarization" and "val" not in gen.splits
    pairs = {(s.target, s.input) for s in legal.train}
    for e in gen.train:  # every row: the label's request -> that seed's clause
        label = e.input.split('"')[1]
        assert e.input == label_prompt(label) and (label, e.target) in pairs
    req = build_label_request(profile_seeds(legal.train, legal), legal.train, 3)  # the pipeline asks the same sentence
    assert req["messages"][-1]["content"] == label_prompt(req["target_label"])
    assert generator_task(legal.train[::-1], legal).fingerprint() == gen.fingerprint()


def test_summarization_and_qa_directions():
    med = load_task("medical", n_train=6)
    gen = generator_task(med.train, med)
    assert {e.input for e in gen.train} == {INPUT_PROMPT}
    assert sorted(e.target for e in gen.train) == sorted(e.input for e in med.train)
    assert build_input_request(profile_seeds(med.train, med), med.train, 0)["messages"][-1]["content"] == INPUT_PROMPT
    fin = load_task("finance", n_train=8)
    qa = generator_task(fin.train, fin)
    questions = {split_question(e.input)[1]: split_question(e.input)[0] for e in fin.train}
    for e in qa.train:  # the context stays in the prompt, the seed's question is the completion
        assert e.target in questions and e.input.startswith(questions[e.target])
        assert e.input.endswith("Write one new, different question that the text above answers.")
    bad = [Example("a table with no question", "42")]
    with pytest.raises(ValueError, match="no seed input ends in a 'Question: ...' line"): generator_task(bad, fin)
    assert generator_messages(fin, context="Table:\nx | 1")[0]["content"].endswith("that the text above answers.")
    with pytest.raises(ValueError, match="context: a QA request needs"): generator_messages(fin)


def test_key_follows_seeds_settings_and_base(legal):
    key, contents = adapt_key(legal.train, legal)
    assert contents["base_model"] == "smollm2-135m" and contents["n_seeds"] == 50 and contents["config"]["max_steps"] == 40
    assert adapt_key(legal.train[::-1], legal)[0] == key
    one = legal.train[5]
    other_label = "Other" if one.target != "Other" else "Arbitration"
    for changed in ([replace(one, input=one.input + " x")], [replace(one, target=other_label)]):
        assert adapt_key(legal.train[:5] + changed + legal.train[6:], legal)[0] != key
    assert adapt_key(legal.train[:-1], legal)[0] != key
    assert adapt_key(legal.train, legal, config=AdaptConfig(learning_rate=2e-4))[0] != key
    assert adapt_key(legal.train, legal, model="tiny")[0] != key
    assert adapt_key(legal.train, legal, description="Unfair clauses of online terms")[0] != key
    with pytest.raises(ValueError, match="direction: expected 'generator' or 'classifier'"):
        adapt_key(legal.train, legal, direction="x")


def test_same_seeds_reuse_the_adapter_without_training(adapted, seeds, legal, root, monkeypatch):
    assert adapted.global_step == 2 and Path(adapted.output_dir).parent == root
    saved = json.loads((Path(adapted.output_dir)/ADAPT_FILE).read_text())
    assert saved["key"] == adapt_key(seeds, legal, "tiny", AdaptConfig(max_steps=2, r=4))[0]
    assert saved["key"] in adapted.output_dir
    def no_training(*a, **k): raise AssertionError("finetune called for seeds that were adapted already")
    monkeypatch.setattr(training, "finetune", no_training)
    t0 = time.time()
    again = adapt_teacher(seeds[::-1], legal, "tiny", cache_root=root, **TINY)
    assert time.time() - t0 < 2 and again.output_dir == adapted.output_dir and again.global_step == 2


def test_other_seeds_never_reuse_it(adapted, seeds, legal, root):
    changed = [replace(seeds[0], input=seeds[0].input + " indeed")] + seeds[1:]
    other = adapt_teacher(changed, legal, "tiny", cache_root=root, **TINY)
    assert other.output_dir != adapted.output_dir and (Path(other.output_dir)/"result.json").exists()
    # a folder copied under another seed set's key is not taken for it: its stored key differs, and finetune's run check refuses it
    fewer = seeds[:-1]
    key = adapt_key(fewer, legal, "tiny", AdaptConfig(max_steps=2, r=4))[0]
    shutil.copytree(adapted.output_dir, root/f"tiny-legal-generator-{key}")
    with pytest.raises(ValueError, match="holds another run"): adapt_teacher(fewer, legal, "tiny", cache_root=root, **TINY)


def test_default_cache_is_under_the_package_cache(seeds, legal, tmp_path, monkeypatch):
    monkeypatch.setenv("VRNX_CACHE", str(tmp_path))
    res = adapt_teacher(seeds[:4], legal, "tiny", max_steps=1, r=4, batch_size=4, device="cpu")
    assert Path(res.output_dir).parent == tmp_path/"adapted"
    with pytest.raises(TypeError, match="not both"): adapt_teacher(seeds, legal, "tiny", config=AdaptConfig(), max_steps=2)


def test_round_trip_into_the_pipeline_label_mode(adapted, seeds, legal):
    pipe = SyntheticPipeline(teacher_model=adapted, mode="label", max_tokens=16, concurrency=3, cache_path=False, device="cpu")
    syn = pipe.generate(seeds, 3, task=legal)
    assert pipe.usage.calls == 3 and pipe.usage.requests == 3
    assert len(syn) + sum(r["stage"] == "generation" for r in pipe.rejected) == 3
    assert all(e.meta["teacher"] == str(Path(adapted.output_dir).absolute()) and e.target == e.meta["asked_label"] for e in syn)


def _stub(labels, table):
    "A classifier whose probabilities are fixed per text: table[text] = {label: p}, the rest spread evenly."
    def judge(texts):
        out = np.zeros((len(texts), len(labels)))
        for i, t in enumerate(texts):
            for l, q in table[t].items(): out[i, labels.index(l)] = q
            rest = out[i] == 0
            out[i, rest] = (1 - out[i].sum()) / rest.sum()
        judge.calls.append(list(texts))
        return out
    judge.calls = []
    return judge


def test_classifier_filter_keeps_what_the_classifier_agrees_with(legal):
    stub = _stub(legal.labels, {"a": {"Arbitration": 0.95}, "b": {"Arbitration": 0.4, "Other": 0.5}, "c": {"Jurisdiction": 0.6},
                                "d": {"Choice of law": 0.8}})
    cands = [Example("a", "Arbitration"), Example("b", "Arbitration"), Example("c", "Jurisdiction"),
             Example("d", "Choice of law"), Example("e", "Made-up label"), "not an example"]
    res = classifier_filter(cands, stub, legal, threshold=0.7)
    assert isinstance(res, StageResult)
    assert [e.input for e in res.kept] == ["a", "d"]
    assert res.counts == Counter({("classifier", "other_label"): 1, ("classifier", "low_confidence"): 1,
                                  ("classifier", "unknown_label"): 1, ("classifier", "not_an_example"): 1})
    assert res.stage_io == ("classifier", 6, 2)
    assert stub.calls == [["a", "b", "c", "d"]]  # only examples with a known label are scored
    assert res.kept[0].meta == {"classifier_p": 0.95, "classifier_label": "Arbitration"} and cands[0].meta == {}
    dropped = {r["example"].input: r for r in res.rejected if isinstance(r["example"], Example)}
    assert dropped["b"]["example"].meta["classifier_label"] == "Other" and dropped["c"]["reason"] == "low_confidence"
    assert [e.input for e in classifier_filter(cands, stub, legal, threshold=0.5).kept] == ["a", "c", "d"]
    assert classifier_filter([], stub, legal).stage_io == ("classifier", 0, 0)


def test_classifier_filter_refuses_bad_input(legal):
    stub = _stub(legal.labels, {"a": {"Other": 0.9}})
    for t in (1.5, 0, -0.1, True, "0.5"):
        msg = r"classifier_filter.threshold: expected a value in \(0, 1\], got " + repr(t).replace(".", r"\.")
        with pytest.raises(ValueError, match=msg):
            classifier_filter([Example("a", "Other")], stub, legal, threshold=t)
    with pytest.raises(ValueError, match="classifier_filter.task: expected a classification Task"):
        classifier_filter([Example("a", "x")], stub, load_task("medical", n_train=4))
    with pytest.raises(ValueError, match=r"expected a \(1, 9\) matrix of label probabilities"):
        classifier_filter([Example("a", "Other")], lambda ts: np.full((len(ts), 9), 0.5), legal)
    with pytest.raises(ValueError, match="got a bare model"):
        classifier_filter([Example("a", "Other")], training.nn.Linear(2, 2), legal)


def test_seed_classifier_probabilities_are_softmax_of_label_logliks(seeds, legal, root):
    run = train_seed_classifier(seeds, legal, "tiny", cache_root=root, **TINY)
    assert train_seed_classifier(seeds[::-1], legal, "tiny", cache_root=root, **TINY).output_dir == run.output_dir
    assert "-classifier-" in run.output_dir
    judge = SeedClassifier(run, legal)
    texts = [e.input for e in legal.val[:3]]
    p = judge(texts)
    first3 = replace(legal, splits={**legal.splits, "val": legal.splits["val"][:3]})
    ll, _ = task_logliks(judge.model, judge.tokenizer, first3, "val")
    e = np.exp(ll - ll.max(1, keepdims=True))
    assert p.shape == (3, 9) and np.allclose(p, e / e.sum(1, keepdims=True), atol=1e-6)
    res = classifier_filter([Example(t, "Other") for t in texts], judge, legal, threshold=1e-9)
    assert res.n_in == 3 and len(res.kept) + len(res.rejected) == 3
    top = [legal.labels[j] for j in p.argmax(1)]
    assert [e.input for e in res.kept] == [t for t, l in zip(texts, top) if l == "Other"]
    with pytest.raises(ValueError, match="expected a classification Task"):
        train_seed_classifier(seeds, load_task("medical", n_train=4), "tiny")
