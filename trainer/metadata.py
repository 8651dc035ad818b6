"""The metadata of every file the training loop saves, from the running ``Trainer``'s state."""

from __future__ import annotations

import json
import os

from trainer import checkpoint, setup
from trainer.captions import tag_frequency
from trainer.dataset_config import plan_summary


def trained_resolution(trainer) -> tuple[int, int]:
    """The first dataset's resolution (width, height): what modelspec.resolution means."""
    if trainer.plan.datasets:
        return tuple(trainer.plan.datasets[0].buckets.resolution)
    return trainer.family.default_size(trainer.models)


def training_metadata(trainer) -> dict[str, str]:
    """Every saved file's metadata: kohya's ``ss_*`` keys as WebUI viewers read them, ``modelspec.*``,
    the family's own keys and the recorded inputs; paths relative to the config."""
    cfg, t = trainer.cfg, trainer.cfg.training
    m = cfg.saving.metadata
    base = os.path.dirname(os.path.abspath(cfg.source))
    width, height = trained_resolution(trainer)
    meta = {
        "ss_session_id": trainer.session,
        # $SOURCE_DATE_EPOCH fixes the timestamps: the same inputs then give the same bytes
        "ss_training_started_at": str(setup.file_timestamp(trainer.started_at)),
        "ss_training_finished_at": str(setup.file_timestamp()),
        "modelspec.date": setup.file_date(setup.file_timestamp()),
        "ss_learning_rate": str(t.learning_rate),
        "ss_unet_lr": str(t.learning_rate),
        "ss_text_encoder_lr": str(cfg.network.text_encoder_lr or t.learning_rate),
        "ss_num_train_images": str(trainer.data.num_train_images),
        "ss_num_reg_images": str(trainer.data.num_reg_images),
        "ss_num_batches_per_epoch": str(trainer.schedule.batches_per_epoch),
        "ss_num_epochs": str(trainer.schedule.epochs),
        "ss_epoch": str(trainer.epoch),
        "ss_steps": str(trainer.step),
        "ss_max_train_steps": str(trainer.schedule.total_steps),
        "ss_lr_warmup_steps": str(t.warmup_steps(trainer.schedule.total_steps)),
        "ss_lr_scheduler": t.lr_scheduler,
        "ss_optimizer": f"{type(trainer.optimizer).__module__}.{type(trainer.optimizer).__name__}"
                        + (f"({json.dumps(t.optimizer_args)})" if t.optimizer_args else ""),
        "ss_mixed_precision": t.mixed_precision,
        "ss_seed": str(t.seed),
        "ss_noise_offset": str(t.noise_offset),
        "ss_min_snr_gamma": str(t.min_snr_gamma),
        "ss_gradient_checkpointing": str(t.gradient_checkpointing),
        "ss_gradient_accumulation_steps": str(t.gradient_accumulation_steps),
        "ss_max_grad_norm": str(t.max_grad_norm),
        "ss_prior_loss_weight": str(t.prior_loss_weight),
        "ss_network_dropout": str(cfg.network.dropout),
        "ss_network_train_unet_only": str(not cfg.network.train_text_encoder),
        "ss_tag_frequency": json.dumps(tag_frequency(trainer.plan)),
        "ss_datasets": json.dumps(checkpoint.shareable_paths(plan_summary(trainer.plan)["datasets"], base)),
        "ss_resolution": f"({width}, {height})",
        "modelspec.resolution": f"{width}x{height}",
        "ss_training_comment": m.description or "",
        "qrlora.trainer_config": json.dumps(checkpoint.shareable_paths(cfg.to_dict(), base)),
        **trainer.family.metadata(trainer.models, cfg),
        **trainer.inputs,
    }
    for key in ("title", "author", "description", "license", "trigger_phrase"):
        value = getattr(m, key)
        if value:
            meta[f"modelspec.{key}"] = value
    if m.tags:
        meta["modelspec.tags"] = m.tags if isinstance(m.tags, str) else ", ".join(m.tags)
    return meta
