"Export formats, bad inputs, the model card, the CLI and serving an export folder with `transformers serve` (tiny model)."
import json, shutil
from pathlib import Path
import pytest, torch
from safetensors import safe_open
from vrnx_nb import deploy
from vrnx_nb.deploy import export, export_source, load_export, main_export, merged_model, read_export, serve_export, write_card
from vrnx_nb.models import load_model, tiny_model, tiny_model_path
from vrnx_nb.tasks import load_task
from vrnx_nb.training import finetune, load_trained


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("deploy")/"run"
    return finetune("tiny", load_task("legal", n_train=32), method="lora", r=4, max_steps=3, batch_size=4,
                    max_val_examples=4, output_dir=out, device="cpu", learning_rate=5e-3)


@pytest.fixture(scope="module")
def exports(run, tmp_path_factory):
    root = tmp_path_factory.mktemp("exports")
    return {f: export(run, f, root/f, n_calibration=8) for f in ("merged", "gptq", "awq", "bnb4")}


def _keys(folder):
    with safe_open(str(Path(folder)/"model.safetensors"), "pt") as f: return set(f.keys())


def _logits(model, tok, text="The provider may terminate your account at any time."):
    with torch.no_grad(): return model(**tok(text, return_tensors="pt")).logits.float()


def test_merged_equals_base_plus_adapter(run, exports):
    peft_model, tok = load_trained(run, device="cpu")
    merged, _ = load_export(exports["merged"].output_dir, device="cpu")
    assert not any("lora" in k for k in _keys(exports["merged"].output_dir))
    ref = _logits(peft_model, tok)
    # saved as bfloat16: the merged weights differ from the float32 adapter model only by that rounding
    assert (_logits(merged, tok) - ref).abs().max() < 0.05 * ref.abs().max()
    fp32 = merged_model(run)[0]
    assert torch.allclose(_logits(fp32, tok), ref, atol=1e-4)


def test_quantized_formats_are_4bit_on_disk_and_track_the_merged_model(exports, run):
    tok = load_export(exports["merged"].output_dir, device="cpu")[1]
    ref = _logits(load_export(exports["merged"].output_dir, device="cpu")[0], tok)
    for f in ("gptq", "awq"):
        info = read_export(exports[f].output_dir)
        assert info["quantization"]["group_size"] == 64 and info["quantization"]["n_calibration"] == 8
        keys = _keys(exports[f].output_dir)
        assert "model.layers.0.mlp.down_proj.weight_packed" in keys and "model.layers.0.mlp.down_proj.weight" not in keys
        assert json.loads((Path(exports[f].output_dir)/"config.json").read_text())["quantization_config"]["quant_method"] == "compressed-tensors"
        assert exports[f].size_mb < exports["merged"].size_mb
        m, _ = load_export(exports[f].output_dir, device="cpu")
        out = _logits(m, tok)
        assert torch.isfinite(out).all() and torch.corrcoef(torch.stack([out.flatten(), ref.flatten()]))[0, 1] > 0.9
        plain, _ = load_model(exports[f].output_dir, device="cpu") # what `evaluate(folder)` loads: the packed weights, not random ones
        assert torch.equal(_logits(plain, tok), out)
    m, _ = load_export(exports["bnb4"].output_dir, device="cpu")
    assert type(m.model.layers[0].mlp.down_proj).__name__ == "Linear4bit"
    assert read_export(exports["bnb4"].output_dir)["quantization"]["bnb_4bit_quant_type"] == "nf4"


def test_model_card_records_source_license_settings_commands_and_scores(exports):
    from vrnx_nb.evaluation import evaluate
    folder = exports["gptq"].output_dir
    card = (Path(folder)/"README.md").read_text()
    for s in ("base model: `tiny`", "method: lora", "LoRA rank 4", "CC BY 4.0", "GPTQ", "group size 64",
              "vrnx train --model tiny", f"vrnx export --run", "--format gptq", "vllm serve", "Not measured yet"):
        assert s in card, s
    scores = evaluate(load_export(folder, device="cpu"), "legal", limit=8, method="lora gptq")
    write_card(folder, [scores])
    card = (Path(folder)/"README.md").read_text()
    lo, hi = scores.ci["accuracy"]
    assert f"| lora gptq | legal | test | accuracy | {scores.metrics['accuracy']:.3f} | [{lo:.3f}, {hi:.3f}] | 8 |" in card
    assert read_export(folder)["scores"][0]["n"] == 8


def test_existing_folder_is_refused_unless_overwrite(run, tmp_path):
    out = tmp_path/"m"; out.mkdir(); (out/"keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="overwrite=True"): export(run, "merged", out)
    assert (out/"keep.txt").exists()
    res = export(run, "merged", out, overwrite=True)
    assert not (out/"keep.txt").exists() and (out/"config.json").exists() and res.format == "merged"
    assert not list(tmp_path.glob(".m.tmp-*"))   # no temporary folder left behind


def test_format_the_libraries_cannot_produce(run, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="format: expected one of"): export(run, "gguf", tmp_path/"x")
    real = deploy._find_spec
    monkeypatch.setattr(deploy, "_find_spec", lambda n: None if n == "llmcompressor" else real(n))
    with pytest.raises(ImportError, match=r"pip install --no-deps llmcompressor==0\.14\.0\.1"): export(run, "awq", tmp_path/"x")
    monkeypatch.setattr(deploy, "_find_spec", lambda n: None if n == "bitsandbytes" else real(n))
    with pytest.raises(ImportError, match="pip install bitsandbytes"): export(run, "bnb4", tmp_path/"x")
    assert not (tmp_path/"x").exists()


def test_adapter_whose_base_does_not_match(run, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM, AutoTokenizer
    other = tmp_path/"wide"
    LlamaForCausalLM(LlamaConfig(vocab_size=1024, hidden_size=96, intermediate_size=192, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(other)
    AutoTokenizer.from_pretrained(tiny_model_path()).save_pretrained(other)
    with pytest.raises(ValueError, match=r"trained on '.*tiny-llama.*'\) does not fit base '.*wide': layer 'model\.layers\.0\.[\w.]+' is (96|192)->(96|192) in the base, the adapter expects (64|128)->(64|128)"):
        export(run, "merged", tmp_path/"out", base=str(other))
    bare = tmp_path/"adapter"; bare.mkdir()   # a bare peft adapter folder (no vrnx run files)
    for f in ("adapter_config.json", "adapter_model.safetensors"): shutil.copy(Path(run.output_dir)/f, bare/f)
    with pytest.raises(ValueError, match="does not fit base"): export(bare, "merged", tmp_path/"out", base=str(other))
    assert export_source(bare).base_model == str(tiny_model_path())
    assert export(bare, "merged", tmp_path/"ok").method == "lora"


def test_other_bad_inputs(run, tmp_path):
    with pytest.raises(ValueError, match="pass task="): export("tiny", "gptq", tmp_path/"q")
    with pytest.raises(TypeError, match="unknown argument"): export(run, "merged", tmp_path/"q", rank=3)
    with pytest.raises(ValueError, match="ExportConfig.dtype"): export(run, "merged", tmp_path/"q", dtype="int3")
    with pytest.raises(ValueError, match="group_size 48 does not divide"): export(run, "gptq", tmp_path/"q", group_size=48, n_calibration=4)
    from vrnx_nb.bottleneck import BottleneckModel, BottleneckConfig
    bott = tmp_path/"bott"; BottleneckModel(tiny_model()[0], BottleneckConfig(r=4)).save_pretrained(bott)  # a real adapter folder
    with pytest.raises(ValueError, match="non-linear"): export(bott, "merged", tmp_path/"q")
    with pytest.raises(ValueError, match="not a vrnx export folder"): read_export(tmp_path)


def test_cli(run, tmp_path, capsys):
    out = tmp_path/"cli"
    assert main_export(["--run", run.output_dir, "--format", "gptq", "--out", str(out), "--n-calibration", "4"]) == 0
    assert read_export(out)["format"] == "gptq" and "transformers serve" in capsys.readouterr().out
    assert main_export(["--run", run.output_dir, "--format", "gptq", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main_export(["--model", "tiny", "--out", str(tmp_path/"base"), "--dtype", "float32"]) == 0
    assert read_export(tmp_path/"base")["method"] == "base"
    with pytest.raises(SystemExit): main_export(["--run", run.output_dir, "--format", "gguf"])


def test_served_export_answers_an_openai_request(exports):
    from openai import OpenAI
    with serve_export(exports["gptq"].output_dir, env={"OMP_NUM_THREADS": "1"}, cb_num_blocks=8) as ep:
        assert ep.base_url.startswith("http://127.0.0.1:")
        client = OpenAI(base_url=ep.base_url, api_key="none", timeout=60)
        reply = client.chat.completions.create(model=ep.model, max_tokens=5, temperature=0,
                                               messages=[{"role": "user", "content": "Is this clause unfair? We may end your account."}])
    assert reply.choices[0].message.content is not None and reply.usage.completion_tokens >= 1


# a user's own task (not bundled): the run keeps it in task.json, so gptq/awq calibrate on it without the data file
_QUESTIONS = {"drug": "Can I take {} with ibuprofen?", "diet": "Is {} safe to eat every day?"}
_ROWS = [{"question": q.format(w), "topic": t} for t, q in _QUESTIONS.items()
         for w in ("garlic", "rice", "eggs", "coffee", "honey", "salmon", "tofu", "milk", "oats", "kale", "beans", "nuts")]


@pytest.fixture(scope="module")
def user_task():
    from vrnx_nb.tasks import make_task
    return make_task("mediqa", _ROWS, "classification", "Name the topic of this health question.",
                     input_field="question", target_field="topic")


@pytest.fixture(scope="module")
def user_run(user_task, tmp_path_factory):
    return finetune("tiny", user_task, method="lora", r=4, max_steps=1, batch_size=4, max_val_examples=4,
                    output_dir=tmp_path_factory.mktemp("user")/"run", device="cpu")


def _old_run(user_run, tmp_path):
    "A copy of the run as runs were before finetune kept task.json."
    old = tmp_path/"old"; shutil.copytree(user_run.output_dir, old); (old/"task.json").unlink()
    return old


def test_run_on_a_user_task_exports_as_gptq_from_its_own_task(user_run, user_task, tmp_path):
    from vrnx_nb.deploy import export_task
    res = export(user_run, "gptq", tmp_path/"q", n_calibration=8)   # no task=: it comes from the run's task.json
    info = read_export(res.output_dir)
    assert res.task == "mediqa" and info["quantization"]["n_calibration"] == 8
    assert info["quantization"]["calibration_data"] == "train split of task 'mediqa', kept with the run (task.json)"
    assert "model.layers.0.mlp.down_proj.weight_packed" in _keys(res.output_dir)
    assert (tmp_path/"q"/"config.json").exists() and (tmp_path/"q"/"tokenizer.json").exists()
    assert "--task" not in info["commands"][-1] and "label_calibration" not in info
    card = (tmp_path/"q"/"README.md").read_text()
    assert "on the mediqa task" in card and "## Label decisions" not in card
    assert "# trained in Python on the user task 'mediqa'" in card   # not a `vrnx train --task mediqa` that cannot run
    m, tok = load_export(res.output_dir, device="cpu")
    assert hasattr(m.model.layers[0].mlp.down_proj, "weight_packed") and torch.isfinite(_logits(m, tok, "Is rice safe?")).all()
    # the task it calibrated on is the run's: same train examples as the user's task
    kept, origin = export_task(user_run)
    assert origin == "run" and [e.input for e in kept.train] == [e.input for e in user_task.train] and kept.labels == user_task.labels
    assert export_task(user_run, "mediqa")[1] == "run" and export_task(user_run, "legal")[0].name == "legal"   # a bundled name as before
    with pytest.raises(ValueError, match=r"'mediqa2' is neither a bundled task .* nor the task this run kept \('mediqa'"):
        export(user_run, "gptq", tmp_path/"bad", task="mediqa2")
    assert not (tmp_path/"bad").exists()


def test_old_run_on_a_user_task_says_what_is_missing_and_data_file_calibrates(user_run, user_task, tmp_path, capsys):
    old = _old_run(user_run, tmp_path)
    with pytest.raises(ValueError, match=r"'mediqa' is not a bundled task .* has no task\.json .* pass task= a Task .*--data FILE"):
        export(old, "gptq", tmp_path/"q")
    assert export(old, "merged", tmp_path/"m").task == "mediqa"   # merged needs no calibration data
    res = export(old, "gptq", tmp_path/"given", task=user_task, n_calibration=4)   # the Python fix
    assert read_export(res.output_dir)["quantization"]["calibration_data"] == "train split of task 'mediqa', given to export"
    data = tmp_path/"mediqa.jsonl"; data.write_text("\n".join(json.dumps(r) for r in _ROWS) + "\n")
    args = ["--run", str(old), "--format", "gptq", "--out", str(tmp_path/"cli"), "--data", str(data),
            "--input-field", "question", "--target-field", "topic", "--n-calibration", "4"]
    assert main_export(args) == 2 and "pass --kind and --instruction" in capsys.readouterr().err
    assert main_export(args + ["--kind", "classification", "--instruction", user_task.instruction]) == 0
    info = read_export(tmp_path/"cli")
    assert info["task"] == "mediqa" and (tmp_path/"cli"/"model.safetensors").exists()
    assert info["quantization"]["calibration_data"].startswith("train split of task 'mediqa', given to export: --data ")
    # the recorded command rebuilds the folder
    import shlex
    assert main_export(shlex.split(info["commands"][-1])[2:] + ["--overwrite"]) == 0
    assert read_export(tmp_path/"cli")["quantization"]["n_calibration"] == 4
    assert main_export(["--run", str(old), "--format", "gptq", "--out", str(tmp_path/"x")]) == 2
    assert "--data FILE" in capsys.readouterr().err and not (tmp_path/"x").exists()


def test_calibration_json_travels_with_the_export_and_the_card_names_it(user_run, user_task, tmp_path):
    from vrnx_nb.calibration import CALIBRATION_FILE, calibrate, load_calibration
    run = tmp_path/"run"; shutil.copytree(user_run.output_dir, run)   # the module's run stays uncalibrated
    cal = calibrate(str(run), user_task, batch_size=4)
    assert (run/CALIBRATION_FILE).exists()
    res = export(run, "merged", tmp_path/"m")
    out = Path(res.output_dir)
    assert (out/CALIBRATION_FILE).read_bytes() == (run/CALIBRATION_FILE).read_bytes()
    assert load_calibration(out) == cal
    info = read_export(out)
    assert info["label_calibration"]["file"] == CALIBRATION_FILE and info["label_calibration"]["offsets"] == cal.offsets
    card = (out/"README.md").read_text()
    assert "## Label decisions" in card and "calibrated: `calibration.json`" in card
    assert f"fitted on the val split ({cal.n} examples)" in card and f"load_calibration({str(out)!r})" in card
    write_card(out, [])   # rewriting the card keeps the note
    assert "calibrated: `calibration.json`" in (out/"README.md").read_text()
    (run/CALIBRATION_FILE).write_text('{"labels": ["a"]}')   # a broken file fails before any work
    with pytest.raises(ValueError, match="calibration.json: not a vrnx calibration file"): export(run, "merged", tmp_path/"b")
    assert not (tmp_path/"b").exists()
