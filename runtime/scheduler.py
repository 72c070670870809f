"""The distilled (DMD) scheduler's arithmetic, read from the checkpoint's scheduler_config.json.

Mirrors diffusers' HeliosDMDScheduler (schedulers/scheduling_helios_dmd.py) for the pyramid path, with
the same names, so the two can be read side by side; the schedules in float64 as the reference computes
them (the step itself in float32, see dmd_step).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch


SCHEDULE_CACHE_SIZE = 64  # stage schedules kept per scheduler (least recently used dropped)


def calculate_shift(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
                    base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return image_seq_len * m + b


@dataclass(frozen=True)
class StageSchedule:
    timesteps: torch.Tensor  # float64 [n]: the transformer sees them truncated to int64
    sigmas: torch.Tensor  # float64 [n + 1], ending at 0
    step_sigmas: tuple[float, ...] = ()  # the sigma dmd_step looks up at each timestep (a float64 value)

    def __post_init__(self):
        if not self.step_sigmas:  # looked up once per schedule, not at every step of every chunk
            object.__setattr__(self, "step_sigmas", tuple(_sigma_at(self, t.item()) for t in self.timesteps))
        object.__setattr__(self, "_model_timesteps", {})

    def model_timesteps(self, device: torch.device, batch: int) -> tuple[torch.Tensor, ...]:
        """The transformer's int64 timestep input [batch] for each step (truncated, as the reference's
        ``t.expand(batch).to(torch.int64)``), made once per device and batch."""
        key = (device, batch)
        if key not in self._model_timesteps:
            ts = self.timesteps.to(device=device, dtype=torch.int64)
            self._model_timesteps[key] = tuple(t.expand(batch).contiguous() for t in ts)
        return self._model_timesteps[key]


def stage_tables(num_train_timesteps: int, shift: float, stages: int, stage_range, gamma: float):
    """The per-stage tables HeliosScheduler and HeliosDMDScheduler both build at construction
    (init_sigmas_for_each_stage): (ori_start_sigmas, timesteps_per_stage, sigmas_per_stage)."""
    n = num_train_timesteps
    alphas = np.linspace(1, 1 / n, n + 1)
    sigmas = 1.0 - alphas
    sigmas = torch.from_numpy(np.flip(shift * sigmas / (1 + (shift - 1) * sigmas))[:-1].copy())
    timesteps = sigmas * n
    ori_start_sigmas, timesteps_per_stage, sigmas_per_stage, distance = {}, {}, {}, []
    for i in range(stages):
        start = max(int(stage_range[i] * n), 0)
        end = min(int(stage_range[i + 1] * n), n)
        start_sigma = sigmas[start].item()
        end_sigma = sigmas[end].item() if end < n else 0.0
        ori_start_sigmas[i] = start_sigma
        if i != 0:
            ori_sigma = 1 - start_sigma
            corrected = (1 / (math.sqrt(1 + (1 / gamma)) * (1 - ori_sigma) + ori_sigma)) * ori_sigma
            start_sigma = 1 - corrected
        distance.append(start_sigma - end_sigma)
    total = sum(distance)
    for i in range(stages):
        r0 = 0.0 if i == 0 else sum(distance[:i]) / total
        r1 = 0.9999999999999999 if i == stages - 1 else sum(distance[: i + 1]) / total
        t_max = min(timesteps[int(r0 * n)], 999)
        t_min = timesteps[min(int(r1 * n), n - 1)]
        ts = np.linspace(t_max, t_min, n + 1)  # a tensor when t_max/t_min are tensors, as in the reference
        timesteps_per_stage[i] = ts[:-1] if isinstance(ts, torch.Tensor) else torch.from_numpy(ts[:-1])
        sigmas_per_stage[i] = torch.from_numpy(np.linspace(0.999, 0, n + 1)[:-1])
    return ori_start_sigmas, timesteps_per_stage, sigmas_per_stage


def renoise_coefficients(ori_start_sigma: float, gamma: float) -> tuple[float, float]:
    """(alpha, beta) that fix the block artifact when a pyramid stage starts from the upsampled latents."""
    ori_sigma = 1 - ori_start_sigma
    alpha = 1 / (math.sqrt(1 + (1 / gamma)) * (1 - ori_sigma) + ori_sigma)
    beta = alpha * (1 - ori_sigma) / math.sqrt(gamma)
    return alpha, beta


class DMDScheduler:
    def __init__(self, config: Mapping):
        self.config = dict(config)
        c = self.config
        self.num_train_timesteps = int(c.get("num_train_timesteps", 1000))
        self.shift = float(c.get("shift", 1.0))
        self.stages = int(c.get("stages", 3))
        self.stage_range = list(c.get("stage_range", [0, 1 / 3, 2 / 3, 1]))
        self.gamma = float(c.get("gamma", 1 / 3))
        self.use_dynamic_shifting = bool(c.get("use_dynamic_shifting", False))
        self.time_shift_type = c.get("time_shift_type", "linear")
        self.ori_start_sigmas, self.timesteps_per_stage, self.sigmas_per_stage = stage_tables(
            self.num_train_timesteps, self.shift, self.stages, self.stage_range, self.gamma)
        # a schedule depends only on its arguments; the most recently used SCHEDULE_CACHE_SIZE are kept
        self._schedules: OrderedDict[tuple, StageSchedule] = OrderedDict()

    def _time_shift(self, mu: float, t: torch.Tensor) -> torch.Tensor:
        if self.time_shift_type == "exponential":
            return math.exp(mu) / (math.exp(mu) + (1 / t - 1))
        return mu / (mu + (1 / t - 1))

    def stage_schedule(self, num_steps: int, stage: int, mu: float, amplify: bool) -> StageSchedule:
        """set_timesteps(num_steps, stage, mu=mu, is_amplify_first_chunk=amplify), computed once per
        distinct arguments (the same for every chunk of a request)."""
        key = (num_steps, stage, mu, amplify)
        if key in self._schedules:
            self._schedules.move_to_end(key)
        else:
            self._schedules[key] = self._stage_schedule(num_steps, stage, mu, amplify)
            while len(self._schedules) > SCHEDULE_CACHE_SIZE:
                self._schedules.popitem(last=False)
        return self._schedules[key]

    def _stage_schedule(self, num_steps: int, stage: int, mu: float, amplify: bool) -> StageSchedule:
        n = num_steps * 2 + 1 if amplify else num_steps + 1
        st = self.timesteps_per_stage[stage]
        timesteps = torch.from_numpy(np.linspace(st[0].item(), st[-1].item(), n))
        ss = self.sigmas_per_stage[stage]
        sigmas = torch.cat([torch.from_numpy(np.linspace(ss[0].item(), ss[-1].item(), n)), torch.zeros(1)])
        timesteps = timesteps[:-1]
        sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
        if self.use_dynamic_shifting:
            sigmas = self._time_shift(mu, sigmas)
            timesteps = st.min() + sigmas[:-1] * (st.max() - st.min())
        return StageSchedule(timesteps, sigmas)

    def renoise_coefficients(self, stage: int) -> tuple[float, float]:
        return renoise_coefficients(self.ori_start_sigmas[stage], self.gamma)

    def stage_solver(self, num_steps: int, stage: int, mu: float, amplify: bool, sampler: str = "dmd") -> "DMDSolver":
        """set_timesteps for one pyramid stage, as a solver that steps through it."""
        return DMDSolver(self.stage_schedule(num_steps, stage, mu, amplify))


class DMDSolver:
    """HeliosDMDScheduler.step over one stage's schedule (the pyramid pipeline's distilled branch)."""

    def __init__(self, schedule: StageSchedule):
        self.schedule, self.step_index = schedule, 0

    def model_timesteps(self, device: torch.device, batch: int) -> tuple[torch.Tensor, ...]:
        return self.schedule.model_timesteps(device, batch)

    def step(self, model_output: torch.Tensor, sample: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
        out = dmd_step(model_output, sample, self.schedule, self.step_index, start)
        self.step_index += 1
        return out


def _sigma_at(schedule: StageSchedule, t: float) -> float:
    """sigma of the timestep nearest to int64(t), as the reference looks it up."""
    t_long = torch.tensor(t, dtype=torch.float64).long().double()
    idx = torch.argmin((schedule.timesteps - t_long).abs())
    return schedule.sigmas[idx].item()


def dmd_step(flow: torch.Tensor, sample: torch.Tensor, schedule: StageSchedule, i: int,
             start_latents: torch.Tensor) -> torch.Tensor:
    """One scheduler step: x0 = x_t - sigma_t * v, then re-noise x0 toward the next timestep using the
    stage's start latents, (1 - sigma) * x0 + sigma * start; the last step returns x0.

    The reference upcasts to float64 and rounds the result back to float32; here each line is one
    float32 pass (a multiply-add), within a couple of float32 roundings of it (tested against
    HeliosDMDScheduler.step), with a third of the memory traffic: on CPU this step was the largest
    piece of the sampler's host time."""
    x0 = torch.add(sample, flow, alpha=-schedule.step_sigmas[i])
    if i == len(schedule.step_sigmas) - 1:
        return x0
    sigma = schedule.step_sigmas[i + 1]
    return x0.mul_(1 - sigma).add_(start_latents, alpha=sigma)
