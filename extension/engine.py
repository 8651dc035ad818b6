"""The host-independent session: prompt tags in, fused groups to apply out.

A host adapter calls ``Engine.plan`` from its ``ExtraNetwork.activate`` with the tags' items
and a ``ModelInfo`` describing the loaded model, then applies ``Plan.groups`` its own way.
Every problem becomes one message in ``Plan.messages`` and leaves the affected file out;
nothing here touches the model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Sequence

from . import blocks, core, planner, syntax
from .bases import BasisResolver, LoadedModel
from .library import Library, LookupFailed
from .planner import FileCache, Fuser, FusedGroup, Member
from .settings import Options

UNKNOWN = "unknown"  # ModelInfo.layer_shape: the layer exists, its shape cannot be read (packed 4-bit)


@dataclass
class ModelInfo:
    arch: str | None  # "sdxl", "flux", or None for a model QR-LoRA does not support
    checkpoint: str | None  # the loaded checkpoint's file on disk
    layer_shape: Callable[[object], object]  # Target -> (out, in), None (absent) or UNKNOWN
    description: str = ""  # what the model is, for messages ("SD 1.5")
    loaded: LoadedModel | None = None  # the loaded weights, measurable (Forge), for quantized files
    host: str = "Forge"  # the WebUI, for messages
    host_archs: tuple = ("sdxl", "flux")  # the architectures this WebUI can run


@dataclass
class Plan:
    groups: list[FusedGroup] = field(default_factory=list)  # applied from the first step (every step without windows)
    messages: list[str] = field(default_factory=list)
    hashes: dict[str, str] = field(default_factory=dict)  # prompt name -> short hash
    # step windows: (step, the groups applied from that step on), in step order, only where
    # a tag's start=/stop= changes what applies; the hosts switch weights only there
    switches: list[tuple[int, list[FusedGroup]]] = field(default_factory=list)

    @property
    def identity(self) -> str:
        return "/".join(g.identity for g in self.groups)

    def groups_at(self, step: int) -> list[FusedGroup]:
        groups = self.groups
        for first, later in self.switches:
            if first > step:
                break
            groups = later
        return groups

    def all_groups(self) -> list[FusedGroup]:
        return self.groups + [g for _, groups in self.switches for g in groups]

    def keep_only(self, keep: Callable[[FusedGroup], bool]) -> None:
        """Drop the groups ``keep`` refuses, at every step."""
        self.groups = [g for g in self.groups if keep(g)]
        self.switches = [(step, [g for g in groups if keep(g)]) for step, groups in self.switches]

    def say(self, text: str) -> None:
        if text and text not in self.messages:
            self.messages.append(text)


def sampling_step(params) -> int:
    """The sampler step (from 0) a ``CFGDenoiserParams`` is given for, in both WebUIs.

    ``params.sampling_step`` is ``state.sampling_step``, which the sampler's callback sets only
    after a step (``sd_samplers_common.Sampler.callback_state``): during step i it still reads
    i - 1, and 0 during steps 0 and 1 (lbw compensates with its ``step - 2``). The denoiser
    itself counts its calls (``CFGDenoiser.step``, reset per pass by ``Sampler.initialize``) and
    knows ``steps`` and ``total_steps`` (the calls the sampler makes: ``steps`` for Euler-like
    samplers, ``2·steps`` for the ``second_order`` ones: Heun, DPM2, DPM++ 2S a, DPM++ SDE; set
    by ``launch_sampling``), so ``calls · steps // total_steps`` is the exact step for both
    kinds (a second-order sampler's last step makes one call, so its count ends one short)."""
    denoiser = getattr(params, "denoiser", None)
    calls, steps, total = (getattr(denoiser, k, None) for k in ("step", "steps", "total_steps"))
    if all(isinstance(v, int) for v in (calls, steps, total)) and total > 0:
        return min(calls * steps // total, max(steps - 1, 0))
    return int(getattr(params, "sampling_step", 0) or 0)


class Engine:
    def __init__(self, options: Options, folders: Callable[[], Sequence[str]], basis_folder: Callable[[], str],
                 log: Callable[[str], None] = print, status: Callable[[str], None] = lambda s: None):
        self.options = options
        self.log = log
        self.basis_folder = basis_folder
        self.library = Library(folders, excluded=lambda: [basis_folder()])
        self.files = FileCache()
        self.resolver = BasisResolver(basis_folder, lambda: options.basis_device, log, status, keep=2)
        self.fuser = Fuser()
        # lbw= presets: built-in plus qrlora_presets.txt in the first QR-LoRA folder
        self.presets = blocks.Presets(lambda: next(iter(folders()), None), log=log)
        self._recent: list[set[str]] = []  # files used by the last plans (first pass and hires pass)

    def plan(self, tags_items: Sequence[Sequence[str]], model: ModelInfo) -> Plan:
        plan = Plan()
        if not tags_items:
            return plan
        if model.arch is None:
            plan.say(f"QR-LoRA works on SDXL (and FLUX in Forge); the loaded model is {model.description or 'something else'}: "
                     "tags ignored")
            return plan
        members = []
        for items in tags_items:
            member = self._member(items, model, plan)
            if member is not None:
                members.append(member)
        self._recent = (self._recent + [{m.path for m in members}])[-2:]
        self.files.keep_only(set().union(*self._recent))  # loaded files no recent prompt uses are dropped
        # what `qrlora fuse` would refuse to fuse (another basis or mask) is applied separately
        groups: dict[tuple[str, str], list[Member]] = {}
        for m in members:
            groups.setdefault((m.deltar.basis_id, m.deltar.mask), []).append(m)
        schedules = [planner.windows(g) for g in groups.values()]
        # the groups of this plan and of the one before (the first pass's and the hires pass's)
        self.fuser.keep = max(2, 2 * sum(len(s) for s in schedules))
        fused = [f for f in (self._fuse(s, model, plan) for s in schedules) if f is not None]
        plan.groups = [f[0][1] for f in fused]
        for step in sorted({step for f in fused for step, _ in f[1:]}):
            plan.switches.append((step, [next(g for first, g in reversed(f) if first <= step) for f in fused]))
        if len(plan.groups) > 1:
            parts = "; ".join(f"{g.title} (basis {g.basis_id}, mask {g.mask})" for g in plan.groups)
            plan.say(f"files trained on different bases or masks are applied separately, not fused: {parts}")
        if self.options.hashes_in_infotext:
            for m in members:
                if any(m.label in g.labels for g in plan.groups):
                    entry = self.library.resolve(m.label)
                    short = self.library.shorthash(entry)
                    if short:
                        plan.hashes[m.label] = short
        return plan

    def _member(self, items: Sequence[str], model: ModelInfo, plan: Plan) -> Member | None:
        try:
            tag = syntax.parse_tag(items, self.options.default_multiplier)
        except syntax.TagError as e:
            plan.say(str(e))
            return None
        for w in tag.warnings:
            plan.say(w)
        try:
            entry = self.library.resolve(tag.name)
        except LookupFailed as e:
            plan.say(str(e))
            return None
        try:
            d, st = self.files.load(entry.path, expect_arch=None)
        except (core.FileFormatError, OSError) as e:
            plan.say(f"<qrlora:{tag.name}> not applied: {e}")
            return None
        if d.arch != model.arch:
            file_arch, model_arch = core.archs.get(d.arch).title, core.archs.get(model.arch).title
            if d.arch not in model.host_archs:
                plan.say(f"<qrlora:{tag.name}> not applied: {os.path.basename(entry.path)} is a {file_arch} file and "
                         f"{model.host} cannot run {file_arch} models (use Forge); nothing was changed")
            else:
                plan.say(f"<qrlora:{tag.name}> not applied: {os.path.basename(entry.path)} was trained for {file_arch}, "
                         f"but the loaded model is {model_arch}; nothing was changed")
            return None
        problem = _layer_problem(d, model)
        if problem:
            plan.say(f"<qrlora:{tag.name}> not applied: {problem}")
            return None
        weights = None
        if tag.lbw is not None:  # the list's length is checked against the file's architecture
            try:
                weights = blocks.resolve(tag.lbw, d.arch, self.presets)
            except blocks.BlockError as e:
                plan.say(f"<qrlora:{tag.name}> not applied: {e}")
                return None
        return Member(tag.name, entry.path, st.st_mtime_ns, st.st_size, d, tag.te, tag.unet, weights, tag.start, tag.stop)

    def _fuse(self, schedule: list[tuple[int, list[Member]]], model: ModelInfo,
              plan: Plan) -> list[tuple[int, FusedGroup]] | None:
        """One basis group's members, fused for each entry of its step schedule (one entry
        without windows); None if nothing of it can be applied."""
        kept = {m.label for m in _fusable(schedule[0][1], plan)}
        schedule = [(step, [m for m in members if m.label in kept]) for step, members in schedule]
        group = schedule[0][1]
        if not group:
            return None
        carrier = next((m for m in group if m.deltar.q), group[0])  # a portable file brings the exact Q
        label = "+".join(f"<qrlora:{m.label}>" for m in group)
        res = self.resolver.resolve(carrier.deltar, label, model.checkpoint, self.options.policy, self.options.threshold,
                                    model.loaded)
        if res.message:
            plan.say(res.message)
        if res.refused:
            return None
        fused = [(step, self.fuser.fuse(members, res.q)) for step, members in schedule]
        if not any(f.layers for _, f in fused):
            plan.say(f"{label}: nothing to apply (all multipliers are 0 or the files are empty)")
            return None
        return fused


def report_plan(p, plan: Plan, options: Options, log: Callable[[str], None]) -> None:
    """What both hosts do with a plan: messages to the console and the infotext comment,
    and the ``QR-LoRA hashes`` field (accumulated across the hires pass, as Lora does)."""
    for text in plan.messages:
        log(text)
        if hasattr(p, "comment"):
            p.comment(f"QR-LoRA: {text}")
    if options.hashes_in_infotext:
        if not getattr(p, "is_hr_pass", False) or not hasattr(p, "qrlora_hashes"):
            p.qrlora_hashes = {}
        p.qrlora_hashes.update(plan.hashes)
        if p.qrlora_hashes:
            p.extra_generation_params[syntax.INFOTEXT_KEY] = syntax.format_hashes(p.qrlora_hashes)


def _fusable(group: list[Member], plan: Plan) -> list[Member]:
    """The members ``qrlora fuse`` would accept; each one left out (alpha 0) gets a message."""
    kept: list[Member] = []
    for m in group:
        try:
            core.fusion.check_fusable(f"<qrlora:{m.label}>", m.deltar)
        except core.fusion.IncompatibleFiles as e:
            plan.say(f"<qrlora:{m.label}> not applied: {e}")
            continue
        kept.append(m)
    return kept


def _layer_problem(d, model: ModelInfo) -> str:
    """Why file ``d`` cannot go on the loaded model's layers, or ""."""
    bad = []
    for name, target in d.targets.items():
        shape = model.layer_shape(target)
        if shape == UNKNOWN:
            continue
        if shape is None:
            bad.append(f"{name}: not in the loaded model")
        elif tuple(shape) != tuple(target.shape):
            bad.append(f"{name}: {target.shape[0]}×{target.shape[1]} in the file, "
                       f"{shape[0]}×{shape[1]} in the loaded model")
    if not bad:
        return ""
    where = os.path.basename(model.checkpoint or "") or "the loaded model"
    return (f"{len(bad)} of {len(d.targets)} layers do not fit {where} (first: {bad[0]}); "
            "the file was trained for another model")
