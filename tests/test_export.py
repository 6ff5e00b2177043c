from __future__ import annotations

import io
import zlib

import pytest
import torch

from speedrun.export import (
    ArtifactError,
    dequantize_state_dict_int8,
    load_artifact,
    quantize_float_tensor,
    quantize_state_dict_int8,
    save_artifact,
)
from speedrun.models import GPT
from speedrun.models.protocol import scalar_parameter_names

# Big enough that tok_emb (512x256) and the MLP matrices (512x256) exceed the 65,536-element
# keep-as-float threshold and really get quantized; the rest stays float.
SMALL = dict(vocab_size=512, num_layers=2, model_dim=256, num_heads=4, num_kv_heads=2)


def trained_looking_gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(**SMALL)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, 512, (2, 33), generator=torch.Generator().manual_seed(0))
    return tokens[:, :-1], tokens[:, 1:]


def test_per_row_error_is_within_one_quantization_step():
    g = torch.Generator().manual_seed(0)
    row_scales = torch.logspace(-3, 1, 300)[:, None]
    t = torch.randn(300, 257, generator=g) * row_scales
    q, scale = quantize_float_tensor(t)
    assert q.dtype == torch.int8 and scale.dtype == torch.float16 and scale.shape == (300,)
    restored = dequantize_state_dict_int8(quantize_state_dict_int8({"w": t})[0])["w"]
    step = t.abs().amax(dim=1, keepdim=True) / 127
    # Rows whose values are all below 1 share the smallest allowed scale, 1/127.
    assert ((restored - t).abs() <= torch.maximum(step, torch.tensor(1 / 127))).all()


def test_large_vectors_get_one_scale():
    t = torch.randn(70_000, generator=torch.Generator().manual_seed(0))
    obj, stats = quantize_state_dict_int8({"v": t})
    assert obj["scales"]["v"].ndim == 0 and "v" not in obj.get("qmeta", {})
    restored = dequantize_state_dict_int8(obj)["v"]
    assert (restored - t).abs().max() <= t.abs().max() / 127
    assert stats["num_float_tensors"] == 1


def test_small_tensors_keep_their_dtypes():
    state = {
        "blocks.0.attn_scale": torch.randn(64),
        "blocks.0.attn.c_q.weight": torch.randn(64, 64),
        "half": torch.randn(8).half(),
        "bf": torch.randn(8).bfloat16(),
        "step": torch.tensor([3, 4], dtype=torch.int64),
    }
    obj, _ = quantize_state_dict_int8(state, keep_fp32={"blocks.0.attn_scale"})
    assert obj["passthrough"]["blocks.0.attn_scale"].dtype == torch.float32  # control: exact
    assert obj["passthrough"]["blocks.0.attn.c_q.weight"].dtype == torch.float16  # stored small
    restored = dequantize_state_dict_int8(obj)
    assert {k: v.dtype for k, v in restored.items()} == {k: v.dtype for k, v in state.items()}
    assert torch.equal(restored["blocks.0.attn_scale"], state["blocks.0.attn_scale"])
    assert torch.equal(restored["step"], state["step"])
    assert torch.equal(restored["blocks.0.attn.c_q.weight"], state["blocks.0.attn.c_q.weight"].half().float())


def test_model_round_trip_through_the_artifact_file(tmp_path):
    model = trained_looking_gpt()
    path = tmp_path / "final_model.int8.ptz"
    written = save_artifact(model.state_dict(), path, keep_fp32=scalar_parameter_names(model))
    assert written == path.stat().st_size
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left behind

    obj, stats = quantize_state_dict_int8(model.state_dict())
    mlp = {f"blocks.{i}.mlp.{layer}.weight" for i in range(2) for layer in ("fc", "proj")}
    assert set(obj["quantized"]) == {"tok_emb.weight"} | mlp
    assert stats["int8_payload_bytes"] < stats["baseline_tensor_bytes"] / 2

    restored = load_artifact(path)
    original = model.state_dict()
    assert set(restored) == set(original)
    for name, tensor in original.items():
        assert restored[name].shape == tensor.shape and restored[name].dtype == tensor.dtype, name
    worst = max((restored[n] - t).abs().max().item() for n, t in original.items())
    assert 0 < worst < 0.01

    reloaded = GPT(**SMALL)
    reloaded.load_state_dict(restored)
    with torch.no_grad():
        assert abs(reloaded(*batch()).item() - model(*batch()).item()) < 0.01


def test_bf16_embedding_comes_back_bf16(tmp_path):
    model = trained_looking_gpt().cast_for_mixed_precision()
    save_artifact(model.state_dict(), tmp_path / "m.ptz")
    restored = load_artifact(tmp_path / "m.ptz")
    assert restored["tok_emb.weight"].dtype == torch.bfloat16
    assert restored["blocks.0.resid_mix"].dtype == torch.float32


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_artifact_is_reported_with_its_path(tmp_path, damage):
    path = tmp_path / "broken.ptz"
    save_artifact(trained_looking_gpt().state_dict(), path)
    blob = bytearray(path.read_bytes())
    if damage == "truncate":
        blob = blob[: len(blob) // 2]
    else:
        blob[len(blob) // 2] ^= 0xFF
    path.write_bytes(bytes(blob))
    with pytest.raises(ArtifactError, match="broken.ptz"):
        load_artifact(path)


def test_other_payloads_are_refused(tmp_path):
    path = tmp_path / "plain.ptz"
    buffer = io.BytesIO()
    torch.save({"tok_emb.weight": torch.zeros(2)}, buffer)
    path.write_bytes(zlib.compress(buffer.getvalue()))
    with pytest.raises(ArtifactError, match="plain.ptz.*not 'int8_clean_per_row_v1'"):
        load_artifact(path)
