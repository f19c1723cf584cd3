"""Backbone adapters: spec parsing, the white-box text path, patch features, offline weight resolution."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch

from vlmtune.backbones import load_backbone, parse_spec
from vlmtune.backbones.toy import bundled_weights_dir
from vlmtune.errors import UnknownName, WeightsNotAvailable

REPO = Path(__file__).resolve().parents[1]


def test_parse_spec():
    assert parse_spec("toy") == ("toy", "toy", None)
    assert parse_spec("openclip:ViT-B-32@openai") == ("openclip", "ViT-B-32", "openai")
    assert parse_spec("openclip:RN50") == ("openclip", "RN50", None)
    assert parse_spec("hf:openai/clip-vit-base-patch16") == ("hf", "openai/clip-vit-base-patch16", None)
    with pytest.raises(UnknownName):
        parse_spec("timm:foo")
    with pytest.raises(ValueError):
        parse_spec("openclip:")


def _check_text_path(backbone, texts):
    tokens = backbone.tokenize(texts)
    ref = backbone.encode_texts(texts)  # (M, D)
    eot = backbone.eot_index(tokens)
    via_embeds = backbone.encode_text_embeddings(backbone.embed_tokens(tokens), eot)
    torch.testing.assert_close(via_embeds, ref, atol=1e-5, rtol=1e-5)
    # the tower is causal: truncating the context right after the longest EOT changes nothing
    cut = int(eot.max()) + 1
    truncated = backbone.encode_text_embeddings(backbone.embed_tokens(tokens[:, :cut]), eot)
    torch.testing.assert_close(truncated, ref, atol=1e-5, rtol=1e-5)
    # gradients reach soft prompts through the embeddings
    embeds = backbone.embed_tokens(tokens).detach().requires_grad_(True)
    backbone.encode_text_embeddings(embeds, eot).sum().backward()
    assert embeds.grad is not None and embeds.grad.abs().sum() > 0
    return ref


def test_toy_backbone_white_box_path(toy):
    feats = _check_text_path(toy, ["a photo of a circle.", "a sketch of a blicket.", "star"])
    assert feats.shape == (3, toy.embed_dim)
    assert torch.allclose(feats.norm(dim=-1), torch.ones(3))


def test_toy_image_features_and_patches(toy):
    from PIL import Image

    x = torch.stack([toy.preprocess(Image.new("RGB", (50, 40), (200, 10, 10)))] * 2)
    assert x.shape == (2, 3, 32, 32)
    pooled, patches = toy.encode_image_tokens(x)
    assert pooled.shape == (2, toy.embed_dim) and patches.shape == (2, 64, toy.embed_dim)
    torch.testing.assert_close(toy.encode_images(x), pooled)


def test_local_spec_loads_a_toy_format_folder(tmp_path, toy):
    for f in bundled_weights_dir().iterdir():
        if f.is_file():  # small/ is the bundled toy:small
            shutil.copy(f, tmp_path / f.name)
    local = load_backbone(f"local:{tmp_path}", cache=False)
    assert local.fingerprint() == toy.fingerprint()
    with pytest.raises(WeightsNotAvailable):
        load_backbone(f"local:{tmp_path / 'missing'}", cache=False)


@pytest.mark.parametrize("arch", ["vlmtune-tiny-vit", "vlmtune-tiny-rn"])
def test_openclip_adapter_on_random_init_config(openclip_tiny, arch):
    backbone = load_backbone(f"openclip:{arch}", cache=False)
    assert backbone.embed_dim == 64 and backbone.context_length == 77
    _check_text_path(backbone, ["a photo of a dog.", "a centered satellite photo of annual crop land."])
    size = 32 if "vit" in arch else 64
    images = torch.randn(2, 3, size, size)
    pooled, patches = backbone.encode_image_tokens(images)
    ref = backbone.model.encode_image(images, normalize=True)
    torch.testing.assert_close(pooled, ref, atol=1e-5, rtol=1e-5)
    assert patches.shape[0] == 2 and patches.shape[-1] == 64 and patches.shape[1] >= 4


def test_openclip_offline_cache_miss_names_spec_and_paths(openclip_tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setenv("VLMTUNE_OFFLINE", "1")
    with pytest.raises(WeightsNotAvailable) as err:
        load_backbone("openclip:ViT-B-32@openai", cache=False)
    msg = str(err.value)
    assert "openclip:ViT-B-32@openai" in msg and "looked in" in msg
    assert err.value.searched


def test_openclip_weights_from_a_local_file(openclip_tiny, tmp_path):
    from safetensors.torch import save_file

    source = load_backbone("openclip:vlmtune-tiny-vit", cache=False)
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in source.model.state_dict().items()}, str(path))
    loaded = load_backbone(f"openclip:vlmtune-tiny-vit@{path}", cache=False)
    assert loaded.fingerprint() == source.fingerprint()


def _tensor(out):
    return out if torch.is_tensor(out) else out.pooler_output


def test_hf_adapter_on_random_init_folder(hf_tiny):
    from PIL import Image

    folder, model = hf_tiny
    backbone = load_backbone(f"hf:{folder}", cache=False)
    assert backbone.embed_dim == 16 and backbone.token_width == 32
    _check_text_path(backbone, ["a cat.", "a photo of a dog."])
    tokens = backbone.tokenize(["a cat.", "dog"])
    ref = _tensor(model.get_text_features(input_ids=tokens))
    torch.testing.assert_close(backbone.encode_tokens(tokens, normalize=False), ref, atol=1e-5, rtol=1e-5)
    images = torch.stack([backbone.preprocess(Image.new("RGB", (40, 48), (9, 99, 199)))])
    pooled, patches = backbone.encode_image_tokens(images, normalize=False)
    torch.testing.assert_close(pooled, _tensor(model.get_image_features(pixel_values=images)), atol=1e-5, rtol=1e-5)
    assert patches.shape == (1, 16, 16)
    with torch.no_grad():  # visual prompt tokens enter before pre_layrnorm and change the pooled feature
        prompted = backbone.encode_images_prompted(images, torch.randn(2, 3, backbone.visual_width), normalize=False)
    assert prompted.shape == (2, 1, 16) and (prompted[0] - pooled).abs().max() > 1e-4


def test_hf_offline_miss_raises(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(WeightsNotAvailable, match="hf:openai/clip-vit-base-patch16"):
        load_backbone("hf:openai/clip-vit-base-patch16", cache=False)


def test_hf_pickled_weights_are_never_loaded(hf_tiny, tmp_path):
    """A folder with only pytorch_model.bin (pickle) is refused; vlmtune loads safetensors only."""
    folder, model = hf_tiny
    pickled = tmp_path / "pickled"
    shutil.copytree(folder, pickled)
    (pickled / "model.safetensors").unlink()
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    with pytest.raises(WeightsNotAvailable, match="safetensors"):
        load_backbone(f"hf:{pickled}", cache=False)


def test_openclip_loads_weights_without_unpickling(openclip_tiny):
    from vlmtune.backbones.openclip import _no_unpickling

    assert list(_no_unpickling().values()) == [True]
    pin = re.search(r"open_clip_torch>=([\d.]+)", (REPO / "pyproject.toml").read_text())
    assert pin is not None and tuple(map(int, pin.group(1).split("."))) >= (2, 29)  # first version that works
