"""Track rules: a track's limits (the `rules` config group), checked once per run against what it measured.

`TrackRules.check(summary, config)` returns summary.json's `rules` block,
`{"preset": name, "pass": bool, "checks": [{"name", "limit", "value", "pass"}, ...]}`, one check per
limit the preset sets (a limit left null is not checked). Breaking a rule does not fail the run: it
still ends `completed`, with `rules.pass: false`, and `failure_lines` says on the console which check
failed. The checks read:

| check            | value                                                   | passes when            |
| ---------------- | ------------------------------------------------------- | ---------------------- |
| `artifact_bytes` | `artifact_bytes` (model bytes + code bytes)             | value <= limit         |
| `train_time_s`   | `train_time_ms` / 1000 (training only, as the tracks)   | value <= limit         |
| `eval_time_s`    | the final score's evaluation / 1000: `quant_eval_time_ms` (the artifact's round trip) when exported, else `eval_time_ms` | value <= limit |
| `val_loss`       | `val_loss` (the final validation, before export)        | value <= limit         |
| `val_tokens`     | `val_tokens_scored` (target tokens each validation scores) | value == limit; limit 0 (the whole split): `data.val_tokens` is 0 |
| `hardware`       | e.g. `8xNVIDIA H100 80GB HBM3`, `1xcpu` (provenance)    | that many GPUs whose name holds `gpu_name` |

A value the run did not measure (no export, a failed run) is null and fails its check. Nothing here
imports torch.
"""

from __future__ import annotations

WHOLE_SPLIT = "whole split"


def _check(name: str, limit: object, value: object, passed: bool) -> dict:
    return {"name": name, "limit": limit, "value": value, "pass": bool(passed)}


def _at_most(name: str, limit: float | None, value: float | None) -> dict:
    return _check(name, limit, value, value is not None and value <= limit)


def _seconds(ms: float | None) -> float | None:
    return None if ms is None else round(ms / 1000.0, 3)


def hardware_of(summary: dict) -> str:
    """What ran, as `<count>x<device>`: the GPUs of the provenance block, else the CPU ranks."""
    provenance = summary.get("provenance") or {}
    if provenance.get("gpu_name"):
        return f"{provenance.get('gpu_count')}x{provenance['gpu_name']}"
    return f"{summary.get('world_size') or 1}xcpu"


class TrackRules:
    """One track's limits; None means the track sets no such limit (see the module docstring)."""

    def __init__(
        self,
        name: str = "custom",
        max_artifact_bytes: int | None = None,
        max_train_seconds: float | None = None,
        max_eval_seconds: float | None = None,
        max_val_loss: float | None = None,
        val_tokens: int | None = None,
        gpu_count: int | None = None,
        gpu_name: str | None = None,
    ):
        self.name = name
        self.max_artifact_bytes = max_artifact_bytes
        self.max_train_seconds = max_train_seconds
        self.max_eval_seconds = max_eval_seconds
        self.max_val_loss = max_val_loss
        self.val_tokens = val_tokens
        self.gpu_count = gpu_count
        self.gpu_name = gpu_name

    def check(self, summary: dict, config: dict) -> dict:
        """summary.json's `rules` block for a run that ended with `summary` under `config`."""
        checks = []
        if self.max_artifact_bytes is not None:
            checks.append(_at_most("artifact_bytes", self.max_artifact_bytes, summary.get("artifact_bytes")))
        if self.max_train_seconds is not None:
            value = _seconds(summary.get("train_time_ms"))
            checks.append(_at_most("train_time_s", self.max_train_seconds, value))
        if self.max_eval_seconds is not None:
            checks.append(
                _at_most("eval_time_s", self.max_eval_seconds, _seconds(_final_score_eval_ms(summary)))
            )
        if self.max_val_loss is not None:
            checks.append(_at_most("val_loss", self.max_val_loss, summary.get("val_loss")))
        if self.val_tokens is not None:
            checks.append(self._val_tokens_check(summary, config))
        if self.gpu_count is not None or self.gpu_name is not None:
            checks.append(self._hardware_check(summary))
        return {"preset": self.name, "pass": all(c["pass"] for c in checks), "checks": checks}

    def _val_tokens_check(self, summary: dict, config: dict) -> dict:
        scored = summary.get("val_tokens_scored")
        if self.val_tokens == 0:
            # Whether the split was cut short is the config's to say: the summary knows only the count.
            whole = (config.get("data") or {}).get("val_tokens") == 0
            return _check("val_tokens", WHOLE_SPLIT, scored, scored is not None and whole)
        return _check("val_tokens", self.val_tokens, scored, scored == self.val_tokens)

    def _hardware_check(self, summary: dict) -> dict:
        provenance = summary.get("provenance") or {}
        name, count = provenance.get("gpu_name"), provenance.get("gpu_count")
        count_ok = self.gpu_count is None or count == self.gpu_count
        name_ok = self.gpu_name is None or (name is not None and self.gpu_name.lower() in name.lower())
        limit = f"{self.gpu_count or 'N'}x{self.gpu_name or 'GPU'}"
        return _check("hardware", limit, hardware_of(summary), count_ok and name_ok)


def failure_lines(block: dict) -> list[str]:
    """One console line per failed check of a `rules` block: what was measured against which limit."""
    lines = []
    for check in block["checks"]:
        if check["pass"]:
            continue
        name, limit, value = check["name"], check["limit"], check["value"]
        if value is None:
            lines.append(f"{name}: not measured by this run (limit {limit})")
        elif name == "hardware":
            lines.append(f"hardware: ran on {value}, not the track's hardware ({limit})")
        elif name == "val_tokens":
            lines.append(f"val_tokens: scored {value:,} validation tokens, the track scores {_tokens(limit)}")
        else:
            lines.append(f"{name}: {_number(value)} exceeds the limit {_number(limit)}")
    return lines


def _tokens(limit: object) -> str:
    if limit == WHOLE_SPLIT:
        return "the whole validation split (data.val_tokens=0)"
    return f"exactly the first {limit:,}"


def _number(value: object) -> str:
    return (
        f"{value:,}" if isinstance(value, int) else f"{value:g}" if isinstance(value, float) else str(value)
    )


def _final_score_eval_ms(summary: dict) -> float | None:
    """The final score's evaluation time: the artifact's round trip when there is one, else the validation."""
    quant = summary.get("quant_eval_time_ms")
    return quant if quant is not None else summary.get("eval_time_ms")
