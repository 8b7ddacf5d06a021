"""The public code's checkpoints load strictly (issue 19.2).

``tests/fixtures/public_resnet50_state_dict.json`` lists every state-dict key and tensor shape of the public
models, written once by running the public ``Pretrain/resnet.py`` (sumona00/X-Cardia @ 4dfb3c3) with torch 2.13.0:
``Pretraining.py``'s ``MultiModalNW`` image side (``res3d.*`` from ``generate_model(50, n_input_channels=1,
n_classes=128, conv1_t_size=7, conv1_t_stride=1)``, :490-499, plus ``fc_img`` 2048 → 128, :232), ``Finetuning.py``'s
``MultiTaskModel`` (``backbone.*`` with its fc replaced by 2048 → 128, :328/:336-338, and ten ``heads.N``, :305), and
the public backbone's stage output shapes for a (1, 1, 40, 48, 56) D×H×W input. The test builds state dicts from
those names and shapes — not from the companion's own model, which could not see a mismatch.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from xcardia.errors import XcardiaError
from xcardia.models.image_encoder import PUBLIC_ARCHITECTURE, ImageEncoder
from xcardia.models.weights import load_encoder

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "public_resnet50_state_dict.json").read_text())


def _state(shapes: dict, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: (torch.randn(v, generator=g) if v else torch.tensor(3)) if not k.endswith("num_batches_tracked")
            else torch.tensor(3) for k, v in shapes.items()}


@pytest.mark.parametrize("model, wrap", [
    ("pretraining_multimodal_nw", lambda s: s),                                      # best.pth / latest.pth
    ("finetuning_multitask", lambda s: {"model": s, "epoch": 7, "macro_val_auc": 0.71}),  # best_model.pt
])
def test_a_public_checkpoint_loads_strictly_into_the_public_architecture(tmp_path, model, wrap):
    state = _state(FIXTURE[model])
    path = tmp_path / "public.pth"
    torch.save(wrap(state), path)
    encoder, meta = load_encoder(path)
    assert encoder.spec == PUBLIC_ARCHITECTURE and meta["source"].startswith("public")
    loaded = encoder.state_dict()
    backbone = "res3d." if model.startswith("pretraining") else "backbone."
    feature = "fc_img." if model.startswith("pretraining") else "backbone.fc."
    for key, value in state.items():
        if key.startswith(backbone) and not key.startswith(backbone + "fc."):
            torch.testing.assert_close(loaded["backbone." + key[len(backbone):]], value)
        elif key.startswith(feature):
            torch.testing.assert_close(loaded["feature." + key[len(feature):]], value)
    assert len(loaded) == len([k for k in state if k.startswith(backbone) and not k.startswith(backbone + "fc.")]) + 2


def test_a_public_checkpoint_missing_one_tensor_is_refused_in_one_line(tmp_path):
    state = _state(FIXTURE["pretraining_multimodal_nw"])
    del state["res3d.layer2.0.downsample.0.weight"]
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(XcardiaError, match=r"1 encoder tensor\(s\) missing \(e\.g\. backbone\.layer2\.0\.downsample"):
        load_encoder(tmp_path / "broken.pth")


def test_the_public_architecture_has_the_public_keys_shapes_and_strides():
    """Same names and shapes as the public backbone (no downsample bias, no fc), and the same stage output shapes:
    the companion's (X, Y, Z) volume, transposed to (Z, Y, X) = (D, H, W), through the stem's (1, 2, 2) stride."""
    encoder = ImageEncoder(PUBLIC_ARCHITECTURE).eval()
    ours = {k: list(v.shape) for k, v in encoder.state_dict().items()}
    public = {"backbone." + k[len("res3d."):]: v for k, v in FIXTURE["pretraining_multimodal_nw"].items()
              if k.startswith("res3d.") and not k.startswith("res3d.fc.")}
    public.update({"feature." + k[len("fc_img."):]: v for k, v in FIXTURE["pretraining_multimodal_nw"].items()
                   if k.startswith("fc_img.")})
    assert ours == public
    b = encoder.backbone
    x = torch.zeros(1, 1, 56, 48, 40)  # X, Y, Z: the public D, H, W = 40, 48, 56
    with torch.no_grad():
        h = b.act(b.bn1(b.conv1(x.permute(0, 1, 4, 3, 2))))
        shapes = {"stem": list(h.shape)}
        h = b.maxpool(h)
        shapes["maxpool"] = list(h.shape)
        for name in ("layer1", "layer2", "layer3", "layer4"):
            h = getattr(b, name)(h)
            shapes[name] = list(h.shape)
        assert encoder(x).shape == (1, 128)
    assert shapes == FIXTURE["stage_shapes_for_input_1x1x40x48x56"]


def test_a_companion_resnet50_file_is_not_the_public_one():
    """MONAI's default ResNet-50 (downsample bias) differs from Hara's: its four downsample biases are what a public
    file lacks, and the error says so instead of loading partially."""
    from xcardia.models.image_encoder import ImageEncoderSpec
    from xcardia.models.weights import load_encoder_state

    monai_default = ImageEncoder(ImageEncoderSpec(arch="resnet50", conv1_stride=(1, 2, 2)))
    public = {k: v for k, v in _state(FIXTURE["pretraining_multimodal_nw"]).items()}
    with pytest.raises(XcardiaError, match=r"4 encoder tensor\(s\) missing \(e\.g\. backbone\.layer1\.0\.downsample\.0\.bias"):
        load_encoder_state(monai_default, public)


def _public_forward_fixture():
    return json.loads((Path(__file__).parent / "fixtures" / "public_resnet50_forward.json").read_text())


def _multitask(state: dict) -> dict:
    """The same tensors in ``Finetuning.py``'s ``MultiTaskModel`` naming (backbone.*, its fc the feature layer)."""
    out = {"backbone." + k[len("res3d."):]: v for k, v in state.items()
           if k.startswith("res3d.") and not k.startswith("res3d.fc.")}
    out.update({"backbone.fc." + k[len("fc_img."):]: v for k, v in state.items() if k.startswith("fc_img.")})
    g = torch.Generator().manual_seed(5)
    for n in range(10):
        out[f"heads.{n}.weight"], out[f"heads.{n}.bias"] = torch.randn(1, 128, generator=g), torch.zeros(1)
    return out


def _released(state: dict) -> dict:
    """The released checkpoint's shape: a MultiModalNW state dict with its tabular side and projections, under
    ``"state_dict"`` (the public README: ``model.load_state_dict(checkpoint["state_dict"], strict=False)``)."""
    g = torch.Generator().manual_seed(6)
    extra = {"proj_img.0.weight": torch.randn(256, 128, generator=g), "proj_img.0.bias": torch.zeros(256),
             "tab_enc.token_embed.weight": torch.randn(46, 256, generator=g), "nw_head.log_tau": torch.zeros(())}
    return {"state_dict": {**state, **extra}, "epoch": 42}


@pytest.mark.parametrize("wrapper, wrap, ignored", [
    ("bare MultiModalNW (best.pth)", lambda s: s, "res3d.fc.* 2"),
    ("released {'state_dict': …}", _released, "ignored 6"),
    ("DDP module.-prefixed", lambda s: {"module." + k: v for k, v in s.items()}, "res3d.fc.* 2"),
    ("released, module.-prefixed", lambda s: _released({"module." + k: v for k, v in s.items()}), "ignored 6"),
    ("Finetuning.py {'model': …}", lambda s: {"model": _multitask(s), "epoch": 3, "macro_val_auc": 0.7}, "heads.* 20"),
    ("Finetuning.py module.-prefixed", lambda s: {"model": {"module." + k: v for k, v in _multitask(s).items()}},
     "heads.* 20"),
])
def test_a_public_checkpoint_computes_what_the_public_model_computes(tmp_path, wrapper, wrap, ignored):
    """Issue 30.5: every wrapper a public file comes in loads strictly, says in one line what it mapped and ignored,
    and the loaded encoder's 128-d feature equals the public MultiModalNW's (``res3d`` → ``fc_img``) on the same
    input — computed once by the public ``Pretrain/resnet.py`` (``tests/fixtures/public_resnet50_forward.json``),
    so a key mapped to the wrong tensor or a stride read the wrong way round cannot pass."""
    from public_weights import public_input, public_like_state

    state = public_like_state(FIXTURE["pretraining_multimodal_nw"])
    torch.save(wrap(state), tmp_path / "public.pth")
    encoder, meta = load_encoder(tmp_path / "public.pth")
    assert encoder.spec == PUBLIC_ARCHITECTURE, wrapper
    report = meta["load_report"]
    assert report.startswith("loaded 320 encoder tensors") and "none missing" in report and ignored in report, report
    assert "\n" not in report
    with torch.no_grad():
        feature = encoder.eval()(public_input().permute(0, 1, 4, 3, 2))  # our (X, Y, Z) = the public (D, H, W) read back
    expected = torch.tensor(_public_forward_fixture()["feature"]).unsqueeze(0)
    torch.testing.assert_close(feature, expected, rtol=1e-4, atol=1e-4)
