"""Generation: batching, shared prefixes, continuous batching and the plain fallback give the replies and
log-likelihoods of the model on each prompt alone; `Rows` keeps a running batch's per-row tensors together."""
from dataclasses import replace
from unittest import mock

import numpy as np
import pytest
import torch

import vrnx_nb.generation as G
from vrnx_nb.tasks import load_task, render_prompt, render_pair
from vrnx_nb.models import tiny_model
from vrnx_nb.generation import (generate_batched, label_logliks, Rows, _length_groups, _prefix_clusters, _common_len)


@pytest.fixture(scope="module")
def varied():
    "The tiny model with weights redrawn at a larger scale: its greedy replies differ from prompt to prompt."
    model, tok = tiny_model()
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters(): p.normal_(0, 0.3 if p.dim() > 1 else 1.0)
    return model, tok


@pytest.fixture(scope="module")
def legal(): return load_task("legal")


@pytest.fixture(scope="module")
def finance(): return load_task("finance")


# --- batching --------------------------------------------------------------------------------------------------------

def test_length_groups_bound_padding():
    lengths = [1181, 395, 1179, 381, 90, 100]
    groups = _length_groups(lengths, 1.25)
    assert sorted(i for g in groups for i in g) == list(range(6))
    for g in groups: assert max(lengths[i] for i in g) <= 1.25 * min(lengths[i] for i in g)
    assert len(groups) == 3


@pytest.mark.parametrize("name,n", [("legal", 24), ("finance", 6)])
def test_batch_1_and_16_same_outputs(varied, name, n):
    "Finance prompts range from ~300 to ~1,600 tokens: prefill groups and stitched caches are exercised."
    model, tok = varied
    task = load_task(name)
    prompts = [render_prompt(task, e, tok) for e in task.test[:n]]
    # no stop tokens: the random tiny model may end at once on some tasks; here every row writes 10 tokens
    one = generate_batched(model, tok, prompts, batch_size=1, max_new_tokens=10, sort=False, stop=set(), return_ids=True)
    many = generate_batched(model, tok, prompts, batch_size=16, max_new_tokens=10, stop=set(), return_ids=True)
    assert one == many
    assert all(len(x) == 10 for x in one) and len({tuple(x) for x in one}) > 1  # not a degenerate constant output


def test_questions_on_one_table_share_their_context(varied, finance):
    "Finance prompts put the report first: questions on one table share ~1,000 tokens, computed once, with the same replies."
    model, tok = varied
    exs = finance.test[:14]  # 6 + 6 + 2 questions on three tables
    prompts = [render_prompt(finance, e, tok) for e in exs]
    enc = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    clusters = _prefix_clusters(enc, _common_len(enc), 32)  # past the instruction all prompts share
    assert sorted(len(c) for c in clusters) == [2, 6, 6]
    assert all(len({exs[i].meta["table_uid"] for i in c}) == 1 for c in clusters)
    with mock.patch.object(G, "_extend_prefix", wraps=G._extend_prefix) as extend:
        many = generate_batched(model, tok, prompts, batch_size=16, max_new_tokens=8, stop=set(), return_ids=True)
    assert extend.call_count == 3  # each table's context computed once
    for p, got in zip(prompts, many):  # the plain loop: `model.generate` on each prompt alone
        x = tok(p, add_special_tokens=False, return_tensors="pt")
        out = model.generate(**x, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
        assert got == out[0, x["input_ids"].shape[1]:].tolist()
    comps = [" 12.5 million<|im_end|>", " 3.2%<|im_end|>", " Revenue<|im_end|>"]
    np.testing.assert_allclose(label_logliks(model, tok, prompts, comps, batch_size=16),
                               label_logliks(model, tok, prompts, comps, batch_size=1, share_prefix=False), atol=1e-3)


def test_early_stopped_rows_match_generate(varied, legal):
    "A row that hits the stop token leaves the batch; the others continue exactly as `model.generate` does alone."
    model, tok = varied
    prompts = [render_prompt(legal, e, tok) for e in legal.test[:6]]
    enc0 = tok(prompts[0], add_special_tokens=False)["input_ids"]
    # make a common generated token a stop token so that rows finish at different steps
    first = generate_batched(model, tok, prompts, batch_size=1, max_new_tokens=6, stop=set())
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in first]
    stop = {ids[0][1]} if len(ids[0]) > 1 else {ids[0][0]}
    batched = generate_batched(model, tok, prompts, batch_size=16, max_new_tokens=6, stop=stop)
    for p, got in zip(prompts, batched):
        x = tok(p, add_special_tokens=False, return_tensors="pt")
        out = model.generate(**x, max_new_tokens=6, do_sample=False, eos_token_id=sorted(stop),
                             pad_token_id=tok.pad_token_id)
        new = [t for t in out[0, x["input_ids"].shape[1]:].tolist()]
        cut = next((i for i, t in enumerate(new) if t in stop), len(new))
        assert got == tok.decode(new[:cut], skip_special_tokens=True).strip()
    assert any(len(b) < len(f) for b, f in zip(batched, first))  # some row really stopped early


def test_loglik_batch_invariant_and_matches_forward(varied):
    model, tok = varied
    legal = load_task("legal")
    prompts = [render_prompt(legal, e, tok) for e in legal.test[:10]]
    comps = [render_pair(legal, replace(legal.test[0], target=l), tok)["completion"] for l in legal.labels]
    a = label_logliks(model, tok, prompts, comps, batch_size=1)
    b = label_logliks(model, tok, prompts, comps, batch_size=16)
    np.testing.assert_allclose(a, b, atol=1e-3)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    for i in (3, 7):  # every label scored alone by a plain forward pass: the packed, block-masked scoring agrees
        p = tok(prompts[i], add_special_tokens=False)["input_ids"]
        for j, comp in enumerate(comps):
            c = tok(comp, add_special_tokens=False)["input_ids"]; c = c[:c.index(end) + 1]
            with torch.no_grad(): lp = torch.log_softmax(model(torch.tensor([p + c])).logits[0], -1)
            assert abs(b[i, j] - sum(lp[len(p) - 1 + k, t].item() for k, t in enumerate(c))) < 1e-3, (i, j)


def test_bottleneck_adapter_model_generates_batch_invariant(legal):
    "The training module's bottleneck wrapper (forward(*args, **kwargs)) goes through the same batched decoding."
    from vrnx_nb import training  # the package's own module: a broken import fails here, it is not skipped
    model, tok = tiny_model()
    torch.manual_seed(0)
    wrapped = training.BottleneckModel(model, training.BottleneckConfig(r=8)).eval()
    with torch.no_grad():
        for n, p in wrapped.named_parameters():
            if "adapter" in n: p.normal_(0, 0.5)
    prompts = [render_prompt(legal, e, tok) for e in legal.test[:6]]
    one = generate_batched(wrapped, tok, prompts, batch_size=1, max_new_tokens=5, stop=set(), return_ids=True)
    assert one == generate_batched(wrapped, tok, prompts, batch_size=16, max_new_tokens=5, stop=set(), return_ids=True)
    from vrnx_nb.evaluation import evaluate
    s = evaluate((wrapped, tok), legal, limit=4, n_boot=20, method="adapter")
    assert s.n == 4 and s.method == "adapter"


def test_rows_join_a_running_batch_with_the_same_replies(varied, legal):
    "Continuous batching: when rows stop, waiting prompts are prefilled and join the batch mid-decode; same replies."
    model, tok = varied
    prompts = [render_prompt(legal, e, tok) for e in legal.test[:12]]
    first = generate_batched(model, tok, prompts, batch_size=1, max_new_tokens=8, stop=set(), return_ids=True)
    stop = {first[0][2], first[5][1]}  # rows end at different steps
    with mock.patch.object(G, "_join_rows", wraps=G._join_rows) as join:
        many = generate_batched(model, tok, prompts, batch_size=4, max_new_tokens=8, stop=stop, return_ids=True)
    assert join.call_count >= 1  # prompts really joined rows that were still writing
    one = generate_batched(model, tok, prompts, batch_size=1, max_new_tokens=8, stop=stop, return_ids=True)
    assert many == one
    assert len({len(x) for x in one}) > 2  # replies of several lengths: rows left at different steps


def test_shared_report_is_kept_once_not_per_row(varied, finance):
    "With questions on one report, the batch cache holds each row's own question; the ~600-token report sits once."
    model, tok = varied
    prompts = [render_prompt(finance, e, tok) for e in finance.test[:6]]  # six questions on one table
    enc = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    st = G._Cascade(model); st.prefixes[0] = G._shared_prefix(model, enc, G._cache_arg(model))
    clusters = G._prefix_clusters(enc, st.prefixes[0][0], 32)
    gid = G._prefix_ids(model, enc, list(range(6)), clusters, st, 32)
    assert len(set(gid)) == 1  # one shared prefix for all six (here the common prefix already spans the report)
    _, cache, mask, last = G._prefill(model, enc, tok.pad_token_id, st, gid)
    shared = st.prefixes[gid[0]][0]
    # rows hold tens of tokens; the report sits once
    assert shared > 500 and mask.shape[1] < 100 and min(map(len, enc)) > shared
    assert last.tolist() == [len(e) - 1 for e in enc]  # positions continue after the shared report


def test_models_that_cannot_split_attention_use_plain_batches(varied, legal):
    "A model whose attention cannot be split (here: logit soft-capping) is batched without shared prefixes, same replies."
    model, tok = tiny_model()
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters(): p.normal_(0, 0.3 if p.dim() > 1 else 1.0)
    assert G._cascade_ok(model)
    model.config.attn_logit_softcapping = 30.0  # a Gemma-2 style setting that the cascade attention does not implement
    G._CASCADE_OK.pop(model, None)
    assert not G._cascade_ok(model)
    prompts = [render_prompt(legal, e, tok) for e in legal.test[:6]]
    one = generate_batched(model, tok, prompts, batch_size=1, max_new_tokens=6, stop=set(), return_ids=True)
    assert one == generate_batched(model, tok, prompts, batch_size=16, max_new_tokens=6, stop=set(), return_ids=True)
    comps = [" Other<|im_end|>", " Arbitration<|im_end|>"]
    np.testing.assert_allclose(label_logliks(model, tok, prompts, comps, batch_size=1),
                               label_logliks(model, tok, prompts, comps, batch_size=16), atol=1e-3)


def test_unfused_attention_path_gives_the_same_replies(varied, finance):
    "Off a CPU the cascade attention runs as float32 matmuls (scores in chunks); forced here, the fused path's replies."
    model, tok = varied
    prompts = [render_prompt(finance, e, tok) for e in finance.test[:8]]  # 6 questions on one table, 2 on the next
    fused = generate_batched(model, tok, prompts, batch_size=16, max_new_tokens=6, stop=set(), return_ids=True)
    # small chunks: several per prefill
    with mock.patch.object(G, "_fused", lambda q: False), mock.patch.object(G, "_SCORES_PER_CHUNK", 4096):
        plain = generate_batched(model, tok, prompts, batch_size=16, max_new_tokens=6, stop=set(), return_ids=True)
    assert plain == fused
    one = generate_batched(model, tok, prompts, batch_size=1, max_new_tokens=6, stop=set(), return_ids=True,
                           share_prefix=False)
    assert fused == one


def test_half_precision_models_share_prefixes():
    "SmolLM2 in bfloat16 and float16 passes the cascade check (it failed when probed on special tokens: extreme logits)."
    from vrnx_nb.models import load_model
    for dtype in (torch.bfloat16, torch.float16):
        model, _ = load_model("smollm2-135m", dtype=dtype, device="cpu")
        assert G._cascade_ok(model), dtype


# --- Rows: the per-row tensors of a running batch ---------------------------------------------------------------------

def _hand_rows(mask, alive, gid=None, extra=2):
    "Rows over a one-layer cache whose keys are (prompt index + 1) on a row's tokens and 0 on its padding."
    mask = torch.tensor(mask)
    keys = (torch.tensor(alive, dtype=torch.float)[:, None, None, None] + 1) * mask[:, None, :, None].float()
    keys = keys.expand(-1, 1, -1, 2).contiguous()  # (rows, 1 head, L, head size 2)
    cache = G._kv_cache(None, None); cache.layers = [G._GrowingLayer(keys, -keys, extra)]
    alive = torch.tensor(alive)
    return Rows(cache, mask, mask.sum(1) + 9, alive + 100, alive, alive * 0, None if gid is None else torch.tensor(gid))


def test_rows_join_and_select_by_hand():
    "Worked by hand: rows of 2 and 1 own tokens (a column that pads both) joined with a row of 4, then picked apart."
    a = _hand_rows([[0, 1, 1], [0, 0, 1]], [0, 1], gid=[0, 0])
    b = _hand_rows([[1, 1, 1, 1]], [2], gid=[3])
    j = a.join(b, extra=2)
    assert len(j) == 3 and j.alive.tolist() == [0, 1, 2] and j.gid.tolist() == [0, 0, 3]
    assert j.nxt.tolist() == [100, 101, 102] and j.last.tolist() == [11, 10, 13] and j.count.tolist() == [0, 0, 0]
    assert j.mask.tolist() == [[0, 0, 1, 1], [0, 0, 0, 1], [1, 1, 1, 1]]  # the column that padded both rows is gone
    layer = j.cache.layers[0]
    assert layer.keys[:, 0, :, 0].tolist() == [[0, 0, 1, 1], [0, 0, 0, 2], [3, 3, 3, 3]]
    assert torch.equal(layer.values, -layer.keys) and layer._k.shape[-2] == 4 + 2  # room for 2 more tokens
    s = j.select(torch.tensor([2, 0]))
    assert s.alive.tolist() == [2, 0] and s.gid.tolist() == [3, 0] and s.mask.tolist() == [[1, 1, 1, 1], [0, 0, 1, 1]]
    assert s.cache.layers[0].keys[:, 0, :, 0].tolist() == [[3, 3, 3, 3], [0, 0, 1, 1]]
    assert s.cache.layers[0]._k.shape[-2] == 6  # selecting keeps the room
    none = s.select(torch.tensor([], dtype=torch.long))
    assert len(none) == 0 and none.mask.shape == (0, 4) and none.gid.tolist() == []
    plain = _hand_rows([[1, 1]], [5]).select(torch.tensor([0]))  # without a cascade there is no prefix key
    assert plain.gid is None and plain.alive.tolist() == [5]


def test_joined_rows_step_like_rows_prefilled_together(varied, legal):
    "Rows prefilled apart and joined, then some dropped, give each step the logits of rows prefilled together."
    model, tok = varied
    enc = [tok(render_prompt(legal, e, tok), add_special_tokens=False)["input_ids"] for e in legal.test[:5]]
    arg, pad = G._cache_arg(model), tok.pad_token_id
    st = G._Cascade(model); st.prefixes[0] = G._shared_prefix(model, enc, arg)
    singles = [[i] for i in range(5)]
    together = G._admit(model, enc, [0, 1, 2, 3, 4], pad, st, singles, None, 4)
    first, rest = (G._admit(model, enc, take, pad, st, singles, None, 4) for take in ([0, 1], [2, 3, 4]))
    joined = first.join(rest, 4)
    x, y = G._step(model, together, st, arg), G._step(model, joined, st, arg)
    torch.testing.assert_close(x, y, atol=1e-3, rtol=0)
    for i in (0, 3):  # the model on the prompt and its first greedy token alone
        with torch.no_grad(): alone = model(torch.tensor([enc[i] + [int(together.nxt[i])]])).logits[0, -1]
        torch.testing.assert_close(x[i], alone, atol=1e-3, rtol=0)
    together.nxt, joined.nxt = x.argmax(-1), y.argmax(-1)
    picked = joined.select(torch.tensor([4, 1]))
    torch.testing.assert_close(G._step(model, picked, st, arg), G._step(model, together, st, arg)[[4, 1]],
                               atol=1e-3, rtol=0)



# --- sampling per prompt (issue 17 item 6) ----------------------------------------------------------------------------

def test_sampler_same_seed_same_sample_at_any_batch_size_and_order(varied, legal):
    "Each prompt draws from its own generator: batch 1 in order and batch 4 sorted with refills give the same samples."
    model, tok = varied
    enc = [tok(render_prompt(legal, e, tok), add_special_tokens=False)["input_ids"] for e in legal.test[:10]]
    seeds = [50 + 3 * i for i in range(10)]
    alone = G._greedy_stream(model, enc, list(range(10)), 1, 8, set(), tok.pad_token_id, pick=G.Sampler(seeds, 0.8, 0.9))
    stop = {alone[1][2], alone[6][4]}  # rows end early and others join mid-decode
    cut = [s[:next((k for k, t in enumerate(s) if t in stop), len(s))] for s in alone]
    order = sorted(range(10), key=lambda i: -len(enc[i]))
    admits, admit = [], G._admit
    def counted(*a, **k): admits.append(1); return admit(*a, **k)
    with mock.patch.object(G, "_admit", counted):
        got = G._greedy_stream(model, enc, order, 4, 8, stop, tok.pad_token_id, pick=G.Sampler(seeds, 0.8, 0.9))
    assert got == cut and len(admits) > 1
    assert G._greedy_stream(model, enc, order, 4, 8, set(), tok.pad_token_id, pick=G.Sampler(seeds[::-1], 0.8, 0.9)) != alone
    greedy = G._greedy_stream(model, enc, order, 4, 8, set(), tok.pad_token_id)
    assert G._greedy_stream(model, enc, order, 4, 8, set(), tok.pad_token_id, pick=G.Sampler(seeds, 0)) == greedy


def test_sampler_constraint_sees_each_rows_own_prompt(varied, legal):
    "A per-prompt mask follows its prompt through sorting and refills, and is told exactly the tokens drawn."
    model, tok = varied
    prompts = [render_prompt(legal, e, tok) for e in legal.test[:6]]
    class Parity:
        seen = {}
        def mask_(self, rows, logits):
            ids = torch.arange(logits.shape[-1])
            for r, i in enumerate(rows): logits[r, ids % 2 != i % 2] = float("-inf")
        def accept(self, rows, tokens):
            for i, t in zip(rows, tokens): self.seen.setdefault(i, []).append(t)
    con, replies = Parity(), {}
    out = generate_batched(model, tok, prompts, batch_size=4, max_new_tokens=5, stop=set(), return_ids=True,
                           pick=G.Sampler(list(range(6)), 1.0, constraint=con), on_reply=lambda i, ids: replies.update({i: ids}))
    assert all(t % 2 == i % 2 for i, r in enumerate(out) for t in r) and all(len(r) == 5 for r in out)
    assert con.seen == dict(enumerate(out)) == replies
    with pytest.raises(ValueError, match="temperature must be >= 0"): G.Sampler([1], -1)
