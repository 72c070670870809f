"""HeliosScheduler's schedules (Helios-Base and Helios-Mid), read from the checkpoint's scheduler config:
per pyramid stage (Mid: ``set_timesteps(n, stage, mu=mu)``) or over the whole chunk (Base: HeliosPipeline's
``set_timesteps(n, sigmas=linspace(0.999, 0, n + 1)[:-1], mu=mu)`` on a one-stage scheduler). Float64, as
the reference computes them. The update rules live in their own modules: unipc.py and euler.py.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
import torch

from ..errors import UserError
from .euler import EulerSolver
from .scheduler import renoise_coefficients, stage_tables
from .unipc import UniPCConfig, UniPCSolver

SAMPLERS = ("unipc", "euler")
SCHEDULE_CACHE_SIZE = 64  # schedules kept per scheduler (least recently used dropped), as runtime/scheduler.py


@dataclass(frozen=True, eq=False)
class FlowSchedule:
    timesteps: torch.Tensor  # float64 [n]
    sigmas: torch.Tensor  # float64 [n + 1], ending at 0
    cache: dict = field(default_factory=dict)  # per-schedule constants (model timesteps, solver coefficients)

    def model_timesteps(self, device: torch.device, batch: int, dtype: torch.dtype = torch.int64):
        """The transformer's timestep input [batch] for each step, made once per device, batch and dtype: the
        pyramid pipeline truncates to int64 (``t.expand(batch).to(torch.int64)``); HeliosPipeline passes the
        float timestep (the model embeds it in float32)."""
        key = ("timesteps", device, batch, dtype)
        if key not in self.cache:
            ts = self.timesteps.to(device=device, dtype=dtype)
            self.cache[key] = tuple(t.expand(batch).contiguous() for t in ts)
        return self.cache[key]


class FlowScheduler:
    """HeliosScheduler (scheduler_type unipc or euler): schedules, and a solver per schedule."""

    def __init__(self, config: Mapping):
        self.config = dict(config)
        c = self.config
        self.num_train_timesteps = int(c.get("num_train_timesteps", 1000))
        self.stages = int(c.get("stages", 3))
        self.gamma = float(c.get("gamma", 1 / 3))
        self.use_dynamic_shifting = bool(c.get("use_dynamic_shifting", False))
        self.time_shift_type = c.get("time_shift_type", "exponential")
        self.scheduler_type = c.get("scheduler_type", "unipc")
        if self.scheduler_type not in SAMPLERS:
            raise UserError("unsupported HeliosScheduler scheduler_type", found=repr(self.scheduler_type),
                            expected=" or ".join(SAMPLERS))
        self.unipc = UniPCConfig.from_scheduler_config(c)
        self.ori_start_sigmas, self.timesteps_per_stage, self.sigmas_per_stage = stage_tables(
            self.num_train_timesteps, float(c.get("shift", 1.0)), self.stages,
            list(c.get("stage_range", [0, 1 / 3, 2 / 3, 1])), self.gamma)
        # a schedule depends only on its arguments; the most recently used SCHEDULE_CACHE_SIZE are kept (each
        # holds its own per-device constants, so a server that sees many step counts does not grow without end)
        self._schedules: OrderedDict[tuple, FlowSchedule] = OrderedDict()

    def _cached(self, key: tuple, make) -> FlowSchedule:
        if key in self._schedules:
            self._schedules.move_to_end(key)
        else:
            self._schedules[key] = make()
            while len(self._schedules) > SCHEDULE_CACHE_SIZE:
                self._schedules.popitem(last=False)
        return self._schedules[key]

    def _time_shift(self, mu: float, t: torch.Tensor) -> torch.Tensor:
        if self.time_shift_type == "exponential":
            return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** 1.0)
        return mu / (mu + (1 / t - 1) ** 1.0)

    def stage_schedule(self, num_steps: int, stage: int, mu: float) -> FlowSchedule:
        """set_timesteps(num_steps, stage, mu=mu) of a pyramid scheduler (once per distinct arguments)."""
        def make() -> FlowSchedule:
            st, ss = self.timesteps_per_stage[stage], self.sigmas_per_stage[stage]
            timesteps = torch.from_numpy(np.linspace(st[0].item(), st[-1].item(), num_steps))
            sigmas = torch.cat([torch.from_numpy(np.linspace(ss[0].item(), ss[-1].item(), num_steps)), torch.zeros(1)])
            if self.use_dynamic_shifting:
                sigmas = self._time_shift(mu, sigmas)
                timesteps = st.min() + sigmas[:-1] * (st.max() - st.min())
            return FlowSchedule(timesteps, sigmas)

        return self._cached(("stage", num_steps, stage, mu), make)

    def chunk_schedule(self, num_steps: int, mu: float) -> FlowSchedule:
        """HeliosPipeline's set_timesteps(num_steps, sigmas=linspace(0.999, 0, n + 1)[:-1], mu=mu) on a
        one-stage scheduler (the shift is not applied to given sigmas, as in the reference)."""
        def make() -> FlowSchedule:
            given = np.linspace(0.999, 0.0, num_steps + 1)[:-1]
            timesteps = torch.from_numpy(given * self.num_train_timesteps)
            sigmas = torch.cat([torch.from_numpy(given), torch.zeros(1)])
            if self.use_dynamic_shifting:
                sigmas = self._time_shift(mu, sigmas)
                timesteps = sigmas[:-1] * self.num_train_timesteps
            return FlowSchedule(timesteps, sigmas)

        return self._cached(("chunk", num_steps, mu), make)

    def solver(self, schedule: FlowSchedule, sampler: str | None = None):
        """A fresh solver over ``schedule`` (set_timesteps resets the multistep history):
        UniPC or Euler, the checkpoint's scheduler_type unless ``sampler`` says otherwise."""
        sampler = sampler or self.scheduler_type
        if sampler == "euler":
            return EulerSolver(schedule)
        return UniPCSolver(schedule, self.unipc)

    def stage_solver(self, num_steps: int, stage: int, mu: float, amplify: bool = False, sampler: str | None = None):
        """The pyramid sampler's interface (amplify is a distilled setting, rejected before this)."""
        return self.solver(self.stage_schedule(num_steps, stage, mu), sampler)

    def renoise_coefficients(self, stage: int) -> tuple[float, float]:
        return renoise_coefficients(self.ori_start_sigmas[stage], self.gamma)
