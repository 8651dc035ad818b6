"""The training loop: family-independent, on accelerate, resumable to the exact step.

Reproducibility is by construction: the data order is a function of (seed, epoch), and the
noise and timesteps of each batch come from a generator seeded by (seed, epoch, batch
position), so a resumed run, a run split over several processes and a single-process run
with the same global batch see the same batches with the same noise.

Gradients of the adapters are all-reduced by hand across processes (a mean, at every
optimizer step) rather than through DDP wrapping: the adapters are never called as a module
(they patch the base model's layers), which is exactly the situation in which a DDP wrapper
can silently skip synchronisation. ``test_trainer_multiprocess`` checks every rank holds
the same ΔR after each step.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import signal
import sys
import time

import torch

from qrlora import archs
from qrlora.basis import save_basis
from qrlora.qr import masked_parameter_count
from trainer import checkpoint, setup
from trainer.captions import tag_frequency
from trainer.config import Config
from trainer.data import collate
from trainer.dataset_config import image_counts, plan_summary
from trainer.preflight import preflight


class TrainingStopped(RuntimeError):
    pass


def batch_generator(seed: int, epoch: int, position: int) -> torch.Generator:
    digest = hashlib.sha256(f"qrlora-noise/{seed}/{epoch}/{position}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


class Trainer:
    def __init__(self, cfg: Config, log=print):
        self.cfg = cfg
        self.log = log
        self.stop_signal: int | None = None

    # ----------------------------------------------------------------- setup
    def prepare(self) -> None:
        from accelerate import Accelerator

        cfg, t = self.cfg, self.cfg.training
        device = t.device
        # cpu=True also when there is no accelerator at all: only then does accelerate join
        # processes started by torchrun/`accelerate launch --multi_gpu` over gloo on the CPU.
        use_cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
        self.accelerator = Accelerator(cpu=use_cpu)
        acc = self.accelerator
        self.device = acc.device if device in ("auto", "cpu") else torch.device(device)
        # fp16 gradients underflow without loss scaling (bf16 and fp32 need none)
        use_scaler = t.mixed_precision == "fp16" and self.device.type == "cuda"
        if hasattr(torch.amp, "GradScaler"):  # torch >= 2.3
            self.scaler = torch.amp.GradScaler(self.device.type, enabled=use_scaler)
        else:
            self.scaler = torch.cuda.amp.GradScaler(enabled=use_scaler)
        self.is_main = acc.is_main_process
        torch.manual_seed(t.seed)
        self.plan = cfg.dataset_plan()
        checked = preflight(cfg, self.plan)  # before any model is loaded; every rank fails alike
        for warning in list(cfg.warnings) + list(self.plan.warnings) + checked:
            self.say(f"warning: {warning}")
        self.family, self.models = setup.load_models(cfg, self.device)
        self.inputs = setup.input_record(cfg, self.models)  # what decides the result: printed and saved
        self.say(setup.describe_inputs(cfg, self.models))
        self.targets, modules = setup.layer_modules(cfg, self.family, self.models)
        self.te_names = setup.text_encoder_names(archs.get(self.family.name), self.targets)
        self.basis = None
        if cfg.network.type == "qrlora":
            with self.main_first():
                self.basis = setup.make_basis(cfg, self.family, self.models, self.targets, self.device,
                                              quiet=not self.is_main)
        self.network = setup.make_network(cfg, modules, self.basis).to(self.device)
        self.network.apply()
        self.data = setup.make_data(cfg, self.plan, self.models)
        self.fill_caches()
        self.schedule = setup.schedule(cfg, self.data, acc.num_processes)
        self.optimizer, self.scheduler = setup.make_optimization(cfg, self.network, self.te_names,
                                                                 self.schedule.total_steps)
        self.step = 0
        self.batches_done = 0  # positions of the current epoch consumed by all processes
        self.epoch = 1
        if cfg.saving.resume:
            progress = checkpoint.load_state(cfg.saving.resume, self.network, self.optimizer, self.scheduler,
                                             torch.Generator())
            self.step, self.epoch, self.batches_done = progress["step"], progress["epoch"], progress["batches_done"]
            self.say(f"resumed from {cfg.saving.resume} at step {self.step} (epoch {self.epoch})")
        self.started_at = time.time()
        self.session = setup.session_id(cfg, self.inputs, setup.file_timestamp(self.started_at))

    @contextlib.contextmanager
    def main_first(self):
        with self.accelerator.main_process_first():
            yield

    def say(self, text: str) -> None:
        if self.is_main:
            self.log(text)

    def fill_caches(self) -> None:
        fam, models = self.family, self.models
        if self.data.latent_cache is not None:
            n = self.data.cache_latents(lambda px: fam.encode_images(models, px.to(self.device)).cpu())
            self.say(f"cached latents of {n} images")
        if self.data.text_cache is not None:
            captions = self.data.fixed_captions()
            if captions is None:
                raise ValueError("cache_text_encoder_outputs needs fixed captions (no shuffle or dropout)")
            cache = self.data.text_cache
            todo = [c for c in captions if cache.key_for(c) not in cache]
            for i in range(0, len(todo), 8):
                chunk = todo[i : i + 8]
                with torch.no_grad():
                    out = fam.encode_prompts(models, chunk)
                for k, caption in enumerate(chunk):
                    cache.put(cache.key_for(caption), {name: v[k].cpu() for name, v in out.items()})

    # ----------------------------------------------------------------- one step
    def autocast(self):
        dtype = setup.WEIGHT_DTYPES[self.cfg.training.mixed_precision]
        if dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def micro_step(self, epoch: int, position: int, accumulation: int) -> float:
        t = self.cfg.training
        batch = collate(self.data[(epoch, position)])
        for key, value in list(batch.items()):
            if isinstance(value, torch.Tensor):
                batch[key] = value.to(self.device)
        with self.autocast():
            if batch["text_outputs"] is not None:
                conds = {k: v.to(self.device) for k, v in batch["text_outputs"].items()}
            else:
                conds = self.family.encode_prompts(self.models, batch["captions"], with_grad=bool(self.te_names))
            per_sample = self.family.training_loss(self.models, batch, conds, batch_generator(t.seed, epoch, position),
                                                   t.noise_offset, t.min_snr_gamma)
        loss = (per_sample.float() * batch["loss_weights"]).mean()
        if not torch.isfinite(loss):
            raise TrainingStopped(
                f"loss is {loss.item()} at step {self.step + 1} (epoch {epoch}, batch {position}); stopping. "
                "The last good checkpoint is kept. Lower the learning rate, or use bf16/fp32 instead of fp16."
            )
        self.scaler.scale(loss / accumulation).backward()
        return loss.item()

    def optimizer_step(self) -> float:
        params = self.network.trainable_parameters()
        if self.accelerator.num_processes > 1:
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            flat = torch.cat([g.reshape(-1) for g in grads])
            torch.distributed.all_reduce(flat)
            flat /= self.accelerator.num_processes
            offset = 0
            for p in params:
                n = p.numel()
                p.grad = flat[offset : offset + n].view_as(p).clone()
                offset += n
        norm = 0.0
        if self.accelerator.num_processes > 1:
            self.check_in_sync(params)
        # after the all-reduce, so that every process sees the same inf/NaN and skips alike
        self.scaler.unscale_(self.optimizer)
        if self.cfg.training.max_grad_norm > 0:
            norm = float(torch.nn.utils.clip_grad_norm_(params, self.cfg.training.max_grad_norm))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return norm

    def check_in_sync(self, params) -> None:
        """Every process must hold the same adapter weights before each update; a cheap
        fingerprint is compared across processes (kohya once trained N independent models)."""
        flat = torch.cat([p.detach().reshape(-1).double() for p in params])
        mine = torch.stack([flat.sum(), (flat * torch.arange(1, flat.numel() + 1, dtype=flat.dtype)).sum()])
        gathered = [torch.zeros_like(mine) for _ in range(self.accelerator.num_processes)]
        torch.distributed.all_gather(gathered, mine)
        if any(not torch.equal(g, gathered[0]) for g in gathered):
            raise TrainingStopped(f"adapter weights differ between processes at step {self.step}: {gathered}")

    # ----------------------------------------------------------------- the loop
    def train(self) -> int:
        cfg, t = self.cfg, self.cfg.training
        acc = self.accelerator
        accumulation = t.gradient_accumulation_steps
        self.install_signal_handlers()
        self.print_start_summary()
        if cfg.sampling.sample_at_first and self.step == 0:
            self.sample_images("first")
        bar = self.progress_bar()
        last_loss, window, lrs = float("nan"), [], []
        try:
            while self.step < self.schedule.total_steps:
                positions = self.data.positions(self.batches_done, acc.process_index, acc.num_processes)
                micro = 0
                for i, position in enumerate(positions):
                    last_loss = self.micro_step(self.epoch, position, accumulation)
                    window = (window + [last_loss])[-20:]
                    micro += 1
                    self.batches_done = min(len(self.data), self.batches_done + acc.num_processes)
                    if micro % accumulation and i != len(positions) - 1:
                        continue
                    norm = self.optimizer_step()
                    lrs = self.scheduler.get_last_lr()
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(loss=f"{sum(window) / len(window):.4f}", lr=f"{lrs[0]:.2e}", epoch=self.epoch)
                    self.log_scalars({"loss": last_loss, "loss_avg": sum(window) / len(window), "lr": lrs[0],
                                      "grad_norm": norm})
                    self.after_step()
                    if self.step >= self.schedule.total_steps or self.stop_signal is not None:
                        break
                if self.stop_signal is not None:
                    return self.interrupted()
                if self.batches_done >= len(self.data):
                    self.after_epoch()
                    self.epoch += 1
                    self.batches_done = 0
        except TrainingStopped as e:
            self.say(f"error: {e}")
            return 1
        finally:
            if bar is not None:
                bar.close()
            self.restore_signal_handlers()
        final = self.save(final=True)
        self.print_end_summary(final)
        return 0

    def after_step(self) -> None:
        c = self.cfg
        if c.saving.save_every_n_steps and self.step % c.saving.save_every_n_steps == 0 and self.step < self.schedule.total_steps:
            self.save(tag=f"step{self.step:06d}")
        if c.sampling.sample_every_n_steps and self.step % c.sampling.sample_every_n_steps == 0:
            self.sample_images(f"{self.step:06d}")

    def after_epoch(self) -> None:
        c = self.cfg
        if c.saving.save_every_n_epochs and self.epoch % c.saving.save_every_n_epochs == 0 \
                and self.step < self.schedule.total_steps:
            self.save(tag=f"epoch{self.epoch:06d}")
        if c.sampling.sample_every_n_epochs and self.epoch % c.sampling.sample_every_n_epochs == 0:
            self.sample_images(f"e{self.epoch:06d}")

    # ----------------------------------------------------------------- saving
    def output_name(self) -> str:
        return self.cfg.training.output_name or os.path.splitext(os.path.basename(self.cfg.source))[0]

    def save(self, tag: str | None = None, final: bool = False, state: bool | None = None) -> str:
        """The adapter file (+ resumable state); only the main process writes."""
        cfg, n = self.cfg, self.cfg.network
        name = self.output_name() if final else f"{self.output_name()}-{tag}"
        path = os.path.join(cfg.training.output_dir, f"{name}.safetensors")
        self.accelerator.wait_for_everyone()
        if self.is_main:
            os.makedirs(cfg.training.output_dir, exist_ok=True)
            alpha = n.alpha if n.alpha is not None else float(n.rank)
            checkpoint.save_adapter(path, self.network, n.type, self.basis, self.family.name, n.rank, alpha, n.mask,
                                    cfg.saving.save_precision, self.metadata(), name,
                                    os.path.basename(os.path.normpath(cfg.model.pretrained)),
                                    cfg.saving.embed_basis, targets={t.name: t for t in self.targets})
            if self.basis is not None:
                basis_path = os.path.join(cfg.training.output_dir, f"basis-{self.basis.basis_id}.safetensors")
                if not os.path.exists(basis_path):
                    save_basis(self.basis, basis_path)
            if cfg.saving.save_state if state is None else state:
                checkpoint.save_state(path[: -len(".safetensors")] + "-state", self.network, self.optimizer,
                                      self.scheduler, self.progress(), torch.Generator())
            if not final:
                checkpoint.keep_last(cfg.training.output_dir, self.output_name(), cfg.saving.save_last_n)
        self.accelerator.wait_for_everyone()
        return path

    def progress(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "batches_done": self.batches_done,
                "total_steps": self.schedule.total_steps}

    def metadata(self) -> dict[str, str]:
        cfg, t = self.cfg, self.cfg.training
        m = cfg.saving.metadata
        meta = {
            "ss_session_id": self.session,
            # $SOURCE_DATE_EPOCH fixes the timestamps: the same inputs then give the same bytes
            "ss_training_started_at": str(setup.file_timestamp(self.started_at)),
            "ss_training_finished_at": str(setup.file_timestamp()),
            "modelspec.date": setup.file_date(setup.file_timestamp()),
            "ss_learning_rate": str(t.learning_rate),
            "ss_unet_lr": str(t.learning_rate),
            "ss_text_encoder_lr": str(cfg.network.text_encoder_lr or t.learning_rate),
            "ss_num_train_images": str(self.data.num_train_images),
            "ss_num_reg_images": str(self.data.num_reg_images),
            "ss_num_batches_per_epoch": str(self.schedule.batches_per_epoch),
            "ss_num_epochs": str(self.schedule.epochs),
            "ss_epoch": str(self.epoch),
            "ss_steps": str(self.step),
            "ss_max_train_steps": str(self.schedule.total_steps),
            "ss_lr_warmup_steps": str(t.warmup_steps(self.schedule.total_steps)),
            "ss_lr_scheduler": t.lr_scheduler,
            "ss_optimizer": f"{type(self.optimizer).__module__}.{type(self.optimizer).__name__}"
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
            "ss_tag_frequency": json.dumps(tag_frequency(self.plan)),
            "ss_datasets": json.dumps(plan_summary(self.plan)["datasets"]),
            "ss_training_comment": m.description or "",
            "qrlora.trainer_config": json.dumps(cfg.to_dict()),
            **self.inputs,
        }
        for key in ("title", "author", "description", "license", "trigger_phrase"):
            value = getattr(m, key)
            if value:
                meta[f"modelspec.{key}"] = value
        if m.tags:
            meta["modelspec.tags"] = m.tags if isinstance(m.tags, str) else ", ".join(m.tags)
        return meta

    # ----------------------------------------------------------------- signals
    def install_signal_handlers(self) -> None:
        self._previous = {}

        def handler(signum, frame):
            self.stop_signal = signum

        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread
                pass

    def restore_signal_handlers(self) -> None:
        for sig, previous in getattr(self, "_previous", {}).items():
            signal.signal(sig, previous)

    def interrupted(self) -> int:
        name = signal.Signals(self.stop_signal).name
        path = self.save(tag=f"step{self.step:06d}", state=True)
        state = path[: -len(".safetensors")] + "-state"
        self.say(f"{name}: saved {path} and a resumable state at step {self.step}.\n"
                 f"Resume with: python -m trainer --config {self.cfg.source} --set saving.resume={state}")
        return 0

    # ----------------------------------------------------------------- sampling and logging
    def sample_images(self, tag: str) -> list[str]:
        from trainer.sampling import sample_images

        if not self.is_main or not self.cfg.sampling.prompts:
            return []
        return sample_images(self, tag)

    def progress_bar(self):
        if not self.is_main:
            return None
        try:
            from tqdm import tqdm
        except ImportError:
            return None
        return tqdm(total=self.schedule.total_steps, initial=self.step, desc="steps", dynamic_ncols=True,
                    file=sys.stderr, mininterval=1.0)

    def log_scalars(self, values: dict[str, float]) -> None:
        writer = self.writer()
        if writer is not None:
            prefix = self.cfg.logging.log_prefix or ""
            for key, value in values.items():
                writer.add_scalar(f"{prefix}{key}", value, self.step)

    def writer(self):
        if not hasattr(self, "_writer"):
            self._writer = None
            lg = self.cfg.logging
            if self.is_main and lg.logging_dir and (lg.log_with or "tensorboard") == "tensorboard":
                try:
                    from torch.utils.tensorboard import SummaryWriter
                except ImportError:
                    raise RuntimeError("logging with tensorboard needs it installed: pip install tensorboard") from None
                run = f"{self.output_name()}-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}"
                self._writer = SummaryWriter(os.path.join(lg.logging_dir, run))
        return self._writer

    def print_start_summary(self) -> None:
        s, n = self.schedule, self.cfg.network
        kind = "QR-LoRA" if n.type == "qrlora" else "LoRA"
        basis = f", basis {self.basis.basis_id}" if self.basis else ""
        trainable = sum(masked_parameter_count(n.rank, t.shape[1], n.mask) for t in self.targets) \
            if n.type == "qrlora" else self.network.parameter_count()
        self.say(
            f"{kind} rank {n.rank} on {len(self.targets)} layers ({trainable:,} trainable parameters{basis})\n"
            f"{image_counts(self.plan)}, {s.batches_per_epoch} batches per epoch, "  # C2: counts with/without repeats
            f"{s.steps_per_epoch} steps per epoch, {s.total_steps} steps in {s.epochs} epochs, "
            f"{self.accelerator.num_processes} process(es) on {self.device}"
        )

    def print_end_summary(self, final: str) -> None:
        minutes = (time.time() - self.started_at) / 60
        name = self.output_name()
        how = f"<qrlora:{name}:1>" if self.cfg.network.type == "qrlora" else f"<lora:{name}:1>"
        folder = "models/QRLoRA" if self.cfg.network.type == "qrlora" else "models/Lora"
        self.say(f"done: {self.step} steps in {minutes:.1f} min\n  {final}\n"
                 f"  use it: copy it to your WebUI's {folder} folder and write {how} in a prompt")


def run(cfg: Config) -> int:
    trainer = Trainer(cfg)
    trainer.prepare()
    return trainer.train()

