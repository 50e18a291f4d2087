"""Load a ModernBERT reranker checkpoint into the packed model's terms.

Accepted layouts (anything else is refused with a message naming what was found):
  * sentence-transformers CrossEncoder folder or hub id: modules.json chain
    Transformer(ModernBertModel) -> Pooling(cls|mean) -> Dense(H, H, activation) -> LayerNorm(H) -> Dense(H, 1)
  * transformers ModernBertForSequenceClassification with one label (with or without modules.json).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ettin_runtime.packing import read_json, resolve_max_length

from ettin_export.errors import CheckpointError

from ettin_export.model import HeadConfig, PackedConfig, PackedReranker, modernbert_config
from ettin_export.synthetic.checkpoints import write_random_checkpoint

_ST_ACTIVATIONS = {
    "torch.nn.modules.activation.GELU": "gelu",
    "torch.nn.modules.linear.Identity": "identity",
    "torch.nn.modules.activation.Tanh": "tanh",
    "torch.nn.modules.activation.ReLU": "relu",
    "torch.nn.modules.activation.SiLU": "silu",
}
_SCORE_ACTIVATIONS = {
    "torch.nn.modules.linear.Identity": "identity",
    "torch.nn.modules.activation.Sigmoid": "sigmoid",
}
HUB_FILE_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*/*.json", "*/*.safetensors", "*.model"]


@dataclass
class Checkpoint:
    path: Path  # a local folder holding the files (hub downloads: the huggingface_hub cache snapshot)
    source: str  # what the user named: a path, a hub id, or "random:<size>"
    layout: str  # "sentence-transformers" | "hf-sequence-classification"
    config: PackedConfig
    state_dict: dict[str, torch.Tensor]  # in PackedReranker's parameter names
    activation: str  # the score activation CrossEncoder applies by default: "identity" | "sigmoid"
    max_length: int  # CrossEncoder's max-length rule for this checkpoint
    revision: str | None = None
    random_weights: bool = False
    size: str | None = None  # the Ettin size, when known
    extra: dict = field(default_factory=dict)

    def resolve_max_length(self, override: int | None = None) -> int:
        """--max-length when given (checked against the model's positions), else the checkpoint's own
        rule (CrossEncoder's, computed when it was loaded)."""
        return self.max_length if override is None else resolve_max_length(self.path, override)

    def build_model(self, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> PackedReranker:
        model = PackedReranker(self.config)
        missing, unexpected = model.load_state_dict(self.state_dict, strict=False)
        if missing or unexpected:
            raise CheckpointError(
                f"{self.source}: weights do not match the ModernBERT config: missing {sorted(missing)[:8]}, "
                f"unexpected {sorted(unexpected)[:8]}."
            )
        return model.to(device=device, dtype=dtype).eval()


def resolve_source(source: str, revision: str | None = None) -> tuple[Path, str | None]:
    """A local folder as is; otherwise a hub id, downloaded through huggingface_hub's cache."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path, None
    if path.exists():
        raise CheckpointError(f"{source} is a file; pass the checkpoint folder that contains it.")
    if source.count("/") != 1 or source.startswith((".", "/", "~")):
        raise CheckpointError(
            f"{source!r} is neither an existing folder nor a hub id of the form 'owner/name'."
        )
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(source, revision=revision, allow_patterns=HUB_FILE_PATTERNS)
    except Exception as error:  # network, auth, missing repo: all end the same way for the user
        raise CheckpointError(
            f"Could not get {source!r} from the Hugging Face Hub ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else 'no detail'}). If this machine is offline, "
            "pass a local checkpoint folder instead of the hub id (`ettin-export build PATH`), or build "
            "from the exact config with --size SIZE --random-weights."
        ) from error
    folder = Path(folder)
    return folder, folder.name  # snapshot folders are named by commit hash


def load_checkpoint(source: str, revision: str | None = None, *, max_length: int | None = None) -> Checkpoint:
    path, resolved_revision = resolve_source(source, revision)
    modules_file = path / "modules.json"
    config_file = path / "config.json"
    if not config_file.is_file():
        from ettin_runtime.artifact import lost_manifest

        if lost_manifest(path):
            raise CheckpointError(lost_manifest(path))
        raise CheckpointError(f"{source}: no config.json in {path}; this is not a transformers/ST checkpoint.")
    hf_config = read_json(config_file)
    model_type = hf_config.get("model_type")
    if model_type != "modernbert":
        raise CheckpointError(
            f"{source}: the backbone is {model_type!r} ({', '.join(hf_config.get('architectures') or [])}); "
            "ettin-export supports ModernBERT rerankers only."
        )
    modules = read_json(modules_file) if modules_file.is_file() else None
    architectures = hf_config.get("architectures") or []
    st_task = read_json(path / "sentence_bert_config.json").get("transformer_task")
    if modules is not None and len(modules) > 1:
        checkpoint = _load_sentence_transformers(path, source, modules, hf_config)
    elif "ModernBertForSequenceClassification" in architectures or st_task == "sequence-classification":
        checkpoint = _load_sequence_classification(path, source, hf_config)
    else:
        found = f"modules.json with {len(modules)} module(s)" if modules is not None else "no modules.json"
        raise CheckpointError(
            f"{source}: found {found} and architectures {architectures}: not a reranker. Expected a "
            "sentence-transformers CrossEncoder (Transformer -> Pooling -> Dense -> LayerNorm -> Dense) "
            "or a ModernBertForSequenceClassification with one label."
        )
    checkpoint.revision = resolved_revision or revision
    checkpoint.max_length = resolve_max_length(path, max_length)
    info = read_json(path / "ettin_export.json")  # written by ettin-export for random-weights checkpoints
    checkpoint.random_weights = bool(info.get("random_weights", False))
    checkpoint.size = info.get("size") or _known_size(source)
    return checkpoint


def _known_size(source: str) -> str | None:
    from ettin_export.sizes import SIZES

    return next((s.name for s in SIZES.values() if source in (s.reranker_id, s.backbone_id)), None)


def _module_kind(entry: dict) -> str:
    return entry.get("type", "").rsplit(".", 1)[-1]


def _load_sentence_transformers(path: Path, source: str, modules: list[dict], hf_config: dict) -> Checkpoint:
    kinds = [_module_kind(m) for m in modules]
    expected = ["Transformer", "Pooling", "Dense", "LayerNorm", "Dense"]
    if kinds != expected:
        raise CheckpointError(
            f"{source}: modules.json chain is {' -> '.join(kinds)}; supported is {' -> '.join(expected)}."
        )
    transformer_dir, pooling_dir, dense_dir, norm_dir, out_dir = (path / m.get("path", "") for m in modules)
    hidden = hf_config["hidden_size"]
    pooling = _pooling_mode(read_json(pooling_dir / "config.json"), source)
    dense_cfg = read_json(dense_dir / "config.json")
    out_cfg = read_json(out_dir / "config.json")
    norm_cfg = read_json(norm_dir / "config.json")
    if (dense_cfg.get("in_features"), dense_cfg.get("out_features")) != (hidden, hidden):
        raise CheckpointError(
            f"{source}: the first Dense maps {dense_cfg.get('in_features')} -> {dense_cfg.get('out_features')}; "
            f"expected {hidden} -> {hidden}."
        )
    if out_cfg.get("out_features") != 1 or out_cfg.get("in_features") != hidden:
        raise CheckpointError(
            f"{source}: the last Dense maps {out_cfg.get('in_features')} -> {out_cfg.get('out_features')} "
            f"labels; a reranker needs {hidden} -> 1."
        )
    if norm_cfg.get("dimension") != hidden:
        raise CheckpointError(f"{source}: LayerNorm dimension {norm_cfg.get('dimension')} != hidden size {hidden}.")
    for name, cfg in (("first Dense", dense_cfg), ("last Dense", out_cfg)):
        if cfg.get("use_residual"):
            raise CheckpointError(f"{source}: the {name} uses a residual connection, which is not supported.")
    dense_act = dense_cfg.get("activation_function", "torch.nn.modules.activation.Tanh")
    if dense_act not in _ST_ACTIVATIONS:
        raise CheckpointError(f"{source}: unsupported Dense activation {dense_act}.")
    if out_cfg.get("activation_function", "torch.nn.modules.linear.Identity") != "torch.nn.modules.linear.Identity":
        raise CheckpointError(
            f"{source}: the last Dense applies {out_cfg['activation_function']}; only raw scores (Identity) are "
            "supported, since activations are applied outside the model."
        )
    head = HeadConfig(
        dense_bias=bool(dense_cfg.get("bias", True)),
        activation=_ST_ACTIVATIONS[dense_act],
        norm_bias=True,
        norm_eps=1e-5,
        pooling=pooling,
    )
    config = PackedConfig.from_modernbert(modernbert_config(hf_config), head)
    backbone = _load_weights(transformer_dir, source, "the backbone")
    backbone = {k.removeprefix("model."): v for k, v in backbone.items()}
    state = {k: v for k, v in backbone.items() if not k.startswith(("head.", "decoder.", "classifier."))}
    state.update(_prefixed(_load_weights(dense_dir, source, "the first Dense"), "linear.", "head.dense."))
    state.update(_prefixed(_load_weights(norm_dir, source, "the LayerNorm"), "norm.", "head.norm."))
    state.update(_prefixed(_load_weights(out_dir, source, "the last Dense"), "linear.", "head.classifier."))
    return _checkpoint(path, source, "sentence-transformers", config, state, hf_config)


def _load_sequence_classification(path: Path, source: str, hf_config: dict) -> Checkpoint:
    config = modernbert_config(hf_config)
    if config.num_labels != 1:
        raise CheckpointError(
            f"{source}: the classifier has {config.num_labels} labels; a reranker has exactly 1."
        )
    head = HeadConfig(
        dense_bias=config.classifier_bias,
        activation=config.classifier_activation,
        norm_bias=config.norm_bias,
        norm_eps=config.norm_eps,
        pooling=config.classifier_pooling,
    )
    packed = PackedConfig.from_modernbert(config, head)
    weights = _load_weights(path, source, "the model")
    state = {}
    for key, value in weights.items():
        if key.startswith("model."):
            state[key.removeprefix("model.")] = value
        elif key.startswith("head."):
            state[key] = value
        elif key.startswith("classifier."):
            state["head." + key] = value
    if "head.classifier.weight" not in state:
        raise CheckpointError(f"{source}: no classifier weights found (expected 'classifier.weight').")
    return _checkpoint(path, source, "hf-sequence-classification", packed, state, hf_config)


def _checkpoint(path: Path, source: str, layout: str, config: PackedConfig, state: dict, hf_config: dict) -> Checkpoint:
    """A loaded layout; max_length is set by load_checkpoint (CrossEncoder's rule reads the folder)."""
    return Checkpoint(path=path, source=source, layout=layout, config=config, state_dict=state,
                      activation=_score_activation(path, hf_config, default="sigmoid"), max_length=0)


def _pooling_mode(pooling_cfg: dict, source: str) -> str:
    mode = pooling_cfg.get("pooling_mode")
    if mode is None:  # legacy boolean keys
        legacy = {"pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean"}
        enabled = [k for k, v in pooling_cfg.items() if k.startswith("pooling_mode_") and v]
        mode = legacy.get(enabled[0]) if len(enabled) == 1 else "+".join(enabled)
    if isinstance(mode, list):
        mode = mode[0] if len(mode) == 1 else "+".join(mode)
    if mode not in ("cls", "mean"):
        raise CheckpointError(f"{source}: pooling mode {mode!r} is not supported (cls or mean).")
    return mode


def _score_activation(path: Path, hf_config: dict, default: str) -> str:
    """The activation CrossEncoder.predict applies: config_sentence_transformers.json, else the
    config.json 'sentence_transformers' block, else Sigmoid for one label."""
    name = read_json(path / "config_sentence_transformers.json").get("activation_fn")
    if name is None:
        name = (hf_config.get("sentence_transformers") or {}).get("activation_fn")
    if name is None:
        return default
    if name not in _SCORE_ACTIVATIONS:
        raise CheckpointError(f"Unsupported score activation {name!r}; supported: {sorted(_SCORE_ACTIVATIONS)}.")
    return _SCORE_ACTIVATIONS[name]


def _prefixed(weights: dict, old: str, new: str) -> dict:
    return {new + k.removeprefix(old): v for k, v in weights.items()}


def _load_weights(folder: Path, source: str, what: str) -> dict[str, torch.Tensor]:
    single = folder / "model.safetensors"
    index = folder / "model.safetensors.index.json"
    if single.is_file():
        return _read_weights(single, source)
    if index.is_file():
        shards = sorted(set(read_json(index).get("weight_map", {}).values()))
        weights = {}
        for shard in shards:
            weights.update(_read_weights(folder / shard, source))
        return weights
    legacy = folder / "pytorch_model.bin"
    if legacy.is_file():
        return _read_weights(legacy, source)
    raise CheckpointError(
        f"{source}: no weights for {what} in {folder} (looked for model.safetensors, "
        "model.safetensors.index.json, pytorch_model.bin)."
    )


def _read_weights(file: Path, source: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not file.is_file():
        raise CheckpointError(f"{source}: {file} is missing (named by model.safetensors.index.json); download or "
                              "save the checkpoint again.")
    try:
        if file.suffix == ".bin":
            return torch.load(file, map_location="cpu", weights_only=True)
        return load_file(str(file))
    except Exception as error:  # noqa: BLE001 - safetensors and torch raise their own error types
        raise CheckpointError(
            f"{source}: {file} cannot be read ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else 'no detail'}): "
            "it is truncated or corrupt. Download or save the checkpoint again."
        ) from error


def random_checkpoint_dir(size: str, seed: int = 0) -> Path:
    """A cached random-weights checkpoint of an exact Ettin config (made once, reused)."""
    import os

    from ettin_export import sizes

    sizes.get_size(size)  # refuse unknown sizes before doing anything
    cache = Path(os.environ.get("ETTIN_EXPORT_CACHE", Path.home() / ".cache" / "ettin-export"))
    folder = cache / "random" / f"{size}-seed{seed}"
    if not (folder / "ettin_export.json").is_file():
        staging = folder.with_name(folder.name + ".partial")
        write_random_checkpoint(staging, size, seed=seed)
        if folder.exists():
            import shutil

            shutil.rmtree(folder)
        staging.rename(folder)
    return folder


def open_source(
    model: str | None = None,
    *,
    size: str | None = None,
    random_weights: bool = False,
    revision: str | None = None,
    max_length: int | None = None,
    seed: int = 0,
) -> Checkpoint:
    """What the command line names: a checkpoint path or hub id (`model`), or an Ettin `size` — the
    hub reranker, or with `random_weights` the exact config with random weights (no download)."""
    from ettin_export import sizes

    if model is not None and size is not None:
        raise CheckpointError("Pass either a model (path or hub id) or --size, not both.")
    if model is None and size is None:
        raise CheckpointError("Name a model: a checkpoint folder or hub id, or --size SIZE [--random-weights].")
    if random_weights:
        if size is None:
            raise CheckpointError("--random-weights needs --size (one of: " + ", ".join(sizes.SIZES) + ").")
        checkpoint = load_checkpoint(str(random_checkpoint_dir(size, seed)), max_length=max_length)
        checkpoint.source = f"random:{size}"
        return checkpoint
    if size is not None:
        checkpoint = load_checkpoint(sizes.get_size(size).reranker_id, revision, max_length=max_length)
        checkpoint.size = size
        return checkpoint
    return load_checkpoint(model, revision, max_length=max_length)
