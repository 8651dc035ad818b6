"""The training loop: family-independent, on accelerate, resumable to the exact step.

Reproducibility is by construction: the data order is a function of (seed, epoch), and the
noise, timesteps and dropout of each batch come from generators seeded by (seed, epoch,
batch position), so a resumed run, a run split over several processes and a single-process
run with the same global batch see the same batches with the same noise.

Gradients of the adapters are all-reduced by hand across processes (a mean, at every
optimizer step) rather than through DDP wrapping: the adapters are never called as a module
(they patch the base model's layers), which is exactly the situation in which a DDP wrapper
can silently skip synchronisation. Every step the processes also agree on whether to go on
(``trainer.distributed``): a non-finite loss, a signal or an exception on any rank stops them
all at the same step, and a fingerprint shows they all hold the same weights.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
import shlex
import signal
import sys
import time

import torch

from qrlora import archs
from qrlora.basis import save_basis
from qrlora.checkpoint import read_header
from qrlora.errors import OutputError, UserError
from qrlora.qr import masked_parameter_count
from qrlora.threads import choose_threads, describe_choice
from trainer import checkpoint, setup
from trainer.config import Config
from trainer.data import collate
from trainer.dataset_config import image_counts
from trainer.metadata import training_metadata
from trainer.preflight import preflight
from trainer.distributed import POISON_ENV, RankStatus, agree, all_reduce_gradients, poison_for, ranks_out_of_sync

# What a failed write raises: the OS's error, or the core's one-sentence error naming the path.
WRITE_ERRORS = (OSError, OutputError)


class TrainingStopped(RuntimeError):
    pass


def derived_seed(kind: str, seed: int, epoch: int, position: int) -> int:
    digest = hashlib.sha256(f"qrlora-{kind}/{seed}/{epoch}/{position}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def batch_generator(seed: int, epoch: int, position: int) -> torch.Generator:
    return torch.Generator().manual_seed(derived_seed("noise", seed, epoch, position))


class Trainer:
    def __init__(self, cfg: Config, log=print, overrides: list[str] | tuple = ()):
        self.cfg = cfg
        self.log = log
        self.overrides = list(overrides)  # the --set values, recorded in the state for the resume line
        self.stop_signal: int | None = None
        self.save_failure: str | None = None  # the last save that could not be written, until one succeeds
        self.deferred_error: BaseException | None = None  # raised between steps; reported at the next agreement
        self.bar = None
        self.created_at = time.time()  # LAB-DEMO: the run's wall time, for sampling.scorer's report

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
        for warning in self.models.warnings:
            self.say(f"warning: {warning}")
        self.threads = self.choose_threads()
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
        self.started_at = time.time()
        self.session = setup.session_id(cfg, self.inputs, setup.file_timestamp(self.started_at))
        if cfg.saving.resume:
            self.resume(cfg.saving.resume)

    def resume(self, folder: str) -> None:
        """Continue the run saved in ``folder``: same network, same session, and never over
        the final file of another run."""
        _, run = checkpoint.read_run(folder)
        recorded = run.get("config", {}).get("network")
        mine = self.cfg.to_dict()["network"]
        if recorded:
            for key in ("type", "rank", "alpha", "mask", "targets", "train_text_encoder"):
                if recorded.get(key) != mine.get(key):
                    raise UserError(f"saving.resume: {folder} was trained with network.{key} = {recorded.get(key)!r},"
                                    f" this config has network.{key} = {mine.get(key)!r}; resume with that run's"
                                    " network settings")
        self.session = run.get("session", self.session)
        final = self.final_path()
        if os.path.exists(final):
            theirs = read_header(final)[1].get("ss_session_id")
            if theirs and theirs != self.session:
                raise UserError(f"saving.resume: {final} is the final file of another run (session {theirs}), not of"
                                f" the run saved in {folder} (session {self.session}); set training.output_dir or"
                                " training.output_name to that run's, or move the file away")
        progress = checkpoint.load_state(folder, self.network, self.optimizer, self.scheduler, self.scaler)
        self.step, self.epoch, self.batches_done = progress["step"], progress["epoch"], progress["batches_done"]
        if self.batches_done >= len(self.data):  # saved at an epoch's last step; its end-of-epoch work was done
            self.epoch, self.batches_done = self.epoch + 1, 0
        self.say(f"resumed from {folder} at step {self.step} (epoch {self.epoch})")

    def choose_threads(self) -> int:
        """``training.cpu_threads``, or for 0 one thread when a small model trains on the CPU
        (thousands of tiny operations: more threads only wait on each other)."""
        requested = self.cfg.training.cpu_threads
        size = sum(p.numel() for p in self.models.denoiser.parameters())
        if requested == 0 and self.device.type != "cpu":
            threads = torch.get_num_threads()
        else:
            threads = choose_threads(size, requested)
        torch.set_num_threads(threads)
        self.threads_note = describe_choice(size, requested, threads)
        return threads

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
                raise UserError("training.cache_text_encoder_outputs needs fixed captions (no shuffle or dropout)")
            cache = self.data.text_cache
            todo = [c for c in captions if cache.key_for(c) not in cache]
            for i in range(0, len(todo), 8):
                chunk = todo[i : i + 8]
                with torch.no_grad():
                    out = fam.encode_prompts(models, chunk)
                for k, caption in enumerate(chunk):
                    cache.put(cache.key_for(caption), {name: v[k].cpu() for name, v in out.items()})
            if fam.frees_text_encoders and not self.te_names:
                from trainer.sampling import prompts_of

                keep = [text for p in prompts_of(self.cfg) for text in (p.prompt, p.negative_prompt or "")]
                fam.release_text_encoders(models, keep)
                self.say(f"text encoders freed after caching ({len(set(keep))} sample prompts kept)")

    # ----------------------------------------------------------------- one step
    def autocast(self):
        dtype = setup.WEIGHT_DTYPES[self.cfg.training.mixed_precision]
        if dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def micro_step(self, epoch: int, position: int, accumulation: int, status: RankStatus) -> float:
        """Forward and backward of one batch. A non-finite loss is recorded in ``status`` (and
        not backpropagated): the processes decide together what to do about it."""
        t = self.cfg.training
        # Dropout draws from torch's generator: seeding it from the batch position makes
        # those draws, like the noise, independent of resume points and process count.
        torch.manual_seed(derived_seed("dropout", t.seed, epoch, position))
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
        poison = poison_for(self.accelerator.process_index, self.step + 1)
        if poison == "nan":
            loss = loss * float("nan")
        elif poison == "error":
            raise RuntimeError(f"{POISON_ENV}: an exception on this rank at step {self.step + 1}, as asked")
        if not torch.isfinite(loss):
            status.nonfinite_loss = loss.item()
            status.where = f"epoch {epoch}, batch {position}"
            return loss.item()
        self.scaler.scale(loss / accumulation).backward()
        return loss.item()

    def optimizer_step(self) -> float:
        params = self.network.trainable_parameters()
        world = self.accelerator.num_processes
        if world > 1:
            all_reduce_gradients(params, world)
            differ = ranks_out_of_sync(params, world)
            if differ:
                raise TrainingStopped(f"adapter weights of rank(s) {', '.join(map(str, differ))} differ from rank 0's"
                                      f" at step {self.step}; stopping every process")
        norm = 0.0
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

    def accumulate(self, positions: list[int], accumulation: int) -> tuple[RankStatus, float]:
        """The micro-batches of one optimizer step on this rank; nothing here raises, so that
        every rank reaches the step's agreement."""
        status = RankStatus()
        last = float("nan")
        try:
            if self.deferred_error is not None:
                raise self.deferred_error
            for position in positions:
                last = self.micro_step(self.epoch, position, accumulation, status)
                if status.nonfinite_loss is not None:
                    break
        except Exception as e:  # reported to every rank, then raised here with its traceback
            status.error = e
        status.signal = self.stop_signal
        return status, last

    # ----------------------------------------------------------------- the loop
    def train(self) -> int:
        """Run to the end; 0 when done, 1 after a stop for a non-finite loss or an error on any
        rank, 128 + the signal number after SIGINT/SIGTERM (with the state saved), 2 when the
        output folder could not be written and the run went to a fallback folder."""
        self.install_signal_handlers()
        self.print_start_summary()
        self.bar = self.progress_bar()
        try:
            if self.cfg.sampling.sample_at_first and self.step == 0:
                self.between_steps(self.sample_images, "first")
            return self.run_steps()
        except TrainingStopped as e:
            self.say(f"error: {e}")
            return 1
        finally:
            if self.bar is not None:
                self.bar.close()
            self.restore_signal_handlers()

    def run_steps(self) -> int:
        acc, t = self.accelerator, self.cfg.training
        accumulation = t.gradient_accumulation_steps
        window: list[float] = []
        while self.step < self.schedule.total_steps:
            positions = self.data.positions(self.batches_done, acc.process_index, acc.num_processes)
            for start in range(0, len(positions), accumulation):
                group = positions[start : start + accumulation]
                status, last_loss = self.accumulate(group, accumulation)
                verdict = agree(status, acc.process_index, acc.num_processes, self.device)
                if verdict.stop_now:
                    return self.stop(verdict, status)
                self.batches_done = min(len(self.data), self.batches_done + acc.num_processes * len(group))
                norm = self.optimizer_step()
                window = (window + [last_loss])[-20:]
                lrs = self.scheduler.get_last_lr()
                if self.bar is not None:
                    self.bar.update(1)
                    self.bar.set_postfix(loss=f"{sum(window) / len(window):.4f}", lr=f"{lrs[0]:.2e}", epoch=self.epoch)
                self.log_scalars({"loss": last_loss, "loss_avg": sum(window) / len(window), "lr": lrs[0],
                                  "grad_norm": norm})
                if verdict.signal is not None:
                    return self.interrupted(verdict.signal)
                self.between_steps(self.after_step)
                if self.step >= self.schedule.total_steps:
                    break
            if self.batches_done >= len(self.data):
                self.between_steps(self.after_epoch)
                self.epoch += 1
                self.batches_done = 0
        # one last agreement: an error in the last step's sampling, or a late signal, counts
        status = RankStatus(signal=self.stop_signal, error=self.deferred_error)
        verdict = agree(status, acc.process_index, acc.num_processes, self.device)
        if verdict.stop_now:
            return self.stop(verdict, status)
        final = self.save(self.output_name(), final=True)
        if final is None:
            return self.rescue(self.output_name(), final=True)
        if self.bar is not None:  # its last refresh must come before the summary and the JSON line
            self.bar.close()
            self.bar = None
        self.print_end_summary(final)
        if self.cfg.sampling.scorer and self.is_main:  # LAB-DEMO: the before/after figures as one JSON line
            from trainer.sample_scoring import report

            report(self)
        return 0

    def between_steps(self, work, *args) -> None:
        """Sampling and saving between steps: an exception is held for the next agreement
        (raising now would leave the other ranks waiting in a collective)."""
        try:
            work(*args)
        except Exception as e:
            self.deferred_error = e

    def stop(self, verdict, status: RankStatus) -> int:
        """Every rank stops here at the same step; the main process says why, naming the rank."""
        step = self.step + 1
        for rank, value in sorted(verdict.nonfinite.items()):
            where = f" ({status.where})" if rank == self.accelerator.process_index and status.where else ""
            self.say(f"error: loss is {value} at step {step} on rank {rank}{where}; stopping every process. The last"
                     " good checkpoint is kept. Lower the learning rate, or use bf16/fp32 instead of fp16.")
        for rank in verdict.failed:
            if rank != self.accelerator.process_index:
                self.say(f"error: rank {rank} raised an exception at step {step} (its traceback is above);"
                         " stopping every process")
        if self.save_failure is not None:  # the weights in memory are still the last good ones
            self.rescue(f"{self.output_name()}-rescue-step{self.step:06d}", final=False)
        if status.error is not None:
            raise status.error
        return 1

    def after_step(self) -> None:
        c = self.cfg
        if c.saving.save_every_n_steps and self.step % c.saving.save_every_n_steps == 0 and self.step < self.schedule.total_steps:
            self.save(checkpoint.periodic_name(self.output_name(), c.saving.save_naming, step=self.step))
        if c.sampling.sample_every_n_steps and self.step % c.sampling.sample_every_n_steps == 0:
            self.sample_images(f"{self.step:06d}")

    def after_epoch(self) -> None:
        c = self.cfg
        if c.saving.save_every_n_epochs and self.epoch % c.saving.save_every_n_epochs == 0 \
                and self.step < self.schedule.total_steps:
            self.save(checkpoint.periodic_name(self.output_name(), c.saving.save_naming, epoch=self.epoch))
        if c.sampling.sample_every_n_epochs and self.epoch % c.sampling.sample_every_n_epochs == 0:
            self.sample_images(f"e{self.epoch:06d}")

    # ----------------------------------------------------------------- saving
    def output_name(self) -> str:
        return self.cfg.training.output_name or os.path.splitext(os.path.basename(self.cfg.source))[0]

    def final_path(self) -> str:
        return os.path.join(self.cfg.training.output_dir, f"{self.output_name()}.safetensors")

    def save(self, name: str, final: bool = False, state: bool | None = None) -> str | None:
        """``name``.safetensors (+ resumable state) in the output folder; only the main process
        writes. A write that fails (disk full, permissions) does not stop training: the state
        stays in memory, the failure is reported, and the next save (or the end of the run,
        into a fallback folder) tries again. Returns the path, or None when the main process
        could not write it."""
        path = os.path.join(self.cfg.training.output_dir, f"{name}.safetensors")
        self.accelerator.wait_for_everyone()
        written = None if self.is_main else path  # only the main process knows; the others go on alike
        try:
            if self.is_main:
                self.show_activity(f"saving {name}")
                self.write_outputs(self.cfg.training.output_dir, name, final, state)
                written = path
                if self.save_failure is not None:
                    self.say(f"saved {path}: writing works again")
                    self.save_failure = None
        except WRITE_ERRORS as e:
            self.save_failure = f"{path}: {e}"
            self.say(f"warning: could not save {path} ({e}); training goes on with its state in memory, and"
                     " the next save tries again (at the end of the run, into a fallback folder if it must)")
        finally:  # whatever happened here, every rank leaves the save together
            self.show_activity("steps")
            self.accelerator.wait_for_everyone()
        return written

    def write_outputs(self, folder: str, name: str, final: bool, state: bool | None) -> None:
        cfg, n = self.cfg, self.cfg.network
        path = os.path.join(folder, f"{name}.safetensors")
        os.makedirs(folder, exist_ok=True)
        alpha = n.alpha if n.alpha is not None else float(n.rank)
        checkpoint.save_adapter(path, self.network, n.type, self.basis, self.family.name, n.rank, alpha, n.mask,
                                cfg.saving.save_precision, training_metadata(self), name,
                                os.path.basename(os.path.normpath(cfg.model.pretrained)),
                                cfg.saving.embed_basis, targets={t.name: t for t in self.targets})
        if self.basis is not None:
            basis_path = os.path.join(folder, f"basis-{self.basis.basis_id}.safetensors")
            if not os.path.exists(basis_path):
                save_basis(self.basis, basis_path)
        if cfg.saving.save_state if state is None else state:
            checkpoint.save_state(path[: -len(".safetensors")] + "-state", self.network, self.optimizer,
                                  self.scheduler, self.scaler, self.progress(), self.run_record(folder))
        if not final and folder == cfg.training.output_dir:
            checkpoint.keep_last(folder, self.output_name(), cfg.saving.save_last_n)

    def rescue(self, name: str, final: bool) -> int:
        """The output folder cannot be written: save the file and its state into the first
        fallback folder that takes them, and say where. Returns the exit code (2)."""
        if self.is_main:
            for folder in checkpoint.rescue_folders(self.output_name(), self.session):
                try:
                    self.write_outputs(folder, name, final, state=True)
                except WRITE_ERRORS as e:
                    self.say(f"warning: could not write the fallback folder {folder} either ({e})")
                    continue
                state = os.path.join(folder, f"{name}-state")
                self.say(f"error: could not write {self.cfg.training.output_dir} ({self.save_failure}); saved"
                         f" {os.path.join(folder, name)}.safetensors and its state {state} instead.\n"
                         f"Resume with: {self.resume_command(state)}")
                return 2
            self.say(f"error: nothing could be saved ({self.save_failure}); the training state is lost")
        return 2

    def run_record(self, folder: str) -> dict:
        """What a state folder says about its run: enough to resume exactly that run."""
        return {"session": self.session, "config_file": self.cfg.source, "overrides": self.overrides,
                "output_dir": os.path.abspath(self.cfg.training.output_dir), "saved_in": os.path.abspath(folder),
                "config": self.cfg.to_dict()}

    def resume_command(self, state: str) -> str:
        """One copy-pasteable line: this config, the same --set overrides, and the state."""
        keep = [o for o in self.overrides if o.split("=", 1)[0].strip() != "saving.resume"]
        parts = ["python", "-m", "trainer", "--config", os.path.abspath(self.cfg.source)]
        for o in keep + [f"saving.resume={os.path.abspath(state)}"]:
            parts += ["--set", o]
        return shlex.join(parts)

    def progress(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "batches_done": self.batches_done,
                "total_steps": self.schedule.total_steps}

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

    def interrupted(self, signum: int) -> int:
        """Every rank saw the signal at this step: save a resumable state, print the line that
        resumes exactly this run, exit 128 + the signal number (130 for SIGINT, 143 for
        SIGTERM) as shells and schedulers expect."""
        sig = signal.Signals(signum).name
        name = checkpoint.periodic_name(self.output_name(), self.cfg.saving.save_naming, step=self.step)
        path = self.save(name, state=True)
        if path is None:
            self.rescue(name, final=False)
        else:
            state = path[: -len(".safetensors")] + "-state"
            self.say(f"{sig}: saved {path} and a resumable state at step {self.step}.\n"
                     f"Resume with: {self.resume_command(state)}")
        return 128 + signum

    # ----------------------------------------------------------------- sampling and logging
    def sample_images(self, tag: str) -> list[str]:
        from trainer.sampling import sample_images

        if not self.is_main or not self.cfg.sampling.prompts:
            return []
        self.show_activity(f"sampling {tag}")
        try:
            return sample_images(self, tag)
        finally:
            self.show_activity("steps")

    def show_activity(self, text: str) -> None:
        """The progress bar says what the run is doing between steps (sampling, saving)."""
        if self.bar is not None:
            self.bar.set_description_str(text)

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
                    raise UserError("logging.logging_dir: logging with tensorboard needs it installed: pip install tensorboard") from None
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
            f"{self.accelerator.num_processes} process(es) on {self.device}, {self.threads_note}"
        )

    def print_end_summary(self, final: str) -> None:
        minutes = (time.time() - self.started_at) / 60
        name = self.output_name()
        how = f"<qrlora:{name}:1>" if self.cfg.network.type == "qrlora" else f"<lora:{name}:1>"
        folder = "models/QRLoRA" if self.cfg.network.type == "qrlora" else "models/Lora"
        self.say(f"done: {self.step} steps in {minutes:.1f} min\n  {final}\n"
                 f"  use it: copy it to your WebUI's {folder} folder and write {how} in a prompt")


def run(cfg: Config, overrides=()) -> int:
    trainer = Trainer(cfg, overrides=overrides)
    trainer.prepare()
    return trainer.train()

