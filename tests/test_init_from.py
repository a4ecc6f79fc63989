"""run.init_from from what users have (issue 19 item 2): a timm ViT checkpoint (safetensors or a torch file, with
model.timm_layout) into the dense encoder and, in the same step, upcycled into the MoE model; an export folder; a
plain state dict file; one-line errors for a timm file without the layout and for an unreadable file."""

import pytest
import torch
from conftest import REPO
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer

from condmoe.train.config import load_config
from condmoe.train.engine import build_model, initialise_from


def timm_vit(img_size: int = 32) -> VisionTransformer:
    torch.manual_seed(1)  # the debug size's geometry: 64 wide, 4 blocks of 4 heads, MLP ratio 2, patches of 8
    return VisionTransformer(img_size=img_size, patch_size=8, embed_dim=64, depth=4, num_heads=4, mlp_ratio=2.0,
                             num_classes=0).eval()


def model(*overrides):
    cfg = load_config(REPO / "configs" / "demo.yaml", ["model.timm_layout=true", *overrides])
    return build_model(cfg, 50, 4).eval()


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_a_timm_vit_file_initialises_the_dense_encoder_to_timms_features(tmp_path, suffix):
    vit = timm_vit()
    path = tmp_path / f"vit{suffix}"
    state = {k: v.contiguous() for k, v in vit.state_dict().items()}
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save({"model": state}, path)
    dense = model("moe.num_experts=0")
    initialise_from(dense, str(path))
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(dense.visual_features(images), vit.forward_features(images)[:, 0], atol=1e-5)


def test_a_timm_vit_upcycles_into_the_moe_model_in_one_step(tmp_path):
    vit = timm_vit(img_size=48)  # another resolution too: 6 x 6 positions resized to the model's 4 x 4
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(tmp_path / "vit.safetensors"))
    moe = model("moe.drop_tokens=false")
    initialise_from(moe, str(tmp_path / "vit.safetensors"))
    experts = moe.blocks[0].mlp.experts.deepspeed_experts
    assert all(torch.equal(e.fc1.weight, vit.blocks[0].mlp.fc1.weight) for e in experts)  # every expert the MLP
    assert torch.equal(moe.blocks[1].attn.qkv.weight, vit.blocks[1].attn.qkv.weight)
    assert moe.image_embed.pos_embed.shape == (1, 16, 64)


def test_an_export_folder_and_a_state_dict_file(tmp_path):
    source = model("moe.num_experts=0")
    with torch.no_grad():
        source.proj.weight.add_(1.0)
    source.save_pretrained(tmp_path / "export")
    torch.save(source.state_dict(), tmp_path / "state.pt")
    for path in (tmp_path / "export", tmp_path / "state.pt"):
        target = model("moe.num_experts=0")
        initialise_from(target, str(path))
        assert all(torch.equal(a, b) for a, b in zip(target.state_dict().values(), source.state_dict().values()))


def test_timm_file_without_the_layout_and_unreadable_files_are_one_line_errors(tmp_path):
    save_file({k: v.contiguous() for k, v in timm_vit().state_dict().items()}, str(tmp_path / "vit.safetensors"))
    plain = build_model(load_config(REPO / "configs" / "demo.yaml", ["moe.num_experts=0"]), 50, 4)
    with pytest.raises(ValueError, match="needs model.timm_layout=true"):
        initialise_from(plain, str(tmp_path / "vit.safetensors"))
    (tmp_path / "junk.bin").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read it as safetensors or a torch state dict"):
        initialise_from(plain, str(tmp_path / "junk.bin"))
