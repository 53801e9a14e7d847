"Bad-input suite for loaders and tasks: every error names the file, row/line and field and what was expected."
import json
import pandas as pd
import pytest
from vrnx_nb.tasks import Example, Task, load_examples, load_task, make_task, cap_train, split_indices


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
    with pytest.raises(ValueError, match=r"n_train: expected a positive integer, got 0"):
        cap_train(t, 0)
    with pytest.raises(ValueError, match=r"with_train: item 1 is a dict, expected an Example"):
        t.with_train([t.train[0], {"input": "a", "target": "b"}])
    with pytest.raises(ValueError, match=r"with_train needs at least one example"):
        t.with_train([])
