"""Vision-language models (tiny LLaVA and Qwen2-VL built from configs): layer discovery finds the
language model's blocks, the vision tower is its own group (``vision``) that freezing addresses
on purpose, and the monitor names its groups the same way.

The vision encoders here are deeper than the language models on purpose: picking the longest
stack (the old behaviour) picks the vision tower, and every check below would fail.
"""

from __future__ import annotations

import pytest
import torch
from transformers import (
    LlavaConfig,
    LlavaForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)

from forge.core.discovery import find_layers
from forge.layers import FreezeConfig, freeze_layers
from forge.layers.config import transform
from forge.layers.llrd import layer_depths
from forge.layers.schedules import GradualUnfreezingCallback
from forge.monitor import GradientMonitor

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2}
IMAGE_TOKEN = 5


def _llava():
    config = LlavaConfig(
        text_config={"model_type": "llama", **TEXT},
        vision_config={"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64,
                       "num_hidden_layers": 3, "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
        image_token_index=IMAGE_TOKEN, vision_feature_layer=-1)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config)
    # 32x32 pixels in 8x8 patches: 16 image features, one per image token.
    ids = torch.cat([torch.full((2, 16), IMAGE_TOKEN), torch.randint(10, 128, (2, 8))], dim=1)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids,
             "pixel_values": torch.randn(2, 3, 32, 32)}
    return model, batch, "model.language_model", "model.vision_tower"


def _qwen2_vl():
    config = Qwen2VLConfig(
        text_config={**TEXT, "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
                     "bos_token_id": 1, "eos_token_id": 2},
        vision_config={"depth": 3, "embed_dim": 32, "hidden_size": 64, "num_heads": 2, "mlp_ratio": 2,
                       "patch_size": 4, "spatial_merge_size": 2, "temporal_patch_size": 2, "in_channels": 3},
        image_token_id=IMAGE_TOKEN, video_token_id=8, vision_start_token_id=6, vision_end_token_id=7)
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(config)
    # One 1x4x4 patch grid per image, merged 2x2: four image tokens between start and end.
    row = [6] + [IMAGE_TOKEN] * 4 + [7] + list(range(10, 18))
    ids = torch.tensor([row, row])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids,
             "mm_token_type_ids": (ids == IMAGE_TOKEN).int(), "pixel_values": torch.randn(32, 96),
             "image_grid_thw": torch.tensor([[1, 4, 4], [1, 4, 4]])}
    return model, batch, "model.language_model", "model.visual"


BUILDERS = {"llava": _llava, "qwen2_vl": _qwen2_vl}


@pytest.fixture(params=list(BUILDERS))
def vlm(request):
    return BUILDERS[request.param]()


def _names_under(model, prefix: str) -> set[str]:
    return {n for n, _ in model.named_parameters() if n.startswith(prefix + ".")}


def test_discovery_finds_the_language_model_blocks_and_the_vision_tower(vlm):
    model, _, lm, tower = vlm
    info = find_layers(model)
    text_layers = model.config.get_text_config().num_hidden_layers
    assert info.num_blocks == text_layers == 2
    assert info.blocks == tuple(f"{lm}.layers.{i}" for i in range(text_layers))
    assert info.embeddings == (f"{lm}.embed_tokens",) and info.norm == (f"{lm}.norm",)
    assert info.vision == (tower,)
    assert set(info.groups["vision"]) == _names_under(model, tower)
    for i in range(text_layers):
        assert set(info.groups[f"block.{i}"]) == _names_under(model, f"{lm}.layers.{i}")


def test_monitor_reports_language_blocks_and_vision_apart(vlm):
    model, batch, lm, tower = vlm
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    monitor = GradientMonitor().attach(model)
    loss = model(**batch).loss
    loss.backward()
    named = dict(model.named_parameters())

    def norm(names: set[str]) -> float:
        grads = [named[n].grad.reshape(-1) for n in names if named[n].grad is not None]
        return torch.cat(grads).norm().item()

    expected = {"vision": norm(_names_under(model, tower)),
                "layer_00": norm(_names_under(model, f"{lm}.layers.0")),
                "layer_01": norm(_names_under(model, f"{lm}.layers.1"))}
    assert monitor.step(optimizer, loss=loss)
    metrics = monitor.flush_metrics()
    groups = {k.removeprefix("forge/grad_norm/") for k in metrics if k.startswith("forge/grad_norm/")}
    assert {g for g in groups if g.startswith("layer_")} == {"layer_00", "layer_01"}
    assert {"vision", "embeddings", "norm", "head"} <= groups
    for group, value in expected.items():
        assert metrics[f"forge/grad_norm/{group}"] == pytest.approx(value, rel=1e-5)


def test_freeze_acts_on_language_blocks_and_the_tower_only_when_asked(vlm):
    model, _, lm, tower = vlm
    everything = {n for n, _ in model.named_parameters()}

    def frozen() -> set[str]:
        return {n for n, p in model.named_parameters() if not p.requires_grad}

    freeze_layers(model, ratio=0.5)  # the bottom half of the language model, the tower untouched
    assert frozen() == _names_under(model, f"{lm}.layers.0")
    for p in model.parameters():
        p.requires_grad_(True)
    freeze_layers(model, vision_tower=True)
    assert frozen() == _names_under(model, tower)
    freeze_layers(model, vision_tower=False)
    assert frozen() == set() and everything
    # The preset section: off by default, addressable on purpose.
    assert FreezeConfig().vision_tower is None
    transform(FreezeConfig(enabled=True, vision_tower=True, first=1), model, None)
    assert frozen() == _names_under(model, tower) | _names_under(model, f"{lm}.layers.0")


def test_schedules_and_layerwise_lr_treat_the_tower_as_the_input_side(vlm):
    model, _, lm, tower = vlm
    depths = layer_depths(model)
    # Depth = decay steps below the head: the top block 1, the bottom 2, embeddings and tower 3.
    embeddings = {n for n in depths if "embed_tokens" in n and n.startswith(lm)}
    assert embeddings and {depths[n] for n in embeddings} == {3}
    assert {depths[n] for n in _names_under(model, tower)} == {3}
    assert {depths[n] for n in _names_under(model, f"{lm}.layers.1")} == {1}
    assert {depths[n] for n in _names_under(model, f"{lm}.layers.0")} == {2}
    gradual = GradualUnfreezingCallback(model, every_n_steps=1)
    first, last = set(gradual.trainable_at(0)), set(gradual.trainable_at(10))
    assert not first & _names_under(model, tower) and not first & _names_under(model, f"{lm}.layers.0")
    assert _names_under(model, tower) <= last
    # The tower joins after the embeddings, last of all.
    assert _names_under(model, tower) & set(gradual.trainable_at(gradual.num_stages - 1))
    assert not _names_under(model, tower) & set(gradual.trainable_at(gradual.num_stages - 2))


def test_vision_tower_on_a_text_model_is_an_error(tiny_llama):
    with pytest.raises(ValueError, match="no vision tower"):
        freeze_layers(tiny_llama(), vision_tower=True)
