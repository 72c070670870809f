"""Flow-matching Euler steps, as HeliosScheduler.step_euler takes them (scheduler_type "euler").

    x_{i+1} = x_i + (sigma_{i+1} - sigma_i) * v_i

The sigma difference is taken in float64 (the reference's sigmas) and applied to the float32 sample.
"""

from __future__ import annotations

import torch


class EulerSolver:
    """Steps through one schedule (``timesteps`` float64 [n], ``sigmas`` float64 [n + 1])."""

    def __init__(self, schedule):
        self.schedule, self.step_index = schedule, 0

    def model_timesteps(self, device: torch.device, batch: int, dtype: torch.dtype = torch.int64):
        return self.schedule.model_timesteps(device, batch, dtype)

    def _delta(self, i: int) -> float:
        key = ("euler", i)
        cache = self.schedule.cache
        if key not in cache:
            cache[key] = (self.schedule.sigmas[i + 1] - self.schedule.sigmas[i]).item()
        return cache[key]

    def step(self, model_output: torch.Tensor, sample: torch.Tensor, start: torch.Tensor | None = None) -> torch.Tensor:
        """``start`` (the DMD solver's stage start latents) is not used by Euler."""
        prev = sample + self._delta(self.step_index) * model_output
        self.step_index += 1
        return prev
