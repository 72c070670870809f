"""UniPC multistep (UniP predictor + UniC corrector, B(h) of type bh1 or bh2), as HeliosScheduler.step_unipc
takes its steps for flow-matching models (predict_x0, flow sigmas: alpha_t = 1 - sigma_t).

At step i, with x0_i = x_i - sigma_i * v_i (convert_model_output):
1. corrector (i > 0): refine x_i with x0_i and the previous data predictions (order of the last predictor);
2. shift the history of data predictions (solver_order of them, newest last);
3. predictor: x_{i+1} from x_i and the history, of order min(solver_order, warm-up, steps left).

Every coefficient depends only on the schedule, the step and the order: it is computed once per schedule,
in float64 on 0-d tensors as the reference computes it, and applied to the float32 tensors in the
reference's order of operations (so the result equals HeliosScheduler.step; tested for every order and
step index in tests/test_samplers.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

from ..errors import UserError


@dataclass(frozen=True)
class UniPCConfig:
    solver_order: int = 2
    solver_type: str = "bh2"
    lower_order_final: bool = True
    disable_corrector: tuple[int, ...] = ()

    @classmethod
    def from_scheduler_config(cls, c: Mapping) -> "UniPCConfig":
        """The UniPC settings of a HeliosScheduler config; a UserError for what the reference does not run
        with a flow-matching model (or this runtime does not implement)."""
        unsupported = {"prediction_type": ("flow_prediction",), "predict_x0": (True,), "thresholding": (False,),
                       "use_flow_sigmas": (True,), "solver_p": (None,)}
        for key, ok in unsupported.items():
            if key in c and c[key] not in ok:
                raise UserError(f"unsupported HeliosScheduler setting {key}", found=repr(c[key]),
                                expected=" or ".join(map(repr, ok)))
        solver_type = {"midpoint": "bh2", "heun": "bh2", "logrho": "bh2"}.get(c.get("solver_type", "bh2"),
                                                                             c.get("solver_type", "bh2"))
        order = c.get("solver_order", 2)
        if solver_type not in ("bh1", "bh2") or not isinstance(order, int) or order < 1:
            raise UserError("unsupported UniPC settings", found=f"solver_type {solver_type!r}, solver_order {order!r}",
                            expected="solver_type bh1 or bh2, solver_order >= 1")
        return cls(order, solver_type, bool(c.get("lower_order_final", True)),
                   tuple(c.get("disable_corrector") or ()))


@dataclass(frozen=True)
class Coefficients:
    """x_t = ratio * x - data * m0 - res * (sum_k rhos[k] * D1_k [+ rho_t * D1_t]), D1_k = (m_k - m0) / rks[k]."""

    ratio: float  # sigma_t / sigma_s0
    data: float  # alpha_t * h_phi_1
    res: float  # alpha_t * B(h)
    rks: tuple[float, ...]  # one per earlier data prediction
    rhos: torch.Tensor | None  # float32 [len(rks)] (predictor) or [len(rks) + 1] (corrector), None: no term


def _alpha_sigma(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return 1 - sigma, torch.clamp(sigma, min=1e-8)


def _lambda(sigma: torch.Tensor) -> torch.Tensor:
    alpha, sigma = _alpha_sigma(sigma)
    return torch.log(alpha) - torch.log(sigma)


def coefficients(sigmas: torch.Tensor, t: int, s0: int, earlier: list[int], order: int, config: UniPCConfig,
                 corrector: bool) -> Coefficients:
    """Coefficients of one update from sigma index ``s0`` to ``t`` using data predictions made at sigma
    indices ``earlier`` (newest first)."""
    alpha_t, sigma_t = _alpha_sigma(sigmas[t])
    _, sigma_s0 = _alpha_sigma(sigmas[s0])
    lambda_s0 = _lambda(sigmas[s0])
    h = _lambda(sigmas[t]) - lambda_s0
    rks = [(_lambda(sigmas[si]) - lambda_s0) / h for si in earlier]
    hh = -h
    h_phi_1 = torch.expm1(hh)
    b_h = hh if config.solver_type == "bh1" else torch.expm1(hh)
    rk = torch.tensor([*rks, 1.0])
    rows, b, h_phi_k, factorial = [], [], h_phi_1 / hh - 1, 1
    for i in range(1, order + 1):
        rows.append(torch.pow(rk, i - 1))
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    big_r, b = torch.stack(rows), torch.tensor(b)
    if corrector:
        rhos = (torch.tensor([0.5]) if order == 1 else torch.linalg.solve(big_r, b)).float()
    elif rks:
        rhos = torch.tensor([0.5]) if order == 2 else torch.linalg.solve(big_r[:-1, :-1], b[:-1]).float()
    else:
        rhos = None
    return Coefficients((sigma_t / sigma_s0).item(), (alpha_t * h_phi_1).item(), (alpha_t * b_h).item(),
                        tuple(r.item() for r in rks), rhos)


class UniPCSolver:
    """Steps through one schedule (``sigmas`` float64 [n + 1]); holds the multistep history."""

    def __init__(self, schedule, config: UniPCConfig):
        self.schedule, self.config = schedule, config
        self.num_steps = len(schedule.sigmas) - 1
        self.model_outputs: list[torch.Tensor | None] = [None] * config.solver_order  # data predictions, newest last
        self.lower_order_nums, self.this_order, self.last_sample, self.step_index = 0, 0, None, 0

    def model_timesteps(self, device: torch.device, batch: int, dtype: torch.dtype = torch.int64):
        return self.schedule.model_timesteps(device, batch, dtype)

    def _coefficients(self, kind: str, i: int, order: int) -> Coefficients:
        key = ("unipc", kind, i, order)
        cache = self.schedule.cache
        if key not in cache:
            if kind == "predictor":  # from sigma i to i + 1, history made at i - 1, i - 2, ...
                cache[key] = coefficients(self.schedule.sigmas, i + 1, i, [i - k for k in range(1, order)], order,
                                          self.config, corrector=False)
            else:  # from sigma i - 1 to i, history made at i - 2, i - 3, ...
                cache[key] = coefficients(self.schedule.sigmas, i, i - 1, [i - 1 - k for k in range(1, order)],
                                          order, self.config, corrector=True)
        return cache[key]

    def _update(self, c: Coefficients, x: torch.Tensor, model_t: torch.Tensor | None = None) -> torch.Tensor:
        m0 = self.model_outputs[-1]
        x_t = c.ratio * x - c.data * m0
        d1s = [(self.model_outputs[-(k + 2)] - m0) / rk for k, rk in enumerate(c.rks)]
        res = torch.einsum("k,bkc...->bc...", c.rhos[:len(d1s)], torch.stack(d1s, dim=1)) if d1s else 0
        if model_t is not None:  # corrector: the new data prediction's own term
            res = res + c.rhos[-1] * (model_t - m0)
        elif not d1s:
            return x_t
        return x_t - c.res * res

    def step(self, model_output: torch.Tensor, sample: torch.Tensor, start: torch.Tensor | None = None) -> torch.Tensor:
        """One step: model_output is the flow v at ``sample``; ``start`` (the DMD solver's stage start
        latents) is not used by UniPC."""
        i, cfg = self.step_index, self.config
        x0 = sample - self.schedule.sigmas[i].item() * model_output  # convert_model_output (flow -> data)
        if i > 0 and (i - 1) not in cfg.disable_corrector and self.last_sample is not None:
            sample = self._update(self._coefficients("corrector", i, self.this_order), self.last_sample, x0)
        self.model_outputs = [*self.model_outputs[1:], x0]
        order = min(cfg.solver_order, self.num_steps - i) if cfg.lower_order_final else cfg.solver_order
        self.this_order = min(order, self.lower_order_nums + 1)  # warm-up of the multistep history
        self.last_sample = sample
        prev = self._update(self._coefficients("predictor", i, self.this_order), sample)
        self.lower_order_nums = min(self.lower_order_nums + 1, cfg.solver_order)
        self.step_index += 1
        return prev
