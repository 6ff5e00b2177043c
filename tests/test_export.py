"""The artifact: the reference's int8 + zlib bytes, the int6 and compressor variants, their round trips."""

from __future__ import annotations

import io
import subprocess
import sys
import zlib

import pytest
import torch

from speedrun.compressors import COMPRESSORS, get_compressor
from speedrun.export import (
    ArtifactError,
    ArtifactFormat,
    dequantize_state_dict,
    load_artifact,
    quantize_float_tensor,
    quantize_state_dict,
)
from speedrun.models import GPT
from speedrun.models.protocol import parameter_roles
from tests.conftest import REPO, cli_env, read_metrics, read_summary, run_train

# Big enough that tok_emb (512x256) and the MLP matrices (512x256) exceed the 65,536-element
# keep-as-float threshold and really get quantized; the rest stays float.
SMALL = dict(vocab_size=512, num_layers=2, model_dim=256, num_heads=4, num_kv_heads=2)


def trained_looking_gpt(seed: int = 0, spread: float = 0.05) -> GPT:
    torch.manual_seed(seed)
    model = GPT(**SMALL)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * spread)
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
    restored = dequantize_state_dict(quantize_state_dict({"w": t})[0])["w"]
    step = t.abs().amax(dim=1, keepdim=True) / 127
    # Rows whose values are all below 1 share the smallest allowed scale, 1/127.
    assert ((restored - t).abs() <= torch.maximum(step, torch.tensor(1 / 127))).all()


def test_large_vectors_get_one_scale():
    t = torch.randn(70_000, generator=torch.Generator().manual_seed(0))
    obj, stats = quantize_state_dict({"v": t})
    assert obj["scales"]["v"].ndim == 0 and "v" not in obj.get("qmeta", {})
    restored = dequantize_state_dict(obj)["v"]
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
    obj, _ = quantize_state_dict(state, roles={"blocks.0.attn_scale": "scalar"})
    assert obj["passthrough"]["blocks.0.attn_scale"].dtype == torch.float32  # control: exact
    assert obj["passthrough"]["blocks.0.attn.c_q.weight"].dtype == torch.float16  # stored small
    restored = dequantize_state_dict(obj)
    assert {k: v.dtype for k, v in restored.items()} == {k: v.dtype for k, v in state.items()}
    assert torch.equal(restored["blocks.0.attn_scale"], state["blocks.0.attn_scale"])
    assert torch.equal(restored["step"], state["step"])
    assert torch.equal(restored["blocks.0.attn.c_q.weight"], state["blocks.0.attn.c_q.weight"].half().float())


def test_model_round_trip_through_the_artifact_file(tmp_path):
    model = trained_looking_gpt()
    path = tmp_path / "final_model.int8.ptz"
    payload = ArtifactFormat().write(model.state_dict(), tmp_path, parameter_roles(model))
    assert payload["compressed_bytes"] == path.stat().st_size
    # No temporary file left behind; the raw state dict is kept next to the artifact, as the reference does.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final_model.int8.ptz", "final_model.pt"]
    raw = torch.load(tmp_path / "final_model.pt", weights_only=True)
    assert all(torch.equal(raw[k], v) for k, v in model.state_dict().items())
    assert payload["raw_model_bytes"] == (tmp_path / "final_model.pt").stat().st_size

    obj, stats = quantize_state_dict(model.state_dict())
    mlp = {f"blocks.{i}.mlp.{layer}.weight" for i in range(2) for layer in ("fc", "proj")}
    assert set(obj["quantized"]) == {"tok_emb.weight"} | mlp
    assert stats["payload_bytes"] < stats["baseline_tensor_bytes"] / 2

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
    ArtifactFormat().write(model.state_dict(), tmp_path, parameter_roles(model))
    restored = load_artifact(tmp_path / "final_model.int8.ptz")
    assert restored["tok_emb.weight"].dtype == torch.bfloat16
    assert restored["blocks.0.resid_mix"].dtype == torch.float32


@pytest.mark.parametrize("compressor", list(COMPRESSORS))
@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_artifact_is_reported_with_its_path(tmp_path, damage, compressor):
    artifact = ArtifactFormat(compressor=compressor, level=1)
    artifact.write(trained_looking_gpt().state_dict(), tmp_path, {})
    path = (tmp_path / artifact.filename).rename(tmp_path / "broken.ptz")
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
    with pytest.raises(ArtifactError, match="plain.ptz.*is not one of.*'int8_clean_per_row_v1'"):
        load_artifact(path)


# ------------------------------------------------------------------ the reference's bytes


def test_int8_zlib_is_the_reference_format_byte_for_byte(tmp_path):
    """The default format's file is zlib level 9 over torch.save of the int8 object, and each matrix
    row is quantised as the reference does it, computed here from its definition."""
    model = trained_looking_gpt()
    roles = parameter_roles(model)
    ArtifactFormat().write(model.state_dict(), tmp_path, roles)
    obj, _ = quantize_state_dict(model.state_dict(), roles)
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    assert (tmp_path / "final_model.int8.ptz").read_bytes() == zlib.compress(buffer.getvalue(), level=9)
    assert obj["__quant_format__"] == "int8_clean_per_row_v1"

    w = model.state_dict()["blocks.0.mlp.fc.weight"].float()
    clip = torch.quantile(w.abs(), 0.9999984, dim=1)  # the 99.99984th percentile of each row
    scale = (clip / 127).clamp_min(1 / 127)
    expected = torch.round(torch.maximum(torch.minimum(w, clip[:, None]), -clip[:, None]) / scale[:, None])
    assert torch.equal(obj["quantized"]["blocks.0.mlp.fc.weight"], expected.to(torch.int8))
    assert torch.equal(obj["scales"]["blocks.0.mlp.fc.weight"], scale.half())


# ------------------------------------------------------------------ variants


VARIANTS = [(scheme, compressor) for scheme in ("int8", "int6") for compressor in COMPRESSORS]


def one_step(t: torch.Tensor, levels: int, min_scale: float) -> torch.Tensor:
    """The largest error per-row quantisation may make: one step of its row's range (or the smallest
    allowed scale); the scale's rounding to fp16 adds at most 127 x 2^-11 of a step."""
    rows = t.float().abs().amax(dim=1, keepdim=True) if t.ndim == 2 else t.float().abs().max()
    return torch.clamp(rows / levels, min=min_scale) * (1 + 127 * 2**-11)


@pytest.mark.parametrize("scheme,compressor", VARIANTS, ids=[f"{s}_{c}" for s, c in VARIANTS])
def test_each_variant_round_trips_within_its_error_bound(tmp_path, scheme, compressor):
    model = trained_looking_gpt()
    roles = parameter_roles(model)
    artifact = ArtifactFormat(scheme=scheme, compressor=compressor)
    payload = artifact.write(model.state_dict(), tmp_path, roles)
    path = tmp_path / artifact.filename
    assert (
        payload["format"] == f"{scheme}_{compressor}"
        and payload["level"] == COMPRESSORS[compressor].strongest
    )
    assert payload["compressed_bytes"] == path.stat().st_size
    assert payload["ratio"] == pytest.approx(payload["raw_bytes"] / payload["compressed_bytes"])

    restored = load_artifact(path)  # the compressor is recognised from the file itself
    obj, _ = quantize_state_dict(model.state_dict(), roles, scheme)
    for name, original in model.state_dict().items():
        error = (restored[name].float() - original.float()).abs()
        if name in obj["quantized"]:
            if scheme == "int6" and roles[name] == "matrix":  # 63 levels, scales floored only by fp16
                assert obj["quantized"][name].abs().max() <= 31, name
                assert (error <= one_step(original, 31, torch.finfo(torch.float16).tiny)).all(), name
            else:  # the reference's int8: 255 levels, scales of at least 1/127
                assert (error <= one_step(original, 127, 1 / 127)).all(), name
        elif roles.get(name) == "scalar":
            assert torch.equal(restored[name], original), name  # control tensors: exact
        else:
            assert torch.equal(restored[name], original.half().float()), name  # stored in fp16
    with torch.no_grad():
        loss, restored_loss = model(*batch()).item(), GPT(**SMALL).requires_grad_(False)
        restored_loss.load_state_dict(restored)
        assert abs(restored_loss(*batch()).item() - loss) < (0.05 if scheme == "int6" else 0.01)


def test_int6_uses_fewer_levels_and_compresses_smaller(tmp_path):
    # Rows spanning more than +-1, as a trained record model's do (its int8 + zlib artifact takes about
    # 0.93 bytes per parameter): int8 then uses all its levels. (Below 1, int8's 1/127 floor on the
    # scale already leaves it fewer levels than int6.) Every matrix quantised: none kept in fp16.
    model = trained_looking_gpt(spread=1.0)
    roles = parameter_roles(model)
    sizes = {}
    for scheme in ("int8", "int6"):
        artifact = ArtifactFormat(scheme=scheme, compressor="lzma", keep_float_max_numel=4096)
        sizes[scheme] = artifact.write(model.state_dict(), tmp_path, roles)["compressed_bytes"]
    obj, _ = quantize_state_dict(model.state_dict(), roles, "int6", keep_float_max_numel=4096)
    int8, _ = quantize_state_dict(model.state_dict(), roles, "int8", keep_float_max_numel=4096)
    assert obj["__quant_format__"] == "mixed_int6_int8_per_row_v1"
    # Matrices get 63 levels, each row's largest value the top one; the embedding (role embed) is int8's.
    fc = obj["quantized"]["blocks.0.mlp.fc.weight"]
    assert (fc.abs().amax(dim=1) == 31).all() and obj["qmeta"]["blocks.0.mlp.fc.weight"]["bits"] == 6
    assert torch.equal(obj["quantized"]["tok_emb.weight"], int8["quantized"]["tok_emb.weight"])
    assert "bits" not in obj["qmeta"]["tok_emb.weight"]
    assert sizes["int6"] < 0.85 * sizes["int8"], sizes


def test_file_names_and_what_counts_as_code(tmp_path):
    assert ArtifactFormat().filename == "final_model.int8.ptz"  # the reference's, for int8 + zlib
    assert ArtifactFormat(scheme="int6", compressor="zstd").filename == "final_model.int6.zstd.ptz"
    script = tmp_path / "train_gpt.py"
    script.write_text("print('a submission')\n" * 10)
    named = ArtifactFormat(code_files=[str(script)])
    assert named.code_bytes() == script.stat().st_size and named.code_description() == "train_gpt.py"


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"scheme": "int4"}, r"export.scheme='int4' is not one of int8, int6"),
        ({"compressor": "gzip"}, r"export.compressor='gzip' is not one of zlib, lzma, zstd, brotli"),
        ({"compressor": "zstd", "level": 23}, r"export.level=23 is out of range for zstd \(1..22\)"),
        ({"code_files": ["no_such_script.py"]}, r"export.code_files: .*no_such_script.py not found"),
    ],
)
def test_bad_export_settings_are_refused_naming_the_key(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ArtifactFormat(**kwargs)


@pytest.mark.parametrize("package,extra", [("zstandard", "zstd"), ("brotli", "brotli")])
def test_a_missing_optional_compressor_names_its_extra(package, extra):
    """In a process where the package cannot be imported (as when the extra is not installed)."""
    code = (
        f"import sys; sys.modules[{package!r}] = None\n"
        "from speedrun.compressors import get_compressor\n"
        f"get_compressor({extra!r})\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode != 0
    assert f"needs the {package} package: pip install 'speedrun[{extra}]'" in proc.stderr.splitlines()[-1]
    assert get_compressor(extra)[0].name == extra  # here, with the dev extra, it is installed


@pytest.mark.usefixtures("corpus")
def test_a_run_exports_the_chosen_variant_and_reports_its_round_trip(tmp_path):
    """int6 + zstd through the CLI; a low keep-float threshold so the tiny model's matrices are quantised."""
    run_dir = tmp_path / "run"
    run_train(run_dir, "trainer.max_steps=10", "trainer.val_every=5", "export=int6_zstd",
              "export.keep_float_max_numel=1024")  # fmt: skip
    summary = read_summary(run_dir)
    assert summary["status"] == "completed"
    export = summary["export"]
    assert export["format"] == "int6_zstd" and export["file"] == "final_model.int6.zstd.ptz"
    assert summary["model_bytes"] == export["compressed_bytes"] == (run_dir / export["file"]).stat().st_size
    assert export["raw_model_bytes"] == (run_dir / "final_model.pt").stat().st_size
    assert not (run_dir / "final_model.int8.ptz").exists()
    quant = [r for r in read_metrics(run_dir) if "quant/val_loss" in r]
    assert len(quant) == 1 and quant[0]["quant/val_loss"] == summary["quant_val_loss"]
    assert quant[0]["export/compressed_bytes"] == export["compressed_bytes"]  # logged, for wandb too
    assert quant[0]["export/raw_bytes"] == export["raw_bytes"] and quant[0]["export/ratio"] == export["ratio"]
    # Quantised matrices change the loss a little, not a lot.
    assert summary["quant_val_loss"] != summary["val_loss"]
    assert abs(summary["quant_val_loss"] - summary["val_loss"]) < 0.1
    log = (run_dir / "train.log").read_text()
    assert "final_int6_zstd_roundtrip val_loss:" in log and "export int6_zstd: tensors" in log
    assert summary["eval_time_ms"] > 0


@pytest.mark.usefixtures("corpus")
def test_a_missing_compressor_package_stops_the_run_in_one_line(tmp_path):
    """zstandard made unimportable by a stand-in package first on the path: one error line, exit 1."""
    blocker = tmp_path / "blocked" / "zstandard"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('zstandard blocked by the test')\n")
    env = cli_env(PYTHONPATH=str(blocker.parent))
    proc = run_train(tmp_path / "run", "trainer.max_steps=2", "export=int8_zstd", env=env, check=False)
    assert proc.returncode == 1
    errors = [line for line in proc.stdout.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stdout[-2000:]
    assert "export.compressor=zstd needs the zstandard package: pip install 'speedrun[zstd]'" in errors[0]
    assert "Traceback" not in proc.stdout + proc.stderr
    assert read_summary(tmp_path / "run")["status"] == "failed"
