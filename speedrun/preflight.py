"""What the entry point checks before an attempt may touch its run folder: the data, the model's
shapes, the checkpoint to continue from. Each check raises one clear error; none writes anything
(a corrupt checkpoint is set aside, which is not part of the run's record)."""

from __future__ import annotations

import logging

from omegaconf import DictConfig

from speedrun.run_folder import RunFolder

log = logging.getLogger("speedrun")


def prepare_data(cfg: DictConfig):
    """Build or verify the data once, in this process, before any rank starts."""
    from hydra.utils import instantiate

    data = instantiate(cfg.data)
    data.prepare(model_vocab_size=cfg.model.get("vocab_size"))
    log.info("data: %s", data.describe())
    return data


def check_model_vocab(cfg: DictConfig, data) -> None:
    """A model whose vocabulary cannot hold every token id of the data is refused."""
    if data is not None and cfg.model.get("vocab_size") is not None:
        data.check_model_vocab(cfg.model.vocab_size)


def model_shapes(cfg: DictConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape in the model's state dict, from the model built on the meta device (no
    memory, no real initialisation; it costs torch's compile machinery a second to import, so it is
    built only when a checkpoint must be matched against it)."""
    import torch
    from hydra.utils import instantiate

    with torch.device("meta"):
        model = instantiate(cfg.model)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def choose_checkpoint(
    config: dict, folder: RunFolder, cfg: DictConfig, log_forced: bool
) -> tuple[str, dict | None]:
    """The checkpoint this job continues from ("never" for a fresh start) and the config it was saved
    with, chosen once here, before
    any rank starts: a corrupt checkpoint is set aside with one warning, a config that changes the
    run is refused in one line (or, with trainer.resume_force, logged once), and a checkpoint whose
    tensors cannot load into this model is refused even when forced, naming them."""
    from speedrun.checkpoint import CheckpointError, CheckpointManager, select_checkpoint

    tc = config["trainer"]
    manager = CheckpointManager(folder.path / "checkpoints")
    # mmap: only the config and shapes are read here; the ranks load the tensors.
    found = select_checkpoint(
        manager, str(tc["resume"]), config, tc["resume_force"], mmap=True, warn=log_forced
    )
    if found is None:
        return "never", None
    state, path = found
    expected = model_shapes(cfg)
    saved = {name: tuple(t.shape) for name, t in state["model"].items()}
    mismatched = sorted(n for n in expected.keys() | saved.keys() if expected.get(n) != saved.get(n))
    if mismatched:
        shown = ", ".join(
            f"{n} {saved.get(n, 'absent')} -> {expected.get(n, 'absent')}" for n in mismatched[:4]
        )
        more = f" and {len(mismatched) - 4} more" if len(mismatched) > 4 else ""
        raise CheckpointError(
            f"checkpoint {path} cannot load into this model: {shown}{more}; resume with the model it was "
            "trained with, or start in a new folder"
        )
    return str(path), state.get("config")
