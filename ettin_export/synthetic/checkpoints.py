"""Random-weights rerankers in the exact saved layout of a real one, made offline.

Tests and benchmarks need no download: `write_random_checkpoint` writes a sentence-transformers
CrossEncoder folder (or a plain ModernBertForSequenceClassification) for any of the six exact Ettin
configs or a small custom one, with a byte-level BPE tokenizer trained here on generated text and the
real ModernBERT special-token ids. Weights give peaked attention, and the score scale is calibrated so
scores spread like a trained Ettin reranker's (mean ~3, standard deviation ~5), or parity bounds
would mean nothing.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch

from ettin_runtime.packing import pack

from ettin_export import sizes
from ettin_export.model import HeadConfig, PackedConfig, PackedReranker, init_random_weights, modernbert_config
from ettin_export.synthetic.text import random_pairs, random_sentence


UNK, CLS, SEP, PAD, MASK = "[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"
SPECIAL_IDS = {UNK: 50280, CLS: sizes.CLS_TOKEN_ID, SEP: sizes.SEP_TOKEN_ID, PAD: sizes.PAD_TOKEN_ID, MASK: 50284}

# Small configs for tests: real mechanisms (local and global layers, GeGLU, the ST head) at toy sizes.
TINY_CONFIG = {"hidden": 64, "layers": 4, "heads": 2, "intermediate": 96, "local_attention": 32}


def train_tokenizer(seed: int = 0, vocab_size: int = 700):
    """A byte-level BPE with ModernBERT's pair template: [CLS] A [SEP] B [SEP]. Special tokens sit at
    the real ModernBERT ids (50280-50284), so id ranges and padding_idx match the exact configs."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    rng = random.Random(seed)
    corpus = [random_sentence(rng, rng.randint(3, 40)) + rng.choice([".", "?", "!", ","]) for _ in range(3000)]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator(corpus, trainer)
    data = json.loads(tokenizer.to_str())
    for token, token_id in SPECIAL_IDS.items():
        data["model"]["vocab"][token] = token_id
    data["added_tokens"] = [
        {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}
        for t, i in SPECIAL_IDS.items()
    ]
    tokenizer = Tokenizer.from_str(json.dumps(data))
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{CLS} $A {SEP}",
        pair=f"{CLS} $A {SEP} $B {SEP}",
        special_tokens=[(CLS, SPECIAL_IDS[CLS]), (SEP, SPECIAL_IDS[SEP])],
    )
    return tokenizer


def modernbert_config_dict(size: str | None = None, *, num_layers: int | None = None, **custom) -> dict:
    """config.json fields for an Ettin size (optionally at reduced depth) or a custom small config."""
    if size is not None:
        config = sizes.get_size(size).modernbert_config(num_hidden_layers=num_layers)
    else:
        spec = {**TINY_CONFIG, **custom}
        config = sizes.get_size("17m").modernbert_config()
        config.update(
            hidden_size=spec["hidden"], num_hidden_layers=num_layers or spec["layers"],
            num_attention_heads=spec["heads"], intermediate_size=spec["intermediate"],
            local_attention=spec["local_attention"],
        )
        custom = {k: v for k, v in custom.items() if k not in TINY_CONFIG}
    config.update(custom)
    return config


def write_random_checkpoint(
    out_dir: str | Path,
    size: str | None = None,
    *,
    seed: int = 0,
    num_layers: int | None = None,
    layout: str = "sentence-transformers",
    pooling: str = "cls",
    max_seq_length: int | None = None,
    tokenizer_padding: bool = False,
    calibrate: bool = True,
    score_std: float = 5.0,
    **config_overrides,
) -> Path:
    """Write a random-weights reranker folder that CrossEncoder and ettin-export both load.

    Args:
        size: one of the six Ettin sizes (exact config), or None for a tiny custom config whose fields
            (hidden, layers, heads, intermediate, local_attention, or any config.json key) can be overridden.
        num_layers: reduce depth (keeps the global-every-third pattern).
        layout: "sentence-transformers" (Ettin's modular head) or "hf-sequence-classification".
        max_seq_length: the checkpoint's own length limit: sentence_bert_config.json for the ST layout,
            the tokenizer's model_max_length for the plain HF layout.
        tokenizer_padding: save tokenizer.json with padding and truncation enabled (CrossEncoder and
            ettin-export must both override them).
        score_std: the spread the raw scores are calibrated to (mean 3); trained rerankers' scores
            spread about 5 (Ettin) to 12 and more.
    """
    from safetensors.torch import save_file
    from transformers import PreTrainedTokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config_dict = modernbert_config_dict(size, num_layers=num_layers, **config_overrides)
    is_st = layout == "sentence-transformers"
    if not is_st and layout != "hf-sequence-classification":
        raise ValueError(f"Unknown layout {layout!r}.")
    if not is_st:
        config_dict.update(
            architectures=["ModernBertForSequenceClassification"], num_labels=1, classifier_pooling=pooling
        )
    hf_config = modernbert_config(config_dict)
    head = (
        HeadConfig(dense_bias=False, activation="gelu", norm_bias=True, norm_eps=1e-5, pooling=pooling)
        if is_st
        else HeadConfig(hf_config.classifier_bias, hf_config.classifier_activation, hf_config.norm_bias,
                        hf_config.norm_eps, pooling)
    )
    model = PackedReranker(PackedConfig.from_modernbert(hf_config, head))
    init_random_weights(model, seed=seed)
    tokenizer = train_tokenizer(seed)
    if calibrate:
        _calibrate_scores(model, tokenizer, seed, std=score_std)

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    backbone = {k: v for k, v in state.items() if not k.startswith("head.")}
    hf_config.save_pretrained(out)
    # A plain HF checkpoint limits its length through the tokenizer; an ST one in sentence_bert_config.
    tokenizer_limit = max_seq_length if (max_seq_length is not None and not is_st) else sizes.MAX_POSITION_EMBEDDINGS
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, cls_token=CLS, sep_token=SEP, pad_token=PAD, unk_token=UNK,
        mask_token=MASK, model_max_length=tokenizer_limit,
    )
    fast.save_pretrained(out)
    if tokenizer_padding:
        saved = json.loads((out / "tokenizer.json").read_text())
        saved["padding"] = {"strategy": {"Fixed": 96}, "direction": "Right", "pad_to_multiple_of": None,
                            "pad_id": SPECIAL_IDS[PAD], "pad_type_id": 0, "pad_token": PAD}
        saved["truncation"] = {"direction": "Right", "max_length": 24, "strategy": "LongestFirst", "stride": 0}
        (out / "tokenizer.json").write_text(json.dumps(saved))

    if is_st:
        save_file(backbone, str(out / "model.safetensors"), metadata={"format": "pt"})
        _write_st_modules(out, state, hf_config.hidden_size, pooling, max_seq_length)
    else:
        hf_state = {("model." + k): v for k, v in backbone.items()}
        hf_state.update({k.removeprefix("head."): v for k, v in state.items() if k.startswith("head.classifier.")})
        hf_state.update({k: v for k, v in state.items() if k.startswith(("head.dense.", "head.norm."))})
        save_file(hf_state, str(out / "model.safetensors"), metadata={"format": "pt"})
    _write_json(out / "ettin_export.json", {
        "random_weights": True, "size": size, "seed": seed, "layout": layout,
        "note": "Random weights made by ettin-export for tests and benchmarks; scores mean nothing.",
    })
    return out


def _write_st_modules(out: Path, state: dict, hidden: int, pooling: str, max_seq_length: int | None) -> None:
    from safetensors.torch import save_file

    module_types = [
        ("", "sentence_transformers.base.modules.transformer.Transformer"),
        ("1_Pooling", "sentence_transformers.sentence_transformer.modules.pooling.Pooling"),
        ("2_Dense", "sentence_transformers.base.modules.dense.Dense"),
        ("3_LayerNorm", "sentence_transformers.sentence_transformer.modules.layer_norm.LayerNorm"),
        ("4_Dense", "sentence_transformers.base.modules.dense.Dense"),
    ]
    _write_json(out / "modules.json", [
        {"idx": i, "name": str(i), "path": path, "type": kind} for i, (path, kind) in enumerate(module_types)
    ])
    _write_json(out / "config_sentence_transformers.json", {
        "activation_fn": "torch.nn.modules.linear.Identity", "default_prompt_name": None,
        "model_type": "CrossEncoder", "prompts": {},
    })
    transformer_config = {
        "transformer_task": "feature-extraction",
        "modality_config": {"text": {"method": "forward", "method_output_name": "last_hidden_state"}},
        "module_output_name": "token_embeddings",
    }
    if max_seq_length is not None:
        transformer_config["max_seq_length"] = max_seq_length
    _write_json(out / "sentence_bert_config.json", transformer_config)
    _write_json(out / "1_Pooling" / "config.json",
                {"embedding_dimension": hidden, "pooling_mode": pooling, "include_prompt": True})
    dense = {"in_features": hidden, "out_features": hidden, "bias": False,
             "activation_function": "torch.nn.modules.activation.GELU",
             "module_input_name": "sentence_embedding", "module_output_name": "sentence_embedding"}
    _write_json(out / "2_Dense" / "config.json", dense)
    save_file({"linear.weight": state["head.dense.weight"]}, str(out / "2_Dense" / "model.safetensors"))
    _write_json(out / "3_LayerNorm" / "config.json", {"dimension": hidden})
    save_file({"norm.weight": state["head.norm.weight"], "norm.bias": state["head.norm.bias"]},
              str(out / "3_LayerNorm" / "model.safetensors"))
    _write_json(out / "4_Dense" / "config.json", {
        **dense, "out_features": 1, "bias": True, "activation_function": "torch.nn.modules.linear.Identity",
        "module_output_name": "scores",
    })
    save_file({"linear.weight": state["head.classifier.weight"], "linear.bias": state["head.classifier.bias"]},
              str(out / "4_Dense" / "model.safetensors"))


@torch.no_grad()
def _calibrate_scores(model: PackedReranker, tokenizer, seed: int, n_pairs: int = 24, std: float = 5.0) -> None:
    """Rescale the classifier so raw scores have mean ~3 and std `std` on random pairs (5: like the
    teacher-distilled Ettin logits, about -12..22)."""
    pairs = random_pairs(n_pairs, seed=seed + 1, document_words=(10, 120))
    batch = pack([np.asarray(e.ids, dtype=np.int32) for e in tokenizer.encode_batch(pairs)])
    scores = model(torch.from_numpy(batch.input_ids).long(), torch.from_numpy(batch.cu_seqlens)).float().squeeze(-1)
    spread = float(scores.std())
    if not np.isfinite(spread) or spread < 1e-6:
        raise RuntimeError("Random model produced constant scores; cannot calibrate.")
    classifier = model.head.classifier
    classifier.weight.mul_(std / spread)
    classifier.bias.copy_(classifier.bias * (std / spread) + (3.0 - float(scores.mean()) * std / spread))


def _write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
