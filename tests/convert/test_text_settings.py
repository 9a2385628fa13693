"""An imported model's text settings: its tokenizer's BOS is added where transformers adds it
(prompts, every document of training and evaluation data, lm-eval contexts), and its special
tokens, chat template, token ids and generation defaults go back out on export."""

from __future__ import annotations

import json

import pytest
import torch

from tests.convert.conftest import VARIANTS, hf_model, save_hf

CHAT = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
DOCS = ["the quick brown fox jumps over the lazy dog", "a stitch in time saves nine", "hello world, hello moe"]


def _llama_folder(root):
    """A tiny Llama whose tokenizer adds <s> before every text (as Llama's do), with a chat template,
    two end-of-sequence ids and sampling defaults."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(DOCS * 20, trainers.BpeTrainer(vocab_size=90, special_tokens=["<unk>", "<s>", "</s>"],
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    model = hf_model("llama", **VARIANTS[("llama", "base")], vocab_size=300, bos_token_id=1, eos_token_id=[2, 0])
    folder = save_hf(model, root / "hf")
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "chat_template": CHAT}))
    (folder / "generation_config.json").write_text(json.dumps({
        "bos_token_id": 1, "eos_token_id": [2, 0], "do_sample": True, "temperature": 0.6, "top_p": 0.9}))
    return model, folder


def test_prompts_and_documents_get_the_bos_transformers_gives(tmp_path):
    from transformers import AutoTokenizer

    from moectl.convert.importer import import_hf
    from moectl.core.generation import generate_ids
    from moectl.eval.runner import eval_data
    from moectl.runs import load_run

    model, src = _llama_folder(tmp_path)
    result = import_hf(src, tmp_path / "moectl")
    assert any("adds special tokens" in n for n in result.notes)
    run = load_run(tmp_path / "moectl")
    theirs = AutoTokenizer.from_pretrained(src)
    # a prompt: the same ids (BOS first), and the same greedy continuation
    for prompt in ("hello world", "a stitch"):
        ids = theirs(prompt).input_ids
        assert ids[0] == 1 and run.tokenizer.encode_text(prompt) == ids
        want = model.generate(torch.tensor([ids]), max_new_tokens=10, min_new_tokens=10, do_sample=False,
                              eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
        assert generate_ids(run.model, ids, 10) == want
    # evaluation data: every document as transformers tokenises it, then the end-of-text token
    corpus = tmp_path / "docs"
    corpus.mkdir()
    for i, doc in enumerate(DOCS):
        (corpus / f"d{i}.txt").write_text(doc)
    data = eval_data(run, str(corpus), "all", [], show_progress=False, log=lambda *_: None)
    stream = [int(t) for t in data.seqs.tokens]
    eos = run.tokenizer.eot_id
    docs, current = [], []
    for t in stream:
        current.append(t)
        if t == eos:
            docs.append(current[:-1])
            current = []
    assert sorted(docs) == sorted(theirs(d).input_ids for d in DOCS)
    assert all(d[0] == 1 for d in docs)


def test_a_tokenizer_without_a_template_adds_nothing(tmp_path):
    """Qwen-style tokenizers add no BOS: nothing changes for them (nor for moectl's own BPE)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from moectl.convert.importer import import_hf
    from moectl.runs import load_run

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(DOCS, trainers.BpeTrainer(vocab_size=80, special_tokens=["<|endoftext|>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    src = save_hf(hf_model("qwen2", **VARIANTS[("qwen2", "qwen2.5-7b")], vocab_size=300), tmp_path / "hf")
    tok.save(str(src / "tokenizer.json"))
    import_hf(src, tmp_path / "moectl")
    run = load_run(tmp_path / "moectl")
    assert not run.tokenizer.add_special_tokens
    assert run.tokenizer.encode_text("hello world") == run.tokenizer.encode("hello world")
    assert "add_special_tokens: true" not in (tmp_path / "moectl" / "config.yaml").read_text()


def test_text_settings_go_back_out_on_export(tmp_path):
    from transformers import AutoTokenizer, GenerationConfig

    from moectl.convert.export import export_hf
    from moectl.convert.importer import import_hf

    _, src = _llama_folder(tmp_path)
    import_hf(src, tmp_path / "moectl")
    export_hf(tmp_path / "moectl", tmp_path / "back")
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert config["bos_token_id"] == 1 and config["eos_token_id"] == [2, 0]
    gen = GenerationConfig.from_pretrained(tmp_path / "back")
    assert gen.temperature == 0.6 and gen.top_p == 0.9 and gen.do_sample and gen.eos_token_id == [2, 0]
    theirs, again = AutoTokenizer.from_pretrained(src), AutoTokenizer.from_pretrained(tmp_path / "back")
    assert again.bos_token == "<s>" and again.eos_token == "</s>" and again.chat_template == CHAT
    assert again("hello world").input_ids == theirs("hello world").input_ids
    messages = [{"role": "user", "content": "hi"}]
    assert again.apply_chat_template(messages, tokenize=False) == theirs.apply_chat_template(messages, tokenize=False)


@pytest.mark.train
def test_training_an_imported_model_keeps_its_bos(tmp_path, cli):
    """`moectl train OUT` on the imported folder tokenises its documents with the BOS too."""
    import numpy as np

    from moectl.data.prepare import prepare_data
    from moectl.recipe.load import load_recipe

    _, src = _llama_folder(tmp_path)
    assert cli("convert", src, tmp_path / "moectl", "--from", "hf").exit_code == 0
    corpus = tmp_path / "docs"
    corpus.mkdir()
    for i, doc in enumerate(DOCS * 10):
        (corpus / f"d{i}.txt").write_text(doc)
    source = f"data.source={{kind: files, paths: ['{corpus}/*.txt']}}"
    recipe = load_recipe(tmp_path / "moectl" / "config.yaml", [source])
    prepared = prepare_data(recipe, show_progress=False, log=lambda *_: None)
    train = np.asarray(prepared.tokens("train"))
    eot = prepared.eot_id
    starts = [0, *(np.nonzero(train == eot)[0] + 1)][:-1]
    assert starts and all(train[s] == 1 for s in starts)
