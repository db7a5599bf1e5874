"""`gradaccum train --model DIR` with local Hugging Face model directories of several families.

Each directory holds a small model built from a config (random weights) and the shipped
MiniLM tokenizer, saved the way ``save_pretrained`` saves them; nothing comes from a hub.
"""

from __future__ import annotations

import json
import math

import pytest

transformers = pytest.importorskip("transformers")

from gradaccum.cli import main  # noqa: E402
from gradaccum.recipes import assets  # noqa: E402

TINY = ["--train-limit", "20", "--eval-limit", "8", "--epochs", "1", "--effective-batch", "8", "--micro-batch", "3"]


def save_model(tmp_path, name: str, model, max_positions: int):
    tok = transformers.AutoTokenizer.from_pretrained(assets.default_model_dir())
    tok.model_max_length = max_positions
    d = tmp_path / name
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def families(vocab: int):
    small = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    return {
        "bert": (transformers.BertForMaskedLM(transformers.BertConfig(vocab_size=vocab, max_position_embeddings=48, **small)), 48),
        "roberta": (transformers.RobertaModel(transformers.RobertaConfig(vocab_size=vocab, max_position_embeddings=50, pad_token_id=0, **small)), 48),
        "distilbert": (transformers.DistilBertModel(transformers.DistilBertConfig(vocab_size=vocab, dim=16, n_layers=1, n_heads=2, hidden_dim=32, max_position_embeddings=48)), 48),
        "gpt2": (transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=vocab, n_embd=16, n_layer=1, n_head=2, n_positions=40)), 40),
    }


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("models")
    vocab = len(transformers.AutoTokenizer.from_pretrained(assets.default_model_dir()))
    return {name: save_model(tmp, name, m, pos) for name, (m, pos) in families(vocab).items()}


@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert", "gpt2"])
def test_classifier_from_any_local_model_directory(model_dirs, tmp_path, family):
    out = tmp_path / "run"
    # --max-length 128 is more than these models have positions for: it is capped, not a crash.
    assert main(["train", "--model", str(model_dirs[family]), "--max-length", "128", "--out", str(out), *TINY]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["optimizer_steps"] == 3 and s["num_train"] == 20
    assert math.isfinite(s["eval"]["loss"])


def test_causal_lm_from_a_local_model_directory(model_dirs, tmp_path):
    out = tmp_path / "lm"
    assert main(["train", "--task", "lm", "--model", str(model_dirs["gpt2"]), "--out", str(out), *TINY]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["optimizer_steps"] == 3 and math.isfinite(s["eval"]["loss"])
