"""Downstream tasks through lm-evaluation-harness: the adapter's scores are the model's own, batching
does not change them, and a local multiple-choice task runs end to end without the network."""

from __future__ import annotations

import dataclasses
import json
import math
import sys

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'moectl[eval]')")

from lm_eval.api.instance import Instance  # noqa: E402

from moectl.core import RoutingMode  # noqa: E402
from moectl.errors import MoectlError  # noqa: E402
from moectl.eval import harness  # noqa: E402
from moectl.eval.harness import MoectlLM, run_tasks, score_windows  # noqa: E402
from moectl.runs import load_run  # noqa: E402

DOCS = [
    ("def add(a, b):\n    return a", [" + b", " - b", " * b", " / b"], 0),
    ("import os\nimport", [" sys", " 42", " (", " ]"], 0),
    ("for i in range(10):\n    print(", ["i)", "1]", "+ +", "def"], 0),
    ("class Queue:\n    def __init__(self", ["):", "]]", "+=", "11"], 0),
    ("if x is None:\n    return", [" None", " ::", " ]]", " 7("], 0),
    ("    # Return the", [" result", " ))((", " ==", " 0x"], 0),
    ("while True:\n    ", ["break", "))", "==", "]]"], 0),
    ("try:\n    pass\nexcept", [" ValueError:", " 12", " ))", " =="], 0),
    ("x = [1, 2,", [" 3]", " def", " class", " import"], 0),
    ("def __repr__(self):\n    return", [" '%s'", " 99", " ]]", " (("], 0),
]


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch):
    """Nothing reaches the network and no cache lands in the user's home."""
    hf = tmp_path / "hf-home"
    for key, value in {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(hf),
                       "HF_DATASETS_CACHE": str(hf / "datasets"), "HF_HUB_CACHE": str(hf / "hub")}.items():
        monkeypatch.setenv(key, value)
    try:  # already imported by another test: its settings were read then
        import datasets.config as dc
    except ImportError:
        return hf
    monkeypatch.setattr(dc, "HF_DATASETS_OFFLINE", True, raising=False)
    monkeypatch.setattr(dc, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(dc, "HF_DATASETS_CACHE", hf / "datasets", raising=False)
    monkeypatch.setattr(dc, "DOWNLOADED_DATASETS_PATH", hf / "datasets" / "downloads", raising=False)
    monkeypatch.setattr(dc, "EXTRACTED_DATASETS_PATH", hf / "datasets" / "downloads" / "extracted", raising=False)
    monkeypatch.setattr(dc, "HF_MODULES_CACHE", hf / "modules", raising=False)
    return hf


@pytest.fixture(scope="module")
def run(trained_run):
    return load_run(trained_run)


@pytest.fixture
def task_dir(tmp_path):
    """A folder holding a local multiple-choice task, tiny_mc, over a local JSON-lines file."""
    folder = tmp_path / "tasks"
    folder.mkdir()
    data = folder / "tiny_mc.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "label": y}) + "\n" for q, c, y in DOCS))
    (folder / "tiny_mc.yaml").write_text(f"""\
task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")
    return folder


def ll_requests(pairs):
    return [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]


def direct_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log p(ids[j] | ids[:j]) for j >= 1, from one plain forward."""
    with torch.no_grad():
        logits = model(torch.tensor([ids[:-1]])).logits[0].float()
    return logits.log_softmax(-1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]


# --------------------------------------------------------------------------- the adapter's numbers


def test_loglikelihood_is_the_models_own(run):
    lm = MoectlLM(run, batch_size=4, log=None)
    tok, seq_len = run.tokenizer, run.model.args.seq_len
    long_context = "def f(x):\n    return x + 1\n" * 8 + "def g(y):"
    pairs = [("def add(a, b):\n    return", " a + b"), ("import", " os"), (long_context, "\n    return y")]
    got = lm.loglikelihood(ll_requests(pairs))
    for (ctx, cont), (logprob, _) in zip(pairs, got, strict=True):
        c, t = tok.encode(ctx), tok.encode(cont)
        ids = (c + t)[-(seq_len + 1):]   # left-truncated to the trained window
        assert len(c + t) <= seq_len + 1 or ctx is long_context
        want = direct_logprobs(run.model, ids)[-len(t):].sum().item()
        assert logprob == pytest.approx(want, abs=1e-4)
    assert len(tok.encode(long_context)) > seq_len   # the truncation was exercised


def test_trailing_whitespace_of_the_context_goes_to_the_continuation(run):
    lm = MoectlLM(run, log=None)
    assert lm.encode_pair("import ", "os") == lm.encode_pair("import", " os")
    (a, _), (b, _) = lm.loglikelihood(ll_requests([("import ", "os"), ("import", " os")]))
    assert a == b


def test_empty_context_conditions_on_end_of_text(run):
    lm = MoectlLM(run, log=None)
    (logprob, _), = lm.loglikelihood(ll_requests([("", "import os")]))
    ids = [run.tokenizer.eot_id, *run.tokenizer.encode("import os")]
    assert logprob == pytest.approx(direct_logprobs(run.model, ids).sum().item(), abs=1e-4)


def test_is_greedy(run):
    """A continuation made of the model's own argmax tokens is greedy; change one token and it is not."""
    tok, model = run.tokenizer, run.model
    ids = tok.encode("def add(a, b):\n    return")
    context_len = len(ids)
    for _ in range(3):
        with torch.no_grad():
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    greedy_text = tok.decode(ids[context_len:])
    assert tok.encode(greedy_text) == ids[context_len:], "the greedy tokens do not re-encode to themselves"
    with torch.no_grad():
        worst = int(model(torch.tensor([ids[:context_len]])).logits[0, -1].argmin())
    other_text = tok.decode([worst, *ids[context_len + 1:]])
    context = tok.decode(ids[:context_len])
    lm = MoectlLM(run, log=None)
    (lp_greedy, greedy), (lp_other, other) = lm.loglikelihood(ll_requests([(context, greedy_text),
                                                                          (context, other_text)]))
    assert greedy is True and other is False
    assert lp_greedy > lp_other


def test_batching_and_padding_change_nothing(run):
    contexts = ["", "def", "import os\nimport sys\n", "class A:\n    def f(self):\n        return self.x\n" * 3]
    pairs = [(c, e) for c in contexts for e in [" x", " None", "\n    return 1"]]
    one = MoectlLM(run, batch_size=1, log=None).loglikelihood(ll_requests(pairs))
    four = MoectlLM(run, batch_size=4, log=None).loglikelihood(ll_requests(pairs))
    assert [g for _, g in one] == [g for _, g in four]
    assert [lp for lp, _ in one] == pytest.approx([lp for lp, _ in four], abs=1e-5)


def test_a_capacity_limit_does_not_couple_requests(run):
    """With a capacity limit, padding and neighbours in a batch must not change a score either."""
    layers = run.model.routed_layers()
    saved = [layer.capacity_factor for layer in layers]
    try:
        for layer in layers:
            layer.capacity_factor = 0.5
        pairs = [("def", " f(x):"), ("import os\nimport sys\nfrom collections import", " deque"), ("", "x = 1")]
        one = MoectlLM(run, batch_size=1, log=None).loglikelihood(ll_requests(pairs))
        three = MoectlLM(run, batch_size=3, log=None).loglikelihood(ll_requests(pairs))
        assert [lp for lp, _ in one] == pytest.approx([lp for lp, _ in three], abs=1e-5)
    finally:
        for layer, value in zip(layers, saved, strict=True):
            layer.capacity_factor = value


def test_rolling_loglikelihood_of_a_short_text(run):
    text = "def f(x):\n    return x"
    ids = [run.tokenizer.eot_id, *run.tokenizer.encode(text)]
    assert len(ids) <= run.model.args.seq_len + 1   # one window
    lm = MoectlLM(run, log=None)
    got, = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    assert got == pytest.approx(direct_logprobs(run.model, ids).sum().item(), abs=1e-4)


def test_rolling_loglikelihood_of_a_long_text_scores_every_token_once(run):
    """Past one window, the rolling score is the sum of disjoint windows; it equals the
    loglikelihood of the whole text as a continuation of the empty context."""
    text = "import os\n\ndef walk(top):\n    for name in os.listdir(top):\n        yield name\n" * 3
    assert len(run.tokenizer.encode(text)) > 2 * run.model.args.seq_len
    lm = MoectlLM(run, batch_size=2, log=None)
    rolling, = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    (as_continuation, _), = lm.loglikelihood(ll_requests([("", text)]))
    assert rolling == pytest.approx(as_continuation, abs=1e-4)
    assert rolling < 0 and math.isfinite(rolling)


def test_score_windows_cover_every_target_once():
    tokens = list(range(100, 100 + 23))
    for seq_len in (1, 4, 7, 32):
        for start in (1, 5, 22):
            predicted = []
            for inputs, targets in score_windows(tokens, start, seq_len):
                assert 1 <= len(inputs) <= seq_len and 1 <= len(targets) <= len(inputs)
                first = tokens.index(inputs[0])
                assert inputs == tokens[first:first + len(inputs)]
                # the last len(targets) inputs are each followed by their target
                assert targets == tokens[first + len(inputs) - len(targets) + 1:first + len(inputs) + 1]
                predicted += targets
            assert predicted == tokens[start:]


def test_generate_until_is_greedy_and_stops(run):
    tok, model = run.tokenizer, run.model
    context = "def add(a, b):\n    "
    ids = tok.encode(context)
    for _ in range(8):
        with torch.no_grad():
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    new = ids[len(tok.encode(context)):]
    if tok.eot_id in new:
        new = new[:new.index(tok.eot_id)]
    lm = MoectlLM(run, log=None)
    reqs = [Instance("generate_until", {}, (context, {"until": ["\n", "):"], "max_gen_toks": 8}), 0),
            Instance("generate_until", {}, (context, {"until": [], "max_gen_toks": 3}), 1)]
    stopped, free = lm.generate_until(reqs)
    text = tok.decode(new)
    cut = min([text.index(u) for u in ("\n", "):") if u in text] + [len(text)])
    assert stopped == text[:cut]
    assert free == tok.decode(new[:3])


def test_a_non_causal_router_gets_forwards_of_its_own(run):
    pairs = [("def", " f(x):"), ("import os\nimport", " sys"), ("", "x = 1")]
    together = MoectlLM(run, batch_size=8, log=None).loglikelihood(ll_requests(pairs))
    routers = [layer.router for layer in run.model.routed_layers()]
    shapes = []
    hook = run.model.register_forward_hook(lambda module, args, out: shapes.append(tuple(args[0].shape)))
    try:
        for router in routers:
            router.causal = False   # as expert_choice declares
        kwargs, reason = harness.forward_mode(run.model)
        alone = MoectlLM(run, batch_size=8, log=None).loglikelihood(ll_requests(pairs))
    finally:
        hook.remove()
        for router in routers:
            del router.causal
    assert reason and "not causal" in reason and kwargs == {"mode": RoutingMode(decoding=True)}
    assert len(shapes) == 3 and all(b == 1 for b, _ in shapes)   # one unpadded window per forward
    assert [lp for lp, _ in alone] == pytest.approx([lp for lp, _ in together], abs=1e-5)


# --------------------------------------------------------------------------- tasks end to end


def test_a_local_task_runs(run, task_dir, offline):
    result = run_tasks(run, ["tiny_mc"], include_path=task_dir, batch_size=4, log=None)
    json.dumps(result, allow_nan=False)   # plain JSON
    acc = result["results"]["tiny_mc"]["acc"]
    assert 0.0 <= acc <= 1.0
    assert "acc_stderr" in result["results"]["tiny_mc"]
    assert result["n_samples"]["tiny_mc"] == {"original": len(DOCS), "effective": len(DOCS)}
    assert result["n_shot"]["tiny_mc"] == 0
    assert result["settings"]["limit"] is None and result["settings"]["lm_eval"]
    assert result["settings"]["seq_len"] == run.model.args.seq_len
    assert any(offline.rglob("*.arrow"))   # the datasets cache went to the test's folder


def test_limit_limits_the_documents(run, task_dir, monkeypatch):
    seen = []
    original = MoectlLM.loglikelihood

    def spy(self, requests, *args, **kwargs):
        seen.extend(requests)
        return original(self, requests, *args, **kwargs)

    monkeypatch.setattr(MoectlLM, "loglikelihood", spy)
    lines = []
    result = run_tasks(run, "tiny_mc", include_path=task_dir, limit=3, log=lines.append)
    assert result["n_samples"]["tiny_mc"] == {"original": len(DOCS), "effective": 3}
    assert result["settings"]["limit"] == 3
    assert len({r.doc_id for r in seen}) == 3 and len(seen) == 3 * 4   # 3 documents, 4 choices each
    assert any("tiny_mc" in line for line in lines)


# --------------------------------------------------------------------------- errors


@pytest.mark.slow   # scanning lm-eval's registry of tasks takes seconds
def test_unknown_tasks_are_named_with_close_matches(run, task_dir, tmp_path):
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(MoectlError) as e:
        run_tasks(run, ["tiny_mcc", "hellaswg"], include_path=task_dir, log=None)
    assert e.value.exit_code == 2
    assert "'tiny_mcc'" in e.value.message and "tiny_mc" in e.value.message.split("'tiny_mcc'")[1]
    assert "'hellaswg'" in e.value.message and "hellaswag" in e.value.message
    assert sorted(tmp_path.rglob("*")) == before   # nothing written


def test_a_run_without_tokenizer_is_refused(run, task_dir):
    with pytest.raises(MoectlError, match="tokenizer") as e:
        run_tasks(dataclasses.replace(run, tokenizer=None), ["tiny_mc"], include_path=task_dir, log=None)
    assert e.value.exit_code == 2


@pytest.mark.parametrize("kwargs, match", [({"limit": 0}, "limit"), ({"batch_size": 0}, "batch size"),
                                           ({"include_path": "/no/such/folder"}, "does not exist"),
                                           ({"include_path": __file__}, "not a folder")])
def test_bad_settings_are_refused(run, kwargs, match):
    with pytest.raises(MoectlError, match=match) as e:
        run_tasks(run, ["tiny_mc"], log=None, **kwargs)
    assert e.value.exit_code == 2


def test_without_lm_eval_says_what_to_install(run, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)   # makes `import lm_eval` fail
    with pytest.raises(MoectlError) as e:
        harness.run_tasks(run, ["tiny_mc"], log=None)
    assert e.value.exit_code == 2 and "-m pip install 'lm-eval>=0.4'" in e.value.render()


def test_eval_command_runs_tasks_and_refuses_unknown_ones(trained_run, task_dir, tmp_path, cli):
    out = tmp_path / "out"
    r = cli("eval", trained_run, "--tasks", "tiny_mc", "--task-path", task_dir, "--limit", "3", "--batches", "1",
            "--no-robustness", "--no-plots", "--out", out)
    assert r.exit_code == 0, r.output
    res = json.loads((out / "results.json").read_text())
    assert 0 <= res["tasks"]["results"]["tiny_mc"]["acc"] <= 1
    assert res["tasks"]["n_samples"]["tiny_mc"]["effective"] == 3
    assert "downstream tasks" in r.stdout and "tiny_mc" in r.stdout
    bad = tmp_path / "bad"
    r = cli("eval", trained_run, "--tasks", "tiny_mx", "--task-path", task_dir, "--out", bad, "-q")
    assert r.exit_code == 2 and "tiny_mc" in r.stderr      # the close match is named
    assert not bad.exists()
