"""Loading checkpoints: what is accepted, what is refused (and how the refusal reads), random weights."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from ettin_export.checkpoint import CheckpointError, load_checkpoint, open_source
from ettin_export.synthetic.checkpoints import write_random_checkpoint
from ettin_export.synthetic.text import random_pairs
from ettin_export.model.torch_reranker import TorchReranker
from ettin_runtime.packing import PairEncoder, pack


def _copy(src, tmp_path):
    return shutil.copytree(src, tmp_path / "copy")


def test_sentence_transformers_layout_is_recognised(tiny_checkpoint):
    checkpoint = load_checkpoint(str(tiny_checkpoint))
    assert checkpoint.layout == "sentence-transformers"
    assert checkpoint.activation == "identity"  # Ettin: raw logits
    assert checkpoint.config.head.pooling == "cls" and checkpoint.config.head.norm_bias
    assert checkpoint.config.windows == (-1, 16, 16, -1)
    assert checkpoint.random_weights and checkpoint.max_length == 200


def test_plain_sequence_classification_records_sigmoid(tmp_path):
    path = write_random_checkpoint(tmp_path / "hf", None, layout="hf-sequence-classification", pooling="mean")
    checkpoint = load_checkpoint(str(path))
    assert checkpoint.layout == "hf-sequence-classification"
    assert checkpoint.activation == "sigmoid"  # what CrossEncoder applies to one-label HF models
    assert checkpoint.config.head.pooling == "mean" and not checkpoint.config.head.norm_bias


def test_non_modernbert_backbone_is_refused(tiny_checkpoint, tmp_path):
    path = _copy(tiny_checkpoint, tmp_path)
    config = json.loads((path / "config.json").read_text())
    config.update(model_type="bert", architectures=["BertModel"])
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"the backbone is 'bert' \(BertModel\); ettin-export supports ModernBERT"):
        load_checkpoint(str(path))


def test_several_labels_are_refused(tmp_path):
    path = write_random_checkpoint(tmp_path / "hf", None, layout="hf-sequence-classification")
    config = json.loads((path / "config.json").read_text())
    config["id2label"] = {"0": "a", "1": "b", "2": "c"}
    config["label2id"] = {"a": 0, "b": 1, "c": 2}
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="the classifier has 3 labels; a reranker has exactly 1"):
        load_checkpoint(str(path))


def test_multi_label_st_head_is_refused(tiny_checkpoint, tmp_path):
    path = _copy(tiny_checkpoint, tmp_path)
    config = json.loads((path / "4_Dense" / "config.json").read_text())
    config["out_features"] = 2
    (path / "4_Dense" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="the last Dense maps 64 -> 2 labels; a reranker needs 64 -> 1"):
        load_checkpoint(str(path))


def test_missing_head_file_is_refused(tiny_checkpoint, tmp_path):
    path = _copy(tiny_checkpoint, tmp_path)
    (path / "2_Dense" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no weights for the first Dense in .*2_Dense"):
        load_checkpoint(str(path))


def test_unsupported_module_chain_is_refused(tiny_checkpoint, tmp_path):
    path = _copy(tiny_checkpoint, tmp_path)
    modules = json.loads((path / "modules.json").read_text())
    (path / "modules.json").write_text(json.dumps(modules[:2] + modules[3:]))
    with pytest.raises(CheckpointError, match="chain is Transformer -> Pooling -> LayerNorm -> Dense; supported is"):
        load_checkpoint(str(path))


def test_not_a_checkpoint_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        load_checkpoint(str(tmp_path))


def test_unreachable_hub_says_so_and_suggests_alternatives(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError) as error:
        load_checkpoint("cross-encoder/ettin-reranker-17m-v1")
    message = str(error.value)
    assert "Could not get 'cross-encoder/ettin-reranker-17m-v1' from the Hugging Face Hub" in message
    assert "ettin-export build PATH`" in message and "--size SIZE --random-weights" in message


def test_open_source_validates_its_arguments():
    with pytest.raises(CheckpointError, match="--random-weights needs --size"):
        open_source("x/y", random_weights=True)
    with pytest.raises(CheckpointError, match="either a model"):
        open_source("x/y", size="17m")
    with pytest.raises(ValueError, match="Unknown Ettin size '2m'"):
        open_source(size="2m", random_weights=True)


def test_random_weights_spread_like_a_trained_model_with_peaked_attention(ettin17m_reduced):
    reranker = TorchReranker.from_checkpoint(str(ettin17m_reduced))
    scores = reranker.predict(random_pairs(120, seed=99, document_words=(5, 200)))
    assert scores.std() >= 3.0
    assert -20 < scores.min() < scores.max() < 30  # Ettin logits span about -12..22
    # Peaked attention: on a global layer, a token's largest attention weight is far above uniform.
    model = reranker.model
    encoder = PairEncoder.from_dir(ettin17m_reduced)
    batch = pack(encoder.encode(random_pairs(4, seed=5, document_words=(100, 120))))
    captured = {}
    model.layers[0].attn.register_forward_hook(lambda m, args, out: captured.setdefault("in", args[0]))
    with torch.no_grad():
        model(torch.from_numpy(batch.input_ids).long(), torch.from_numpy(batch.cu_seqlens))
    hidden = captured["in"][: batch.cu_seqlens[1]]  # first pair only
    attn = model.layers[0].attn
    q, k, _ = attn.Wqkv(hidden).view(len(hidden), 3, attn.num_heads, attn.head_dim).unbind(1)
    probs = torch.softmax(torch.einsum("ihd,jhd->hij", q, k) / 8.0, dim=-1)
    mean_max = probs.max(dim=-1).values.mean().item()
    assert mean_max > 10 / len(hidden), f"attention too flat: mean max weight {mean_max:.3f}"


def test_random_checkpoint_loads_in_crossencoder_with_same_layout(ettin17m_reduced):
    names = sorted(p.relative_to(ettin17m_reduced).as_posix() for p in ettin17m_reduced.rglob("*") if p.is_file())
    for required in ("modules.json", "config_sentence_transformers.json", "sentence_bert_config.json", "config.json",
                     "model.safetensors", "tokenizer.json", "tokenizer_config.json", "1_Pooling/config.json",
                     "2_Dense/model.safetensors", "3_LayerNorm/model.safetensors", "4_Dense/model.safetensors"):
        assert required in names
    config = json.loads((ettin17m_reduced / "config.json").read_text())
    assert config["vocab_size"] == 50368 and config["hidden_size"] == 256


def test_bf16_model_runs_and_stays_close(tiny_checkpoint):
    pairs = random_pairs(20, seed=4)
    fp32 = TorchReranker.from_checkpoint(str(tiny_checkpoint)).predict(pairs)
    bf16 = TorchReranker.from_checkpoint(str(tiny_checkpoint), dtype=torch.bfloat16).predict(pairs)
    assert bf16.dtype == np.float32
    assert np.max(np.abs(bf16 - fp32)) < 1.0
    assert np.corrcoef(bf16, fp32)[0, 1] > 0.98
