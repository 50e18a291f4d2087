"""The six sizes as data: parameter counts against real modules (meta device) and the published figures."""

from __future__ import annotations

import json

import pytest
import torch

from ettin_export import sizes
from ettin_export.model import HeadConfig, PackedConfig, PackedReranker, modernbert_config, num_parameters


@pytest.mark.parametrize("name", list(sizes.SIZES))
def test_parameter_counts_match_real_modules_and_reference(name):
    from transformers import ModernBertModel

    spec = sizes.get_size(name)
    config = modernbert_config(spec.modernbert_config())
    with torch.device("meta"):
        hf_backbone = ModernBertModel(config)
        packed = PackedReranker(PackedConfig.from_modernbert(config, HeadConfig()))
    assert num_parameters(hf_backbone) == spec.backbone_params()
    assert num_parameters(packed) == spec.backbone_params() + spec.head_params()
    # ettin-models.md §1: backbone figures (= Hub badges) to 0.01M, head to 0.001M
    assert round(spec.backbone_params() / 1e6, 2) == pytest.approx(spec.published_backbone_m, abs=0.006)
    assert round(spec.head_params() / 1e6, 3) == pytest.approx(spec.published_head_m, abs=0.0006)
    # The BLOG's totals are nominal (ettin-models.md §1): 17.6M vs 16.86M, 1.00B vs 1.03B; within 5%
    total = (spec.backbone_params() + spec.head_params()) / 1e6
    assert total == pytest.approx(spec.published_params_m, rel=0.05)


@pytest.mark.parametrize("name", list(sizes.SIZES))
def test_exact_configs(name):
    spec = sizes.get_size(name)
    config = modernbert_config(spec.modernbert_config())
    packed = PackedConfig.from_modernbert(config, HeadConfig())
    assert packed.head_dim == 64
    assert packed.local_rope_theta == packed.global_rope_theta == 160_000.0
    assert [i for i, w in enumerate(packed.windows) if w < 0] == spec.global_layers()
    assert spec.global_layers() == list(range(0, spec.layers, 3))
    assert {w for w in packed.windows if w >= 0} == {64}
    assert config.vocab_size == 50368 and config.max_position_embeddings == 7999
    assert (config.cls_token_id, config.sep_token_id, config.pad_token_id) == (50281, 50282, 50283)


def test_unknown_size_is_refused_with_the_known_ones():
    with pytest.raises(sizes.UnknownSizeError, match=r"Unknown Ettin size '3b'. Known sizes: 17m, 32m, 68m, 150m, 400m, 1b"):
        sizes.get_size("3b")


def test_sizes_command_prints_counts(capsys):
    from ettin_export.cli import main

    assert main(["sizes", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    by_name = {row["size"]: row for row in data["sizes"]}
    assert set(by_name) == set(sizes.SIZES)
    assert by_name["1b"]["total_params"] == sizes.get_size("1b").backbone_params() + sizes.get_size("1b").head_params()
    assert data["shared"]["local_window_half_width"] == 64
    assert main(["sizes"]) == 0
    assert "17m" in capsys.readouterr().out
