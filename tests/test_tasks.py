"Bad-input suite for loaders and tasks: every error names the file, row/line and field and what was expected."
import csv, json, math, random, warnings
from collections import defaultdict
from dataclasses import replace
import pandas as pd
import pytest
from vrnx_nb.tasks import (Example, Task, load_examples, load_task, make_task, cap_train, split_indices, task_card,
                           cue_shares, LEGAL_CUES, data_dir)


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def test_missing_column_names_file_row_and_field(tmp_path):
    p = write(tmp_path, "d.csv", "text,label\nhello,Other\n")
    with pytest.raises(ValueError, match=r"d\.csv, row 2: missing field 'clause'"):
        load_examples(p, "clause", "label")


def test_empty_file(tmp_path):
    p = write(tmp_path, "empty.tsv", "")
    with pytest.raises(ValueError, match=r"empty\.tsv: the file is empty"):
        load_examples(p, "text", "label")


def test_header_only_file_has_no_rows(tmp_path):
    p = write(tmp_path, "head.csv", "text,label\n")
    with pytest.raises(ValueError, match=r"head\.csv: no rows"):
        load_examples(p, "text", "label")


def test_malformed_jsonl_line(tmp_path):
    p = write(tmp_path, "d.jsonl", '{"input": "a", "target": "b"}\n\n{"input": "c", "target": oops}\n')
    with pytest.raises(ValueError, match=r"d\.jsonl, line 3: malformed JSON"):
        load_examples(p)


def test_jsonl_line_not_an_object(tmp_path):
    p = write(tmp_path, "d.jsonl", '["a", "b"]\n')
    with pytest.raises(ValueError, match=r"line 1: expected a JSON object, got list"):
        load_examples(p)


def test_unknown_label(tmp_path):
    p = write(tmp_path, "d.tsv", "text\tlabel\nA clause\tArbitration\nAnother\tNope\n")
    with pytest.raises(ValueError, match=r"d\.tsv, row 3, field 'label': unknown label 'Nope'"):
        load_examples(p, "text", "label", labels=["Arbitration", "Other"])


def test_non_string_field_in_json(tmp_path):
    p = write(tmp_path, "d.json", json.dumps([{"input": "ok", "target": "x"}, {"input": 42, "target": "y"}]))
    with pytest.raises(ValueError, match=r"d\.json, item 1, field 'input': expected a string, got int"):
        load_examples(p)


def test_non_string_field_in_dataframe():
    df = pd.DataFrame({"q": ["a", "b"], "a": ["x", None]})
    with pytest.raises(ValueError, match=r"DataFrame, row 1, field 'a': expected a string, got an empty cell"):
        load_examples(df, "q", "a")


def test_datasets_dataset_loads():
    from datasets import Dataset
    ds = Dataset.from_dict({"question": ["why?", "how?"], "summary": ["Why.", "How."]})
    exs = load_examples(ds, "question", "summary")
    assert [e.target for e in exs] == ["Why.", "How."]


def test_missing_file(tmp_path):
    with pytest.raises(ValueError, match=r"nope\.csv: file not found"):
        load_examples(tmp_path / "nope.csv")


def test_unknown_format(tmp_path):
    p = write(tmp_path, "d.xml", "<a/>")
    with pytest.raises(ValueError, match=r"unknown format 'xml'"):
        load_examples(p)


def test_split_larger_than_data():
    with pytest.raises(ValueError, match=r"n_train=5000 is larger than its train split \(3150 examples\)"):
        load_task("legal", n_train=5000)
    exs = [Example(f"x{i}", "a") for i in range(10)]
    with pytest.raises(ValueError, match="leave no training examples out of 10"):
        split_indices(exs, val_size=5, test_size=5)


def test_unknown_task_name_suggests():
    with pytest.raises(ValueError, match=r"Unknown task 'medicl'.*Did you mean 'medical'"):
        load_task("medicl")


def test_task_label_outside_label_set():
    with pytest.raises(ValueError, match=r"example 1 \(id 'b'\) field 'target': label 'Z'"):
        Task("t", "classification", "Label it.", [Example("a", "X", id="a"), Example("b", "Z", id="b")], labels=["X", "Y"])


def test_missing_split_and_empty_split():
    t = Task("t", "summarization", "Sum.", [Example("a", "b")], splits={"train": [0], "test": []})
    with pytest.raises(ValueError, match=r"has no split 'val'"):
        t.val
    with pytest.raises(ValueError, match=r"split 'test' is empty"):
        t.test


def test_n_train_never_takes_from_val_or_test():
    full = load_task("legal")
    for n in (50, 100, 200, 500):
        small = load_task("legal", n_train=n, seed=1)
        assert len(small.train) == n
        assert set(small.splits["train"]) <= set(full.splits["train"])
        assert small.splits["val"] == full.splits["val"] and small.splits["test"] == full.splits["test"]


def test_splits_are_reproducible_and_disjoint():
    a, b = load_task("medical"), load_task("medical")
    assert a.splits == b.splits
    s = {k: set(v) for k, v in a.splits.items()}
    assert not (s["train"] & s["val"]) and not (s["train"] & s["test"]) and not (s["val"] & s["test"])
    assert sum(len(v) for v in s.values()) == len(a.examples)


def test_make_task_from_jsonl(tmp_path):
    rows = [{"input": f"q{i}", "target": "yes" if i % 2 else "no"} for i in range(40)]
    p = write(tmp_path, "d.jsonl", "\n".join(json.dumps(r) for r in rows))
    t = make_task("yn", p, "classification", "Yes or no?", val_size=4, test_size=8, n_train=10)
    assert t.counts() == {"train": 10, "val": 4, "test": 8}
    assert t.label_counts("test") == {"yes": 4, "no": 4}


def test_bundled_data_is_unchanged():
    "The shipped copies match the publishers' checksums (never edited)."
    import hashlib
    from vrnx_nb.tasks import data_dir
    for line in (data_dir() / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split()
        assert hashlib.sha256((data_dir() / name).read_bytes()).hexdigest() == digest, name
    assert "CC BY 4.0" in (data_dir() / "NOTICE").read_text()


def test_csv_row_with_extra_values(tmp_path):
    p = write(tmp_path, "d.csv", "text,label\na,b,c\n")
    with pytest.raises(ValueError, match=r"d\.csv, row 2: more values than the 2 header columns"):
        load_examples(p, "text", "label")


def test_json_not_a_list(tmp_path):
    p = write(tmp_path, "d.json", json.dumps({"rows": 1}))
    with pytest.raises(ValueError, match=r"d\.json: expected a JSON list of objects"):
        load_examples(p)


def test_split_indices_out_of_range_and_bad_sizes():
    with pytest.raises(ValueError, match=r"split 'test' has indices outside 0\.\.0: \[3\]"):
        Task("t", "summarization", "Sum.", [Example("a", "b")], splits={"test": [3]})
    exs = [Example(f"x{i}", "a") for i in range(10)]
    with pytest.raises(ValueError, match=r"val_size: expected a count >= 0"):
        split_indices(exs, val_size=-1, test_size=2)


def test_cap_train_and_with_train_reject_bad_input():
    t = load_task("medical")
    with pytest.raises(ValueError, match=r"cap_train\.n_train: expected a positive integer, got 0"):
        cap_train(t, 0)
    with pytest.raises(ValueError, match=r"cap_train\.n_train: expected a positive integer, got True"):
        cap_train(t, True)
    with pytest.raises(ValueError, match=r"with_train: item 1 is a dict, expected an Example"):
        t.with_train([t.train[0], {"input": "a", "target": "b"}])
    with pytest.raises(ValueError, match=r"with_train needs at least one example"):
        t.with_train([])


# --- issue 14: the legal labels mean what they say -------------------------------------------------------------------

def test_legal_cue_phrases_carry_their_label():
    "Unfair clauses with a phrase that names their type carry that label in a clear majority (fails on permuted names)."
    for exs in (load_task("legal").examples, load_examples(data_dir() / "unfair_tos.tsv", "text", "label")):
        rows = cue_shares(exs)
        assert {r["expected"] for r in rows} == set(load_task("legal").labels) - {"Other"}  # one cue per unfair label
        for r in rows:
            assert r["matches"] >= 5, r
            assert r["share"] >= 0.6 and r["commonest"] == r["expected"], r


def test_cue_check_fails_on_permuted_label_names():
    "The check can fail: rotate the eight unfair names (what the old copy did) and no cue keeps its label."
    exs = load_task("legal").examples
    unfair = sorted({e.target for e in exs} - {"Other"})
    rotate = dict(zip(unfair, unfair[1:] + unfair[:1]))
    rows = cue_shares([replace(e, target=rotate.get(e.target, e.target)) for e in exs])
    assert all(r["share"] < 0.6 for r in rows), rows


def test_cue_shares_counts_only_non_other_clauses():
    exs = [Example("we shall not be liable for anything", "Limitation of liability"),
           Example("we shall not be liable for loss", "Other"),
           Example("you are liable for your posts", "Arbitration")]
    (r,) = cue_shares(exs, {r"liable for": "Limitation of liability"})
    assert (r["matches"], r["with_expected"], r["share"]) == (2, 1, 0.5)


# --- issue 14: label-aware sampling ----------------------------------------------------------------------------------

def _old_stratified_take(idx, keys, n, rng):
    "The sampler as it was before min_per_label (commit 3741611), kept here as the reference for the default."
    by_key = defaultdict(list)
    for i, k in zip(idx, keys): by_key[k].append(i)
    for v in by_key.values(): rng.shuffle(v)
    total = len(idx)
    quota = {k: max(1, math.floor(n*len(v)/total)) if n >= len(by_key) else 0 for k, v in by_key.items()}
    for k in quota: quota[k] = min(quota[k], len(by_key[k]))
    order = sorted(by_key, key=lambda k: (-len(by_key[k]), str(k)))
    while sum(quota.values()) > n:
        k = max(order, key=lambda k: quota[k]); quota[k] -= 1
    rest = [i for k in order for i in by_key[k][quota[k]:]]
    rng.shuffle(rest)
    return sorted([i for k in order for i in by_key[k][:quota[k]]] + rest[:n-sum(quota.values())])


@pytest.mark.parametrize("name", ["legal", "medical"])
def test_cap_train_default_keeps_todays_indices(name):
    task = load_task(name)
    train = task.splits["train"]
    keys = [task.examples[i].target for i in train] if task.kind == "classification" else [0] * len(train)
    for n in (5, 9, 16, 50, 100, 200):
        for seed in (0, 1, 2):
            want = _old_stratified_take(train, keys, n, random.Random(seed))
            assert cap_train(task, n, seed).splits["train"] == want
            assert cap_train(task, n, seed, min_per_label=None).splits["train"] == want
            assert load_task(name, n_train=n, seed=seed).splits["train"] == want


def test_min_per_label_guarantees_each_label():
    full = load_task("legal")
    have = full.label_counts("train")
    for n, k in ((50, 5), (100, 8), (200, 10)):
        t = load_task("legal", n_train=n, seed=3, min_per_label=k)
        got = t.label_counts("train")
        assert len(t.train) == n and set(t.splits["train"]) <= set(full.splits["train"])
        assert t.splits["val"] == full.splits["val"] and t.splits["test"] == full.splits["test"]
        for label, c in have.items():
            assert got[label] >= min(k, c), (n, k, label, got)
        assert got["Other"] == max(got.values())  # the rest stays stratified: the big label gets what is left
    again = lambda: load_task("legal", n_train=50, seed=3, min_per_label=5).splits
    assert again() == again()


def test_min_per_label_takes_all_of_a_short_label_and_rest_stratified():
    exs = [Example(f"c{i}", "a" if i < 3 else ("b" if i < 40 else "c")) for i in range(200)]
    t = Task("t", "classification", "?", exs, splits={"train": list(range(200))})
    got = cap_train(t, 30, seed=0, min_per_label=6).label_counts("train")
    assert got["a"] == 3 and got["b"] >= 6 and got["c"] >= 6 and sum(got.values()) == 30
    assert got["c"] > got["b"]  # c has 160 of 200: it still gets the larger share of the rest


def test_min_per_label_too_small_n_train_names_the_numbers():
    with pytest.raises(ValueError, match=r"n_train=20 cannot hold min_per_label=5 for the 9 labels of its train split: "
                                         r"it needs n_train >= 45 \(5 x 9\)"):
        load_task("legal", n_train=20, min_per_label=5)
    exs = [Example(f"c{i}", "a" if i < 2 else "b") for i in range(40)]
    t = Task("t", "classification", "?", exs, splits={"train": list(range(40))})
    with pytest.raises(ValueError, match=r"n_train=6 cannot hold min_per_label=5 .* needs n_train >= 7 "
                                         r"\(5 x 2; 1 of them have fewer than 5"):
        cap_train(t, 6, min_per_label=5)
    assert cap_train(t, 7, min_per_label=5).label_counts("train") == {"a": 2, "b": 5}
    with pytest.raises(ValueError, match=r"min_per_label applies to classification tasks; this one is summarization"):
        load_task("medical", n_train=20, min_per_label=2)
    with pytest.raises(ValueError, match=r"cap_train\.min_per_label: expected a positive integer or None, got 0"):
        load_task("legal", n_train=50, min_per_label=0)


def test_min_per_label_passes_through_make_task_and_with_splits():
    rows = [{"input": f"q{i}", "target": "rare" if i % 20 == 0 else "common"} for i in range(200)]
    t = make_task("m", rows, "classification", "?", val_size=20, test_size=40, n_train=20, min_per_label=4)
    assert t.label_counts("train")["rare"] == 4 and len(t.train) == 20
    assert make_task("m", rows, "classification", "?", val_size=20, test_size=40, n_train=20).label_counts("train")["rare"] == 1
    again = t.with_splits(seed=1, val_size=20, test_size=40, n_train=12, min_per_label=6)
    assert again.label_counts("train") == {"rare": 6, "common": 6}


def test_task_card_shows_label_counts_per_split():
    legal = load_task("legal", n_train=100)
    card = task_card(legal)
    line = next(l for l in card.splitlines() if l.startswith("  labels (train/val/test): "))
    shown = dict(item.rsplit(" ", 1) for item in line.split(": ", 1)[1].split(", "))
    assert list(shown) == legal.labels
    for label, counts in shown.items():
        assert counts == "/".join(str(legal.label_counts(s)[label]) for s in ("train", "val", "test"))
    assert "labels" not in task_card(load_task("medical"))


# --- issue 14: bad input in user data --------------------------------------------------------------------------------

def test_excel_csv_with_byte_order_mark_loads(tmp_path):
    p = tmp_path / "excel.csv"
    p.write_bytes("label,text\r\nOther,We may update the site.\r\n".encode("utf-8-sig"))
    (e,) = load_examples(p, "text", "label")
    assert (e.input, e.target) == ("We may update the site.", "Other")
    j = tmp_path / "d.jsonl"
    j.write_bytes('{"input": "a", "target": "b"}\n'.encode("utf-8-sig"))
    assert load_examples(j)[0].target == "b"


@pytest.mark.parametrize("delim", [";", "\t", "|"])
def test_other_delimiters_are_sniffed_from_the_header(tmp_path, delim):
    p = tmp_path / "d.csv"
    p.write_text(f"text{delim}label\nWe may, at any time, end it.{delim}Unilateral termination\nHi.{delim}Other\n",
                 encoding="utf-8")
    exs = load_examples(p, "text", "label")
    assert [(e.input, e.target) for e in exs] == [("We may, at any time, end it.", "Unilateral termination"), ("Hi.", "Other")]


def test_unsniffable_delimiter_is_named_in_the_error(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("clause;category\nWe may end it.;Unilateral termination\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"d\.csv, row 2: missing field 'text'; the row has \['clause;category'\] "
                                         r"\(read with delimiter ','; split on ';' the header line has 2 columns \['clause', 'category'\]\)"):
        load_examples(p, "text", "label")


def test_field_over_the_csv_limit_loads_and_the_limit_is_restored(tmp_path):
    contract = "The provider may terminate this agreement. " * 4000  # ~176,000 characters, over 131,072
    p = tmp_path / "contract.csv"
    p.write_text("text,label\n" + '"' + contract + '",Other\nshort,Other\n', encoding="utf-8")
    before = csv.field_size_limit()
    exs = load_examples(p, "text", "label")
    assert len(exs) == 2 and exs[0].input == contract.strip() and len(contract) > 131072
    assert csv.field_size_limit() == before


def test_task_too_small_for_its_splits_fails_at_make_task():
    rows = [{"input": f"q{i}", "target": "y" if i % 2 else "n"} for i in range(5)]
    with pytest.raises(ValueError, match=r"Task 'x': 5 examples cannot fill val 1 \+ test 1 \+ train 10 \(needs 12\)"):
        make_task("x", rows, "classification", "?", val_size=1, test_size=1, n_train=10)
    with pytest.raises(ValueError, match=r"Task 'x': 2 examples cannot fill val 1 \+ test 1 \+ train >= 1 \(needs 3\)"):
        make_task("x", rows[:2], "summarization", "?", val_size=1, test_size=1)
    with pytest.raises(ValueError, match=r"Task 'x': test_size=0.2 of 2 examples leaves the test split empty"):
        make_task("x", rows[:2], "classification", "?")
    with pytest.warns(UserWarning, match=r"Task 'x': val_size=0.1 of 4 examples leaves the validation split empty"):
        t = make_task("x", rows[:4], "classification", "?")
    assert t.counts() == {"train": 3, "val": 0, "test": 1}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an explicit val_size=0 is meant: no warning
        assert make_task("x", rows, "classification", "?", val_size=0, test_size=2).counts()["val"] == 0


def test_label_missing_from_train_is_warned():
    rows = [{"input": f"q{i}", "target": "a"} for i in range(20)] + [{"input": "lonely", "target": "b"}]
    with pytest.warns(UserWarning, match=r"no training example of label\(s\) \['b'\]"):
        make_task("x", rows, "classification", "?", val_size=2, test_size=4)


def test_labels_differing_only_in_case_are_reported(tmp_path):
    p = tmp_path / "yn.csv"
    p.write_text("q,a\none,Yes\ntwo,yes \nthree,YES\nfour,no\nfive,yes\n", encoding="utf-8")
    assert [e.target for e in load_examples(p, "q", "a")] == ["Yes", "yes", "YES", "no", "yes"]  # spaces stripped
    with pytest.raises(ValueError, match=r"Task 'yn': labels that differ only in case or surrounding spaces: "
                                         r"'Yes' 1 \(ids 2\), 'yes' 2 \(ids 3, 6\), 'YES' 1 \(ids 4\); normalise them"):
        make_task("yn", p, "classification", "Yes or no?", "q", "a")
    with pytest.raises(ValueError, match=r"row 2, field 'a': unknown label 'Yes'.*'Yes' differs only in case from 'yes'"):
        load_examples(p, "q", "a", labels=["yes", "no"])
    with pytest.raises(ValueError, match=r"surrounding spaces: 'no' 1 \(ids b\), 'no ' 1 \(ids c\)"):
        Task("t", "classification", "?", [Example("x", "yes", id="a"), Example("y", "no", id="b"), Example("z", "no ", id="c")])
    summ = make_task("s", p, "summarization", "?", "q", "a", val_size=1, test_size=1)  # text targets are not labels
    assert summ.kind == "summarization"


def test_stripped_target_matches_the_label_set(tmp_path):
    p = tmp_path / "d.tsv"
    p.write_text("text\tlabel\nA clause\tOther \n", encoding="utf-8")
    assert load_examples(p, "text", "label", labels=["Other"])[0].target == "Other"
