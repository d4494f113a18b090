import pickle

import pytest
import torch
from safetensors.torch import save_file

import monomod
from monomod.frontend import ALIASES, load_model, resolve_name


def test_aliases_resolve_to_timm_names():
    import timm

    assert resolve_name("vit_base") == "vit_base_patch16_224"
    assert resolve_name("vit_huge") == "vit_huge_patch14_224"
    assert resolve_name("deit_small") == "deit_small_patch16_224"
    for alias, name in ALIASES.items():
        assert timm.is_model(name), alias


def test_timm_kwargs_pass_through():
    model = load_model("vit_tiny", img_size=32, num_classes=7, in_chans=1)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 7)
    assert not model.training


def test_unknown_model_suggests_close_names():
    with pytest.raises(monomod.MonomodError, match="unknown model 'vit_bse'.*did you mean.*vit_base"):
        load_model("vit_bse")


def test_factory_spec_builds_any_module():
    model = load_model("timm.models.vision_transformer:vit_tiny_patch16_224", img_size=32, num_classes=3)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3)
    with pytest.raises(monomod.MonomodError, match="not an nn.Module"):
        load_model("builtins:dict")
    with pytest.raises(monomod.MonomodError, match="cannot import"):
        load_model("no_such_pkg.mod:factory")


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_local_weights_round_trip(tmp_path, suffix):
    source = load_model("vit_tiny", img_size=32, num_classes=5)
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        save_file(source.state_dict(), str(path))
    else:
        torch.save({"model": source.state_dict()}, path)  # a training-checkpoint wrapper
    loaded = load_model("vit_tiny", img_size=32, num_classes=5, weights=path)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x), source(x), rtol=0, atol=0)


def test_position_embeddings_are_resampled_to_the_model_grid(tmp_path):
    source = load_model("vit_tiny", img_size=32, num_classes=5)
    path = tmp_path / "w.safetensors"
    save_file(source.state_dict(), str(path))
    bigger = load_model("vit_tiny", img_size=64, num_classes=5, weights=path)
    assert bigger.pos_embed.shape == (1, 1 + 16, 192)
    torch.testing.assert_close(bigger.cls_token, source.cls_token)


def test_missing_corrupt_and_mismatched_weights_are_one_line_errors(tmp_path):
    with pytest.raises(monomod.MonomodError, match="does not exist"):
        load_model("vit_tiny", img_size=32, weights=tmp_path / "nope.safetensors")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00garbage" * 50)
    with pytest.raises(monomod.MonomodError, match="cannot read weights file"):
        load_model("vit_tiny", img_size=32, weights=corrupt)
    truncated = tmp_path / "truncated.pth"
    torch.save(load_model("vit_tiny", img_size=32).state_dict(), truncated)
    truncated.write_bytes(truncated.read_bytes()[:1000])
    with pytest.raises(monomod.MonomodError, match="cannot read weights file"):
        load_model("vit_tiny", img_size=32, weights=truncated)
    other = tmp_path / "other.safetensors"
    save_file(load_model("vit_tiny", img_size=32, num_classes=3).state_dict(), str(other))
    with pytest.raises(monomod.MonomodError, match="shape mismatch: head.weight"):
        load_model("vit_tiny", img_size=32, num_classes=5, weights=other)


class _Payload:
    def __reduce__(self):
        return (print, ("arbitrary code ran",))


def test_arbitrary_pickles_are_refused(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"weight": _Payload()}, f)
    with pytest.raises(monomod.MonomodError, match="cannot read weights file"):
        load_model("vit_tiny", img_size=32, weights=path)
    assert "arbitrary code ran" not in capsys.readouterr().out
