"""Reranker checkpoints made another way than ettin_export.random_checkpoint, so that tests do not
share the project's own assumptions: transformers' own ModernBERT init and config defaults (local
RoPE theta 10000, its own special-token ids), a WordPiece tokenizer with a RoBERTa-like double-[SEP]
pair template and specials at ids 0-4, and sentence-transformers' own modules and save_pretrained for
the CrossEncoder layout. Scores are rescaled to a wide spread (std ~12) like a trained reranker's."""

from __future__ import annotations

import random
import string
import tempfile
from pathlib import Path

import numpy as np
import torch

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]  # ids 0-4, as a WordPiece trainer assigns them


def _pseudo_words(rng: random.Random, count: int) -> list[str]:
    return ["".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 9))) for _ in range(count)]


def wordpiece_tokenizer(seed: int, vocab_size: int = 1500):
    """A WordPiece tokenizer (BERT normalizer and pre-tokenizer, "##" continuations, a double-[SEP] pair
    template) whose vocabulary is laid out deterministically: tokenizers' WordPieceTrainer breaks frequency
    ties in hash order, so a trained vocabulary (and every score of the checkpoint) changed from run to run."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    rng = random.Random(seed)
    words = list(dict.fromkeys(_pseudo_words(rng, 400)))
    characters = string.ascii_lowercase + string.digits + string.punctuation
    vocab = SPECIALS + list(characters) + ["##" + c for c in string.ascii_lowercase + string.digits] + words
    pieces = sorted({"##" + w[i:] for w in words for i in range(1, len(w) - 1)}, key=lambda p: (len(p), p))
    vocab += [p for p in pieces if p not in set(vocab)][: max(0, vocab_size - len(vocab))]
    tokenizer = Tokenizer(models.WordPiece({token: i for i, token in enumerate(vocab)}, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] [SEP] $B [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    return tokenizer


def _hf_tokenizer(tokenizer, model_max_length: int):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", model_max_length=model_max_length)


def _config(tokenizer, *, hidden: int, layers: int, heads: int, intermediate: int, local_attention: int,
            max_positions: int, **extra):
    from transformers import ModernBertConfig

    return ModernBertConfig(
        vocab_size=tokenizer.get_vocab_size(), hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=heads, intermediate_size=intermediate, local_attention=local_attention,
        max_position_embeddings=max_positions, pad_token_id=tokenizer.token_to_id("[PAD]"),
        cls_token_id=tokenizer.token_to_id("[CLS]"), sep_token_id=tokenizer.token_to_id("[SEP]"),
        bos_token_id=tokenizer.token_to_id("[CLS]"), eos_token_id=tokenizer.token_to_id("[SEP]"), **extra,
    )


def _spread_pairs(seed: int, count: int = 48) -> list[tuple[str, str]]:
    from ettin_export.synthetic.text import random_sentence

    rng = random.Random(seed)
    return [(random_sentence(rng, rng.randint(2, 12)), random_sentence(rng, rng.randint(5, 150))) for _ in range(count)]


@torch.no_grad()
def _rescale(linear: torch.nn.Linear, scores: np.ndarray, std: float) -> None:
    spread = float(np.std(scores))
    linear.weight.mul_(std / spread)
    if linear.bias is not None:
        linear.bias.mul_(std / spread)


def write_foreign_crossencoder(out_dir: str | Path, *, seed: int = 0, hidden: int = 128, layers: int = 8,
                               heads: int = 4, intermediate: int = 192, local_attention: int = 64,
                               max_seq_length: int | None = 384, score_std: float = 12.0) -> Path:
    """A CrossEncoder saved by sentence-transformers itself: Transformer(ModernBertModel with HF's own
    init) -> Pooling(cls) -> Dense(tanh, bias) -> LayerNorm -> Dense(1)."""
    from sentence_transformers import CrossEncoder
    from sentence_transformers.base.modules import Dense, Transformer
    from sentence_transformers.sentence_transformer.modules import LayerNorm, Pooling
    from transformers import ModernBertModel

    torch.manual_seed(seed)
    tokenizer = wordpiece_tokenizer(seed)
    config = _config(tokenizer, hidden=hidden, layers=layers, heads=heads, intermediate=intermediate,
                     local_attention=local_attention, max_positions=2048, initializer_range=0.08)
    with tempfile.TemporaryDirectory() as backbone_dir:
        ModernBertModel(config).save_pretrained(backbone_dir)
        _hf_tokenizer(tokenizer, 2048).save_pretrained(backbone_dir)
        transformer = Transformer(backbone_dir, max_seq_length=max_seq_length)
    head = [Pooling(hidden, "cls"), Dense(hidden, hidden, bias=True, activation_function=torch.nn.Tanh()),
            LayerNorm(hidden), Dense(hidden, 1, bias=True, activation_function=torch.nn.Identity(), module_output_name="scores")]
    model = CrossEncoder(modules=[transformer, *head], activation_fn=torch.nn.Identity(), device="cpu")
    model.eval()
    _rescale(head[-1].linear, model.predict(_spread_pairs(seed), show_progress_bar=False), score_std)
    out = Path(out_dir)
    model.save_pretrained(str(out))
    return out


def write_foreign_sequence_classification(out_dir: str | Path, *, seed: int = 0, hidden: int = 128, layers: int = 8,
                                          heads: int = 4, intermediate: int = 192, local_attention: int = 64,
                                          model_max_length: int = 320, pooling: str = "mean",
                                          score_std: float = 12.0) -> Path:
    """transformers' own ModernBertForSequenceClassification (one label) saved by save_pretrained."""
    from transformers import ModernBertForSequenceClassification

    torch.manual_seed(seed)
    tokenizer = wordpiece_tokenizer(seed)
    config = _config(tokenizer, hidden=hidden, layers=layers, heads=heads, intermediate=intermediate,
                     local_attention=local_attention, max_positions=2048, num_labels=1,
                     classifier_pooling=pooling, initializer_range=0.08)
    model = ModernBertForSequenceClassification(config).eval()
    hf_tokenizer = _hf_tokenizer(tokenizer, model_max_length)
    pairs = _spread_pairs(seed)
    batch = hf_tokenizer([q for q, _ in pairs], [d for _, d in pairs], padding=True, truncation=True,
                         return_tensors="pt", return_token_type_ids=False)
    with torch.no_grad():
        scores = model(**batch).logits.squeeze(-1).numpy()
    _rescale(model.classifier, scores, score_std)
    out = Path(out_dir)
    model.save_pretrained(str(out))
    hf_tokenizer.save_pretrained(str(out))
    return out
