"""The HeliosScheduler arithmetic of the runtime (Helios-Base and Helios-Mid) against diffusers'
HeliosScheduler: schedules (set_timesteps, one stage and per pyramid stage) and every UniPC / Euler step,
for every solver order and step index; guidance and CFG-Zero* against the pyramid pipeline's formulas."""

import itertools

import numpy as np
import pytest
import torch

from helios_deploy.runtime.flow_scheduler import FlowScheduler
from helios_deploy.runtime.scheduler import calculate_shift
from helios_deploy.checkpoints.tiny import BASE_SCHEDULER_CONFIG, MID_SCHEDULER_CONFIG

SHAPE = (1, 4, 3, 4, 6)  # [B, C, T, H, W]


def _reference(config):
    from diffusers import HeliosScheduler

    return HeliosScheduler(**config)


def _set_chunk(ref, n, mu):
    ref.set_timesteps(n, sigmas=np.linspace(0.999, 0.0, n + 1)[:-1], mu=mu)


@pytest.mark.parametrize("n", [1, 2, 5, 50])
@pytest.mark.parametrize("shift_type", ["exponential", "linear"])
def test_chunk_schedule_equals_reference(n, shift_type):
    """HeliosPipeline's set_timesteps(n, sigmas=..., mu=...) on a one-stage scheduler, bit for bit."""
    cfg = dict(BASE_SCHEDULER_CONFIG, time_shift_type=shift_type)
    ref, ours = _reference(cfg), FlowScheduler(cfg)
    mu = calculate_shift(9 * 8 * 16 // 4)
    _set_chunk(ref, n, mu)
    s = ours.chunk_schedule(n, mu)
    assert torch.equal(ref.timesteps, s.timesteps) and torch.equal(ref.sigmas, s.sigmas)


@pytest.mark.parametrize("stage,n", list(itertools.product(range(3), [1, 2, 3, 10])))
def test_stage_schedule_equals_reference(stage, n):
    ref, ours = _reference(MID_SCHEDULER_CONFIG), FlowScheduler(MID_SCHEDULER_CONFIG)
    mu = calculate_shift(37 * (stage + 1))
    ref.set_timesteps(n, stage, mu=mu)
    s = ours.stage_schedule(n, stage, mu)
    assert torch.equal(ref.timesteps, s.timesteps) and torch.equal(ref.sigmas, s.sigmas)
    assert ours.ori_start_sigmas == ref.ori_start_sigmas
    assert ours.gamma == ref.gamma


def _run_both(cfg, schedule_of, set_reference, n, sampler, seed=0):
    """Feed the same samples and model outputs to HeliosScheduler.step and our solver, step by step.
    Returns [(step index, effective order, max abs difference)]."""
    ref, ours = _reference(cfg), FlowScheduler(cfg)
    set_reference(ref)
    solver = ours.solver(schedule_of(ours), sampler)
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(SHAPE, generator=g)
    out = []
    for i, t in enumerate(ref.timesteps):
        flow = torch.randn(SHAPE, generator=g)
        expected = ref.step(flow, t, sample.clone(), return_dict=False)[0]
        got = solver.step(flow, sample.clone())
        order = getattr(ref, "this_order", None) if sampler == "unipc" else 1
        out.append((i, order, (got - expected).abs().max().item(), torch.equal(got, expected)))
        sample = expected
    return out


UNIPC_CONFIGS = [dict(solver_order=o, solver_type=t, lower_order_final=f)
                 for o, t, f in itertools.product([1, 2, 3], ["bh2", "bh1"], [True, False])]


@pytest.mark.parametrize("unipc", UNIPC_CONFIGS, ids=lambda c: "-".join(map(str, c.values())))
@pytest.mark.parametrize("n", [1, 2, 3, 6])
def test_unipc_steps_equal_reference_one_stage(unipc, n):
    """Every step (predictor and corrector at every order the warm-up and lower_order_final reach) of
    HeliosPipeline's UniPC, bit for bit."""
    cfg = dict(BASE_SCHEDULER_CONFIG, scheduler_type="unipc", **unipc)
    mu = calculate_shift(288)
    steps = _run_both(cfg, lambda s: s.chunk_schedule(n, mu), lambda r: _set_chunk(r, n, mu), n, "unipc")
    assert len(steps) == n
    bad = [s for s in steps if not s[3]]
    assert not bad, f"steps (index, order, max abs diff) differing from HeliosScheduler.step: {bad}"
    if n >= 3 and unipc["solver_order"] >= 2:  # the multistep path is reached
        assert max(s[1] for s in steps) == min(unipc["solver_order"], n - 1 if unipc["lower_order_final"] else n)


@pytest.mark.parametrize("stage", range(3))
@pytest.mark.parametrize("sampler", ["unipc", "euler"])
def test_pyramid_stage_steps_equal_reference(stage, sampler):
    """Mid: each pyramid stage's schedule stepped through with UniPC (order 2, bh2) or Euler."""
    cfg = dict(MID_SCHEDULER_CONFIG, scheduler_type=sampler)
    mu, n = calculate_shift(40 * (stage + 1)), 4
    steps = _run_both(cfg, lambda s: s.stage_schedule(n, stage, mu), lambda r: r.set_timesteps(n, stage, mu=mu), n,
                      sampler)
    assert all(s[3] for s in steps), steps


@pytest.mark.parametrize("n", [1, 2, 5])
def test_euler_steps_equal_reference(n):
    cfg = dict(BASE_SCHEDULER_CONFIG, scheduler_type="euler")
    mu = calculate_shift(288)
    steps = _run_both(cfg, lambda s: s.chunk_schedule(n, mu), lambda r: _set_chunk(r, n, mu), n, "euler")
    assert len(steps) == n and all(s[3] for s in steps), steps


def test_disable_corrector_equals_reference():
    cfg = dict(BASE_SCHEDULER_CONFIG, disable_corrector=[0, 2])
    mu = calculate_shift(288)
    steps = _run_both(cfg, lambda s: s.chunk_schedule(5, mu), lambda r: _set_chunk(r, 5, mu), 5, "unipc")
    assert all(s[3] for s in steps), steps


def test_solver_history_resets_per_schedule():
    """A new solver starts a fresh multistep history, as set_timesteps resets HeliosScheduler's."""
    ours = FlowScheduler(BASE_SCHEDULER_CONFIG)
    schedule = ours.chunk_schedule(3, 0.7)
    first, second = ours.solver(schedule), ours.solver(schedule)
    x = torch.randn(SHAPE)
    a = first.step(torch.ones(SHAPE), x)
    first.step(torch.ones(SHAPE), a)
    assert torch.equal(second.step(torch.ones(SHAPE), x), a)


# -- guidance ------------------------------------------------------------------------------------------


def test_cfg_zero_star_equals_reference_formula():
    """optimized_scale and the CFG-Zero* combination as HeliosPyramidPipeline computes them."""
    from diffusers.pipelines.helios.pipeline_helios_pyramid import optimized_scale as ref_scale

    from helios_deploy.runtime.guidance import Guidance

    g = torch.Generator().manual_seed(1)
    cond, uncond = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    alpha = ref_scale(cond.view(1, -1), uncond.view(1, -1)).view(1, 1, 1, 1, 1)
    guidance = Guidance(5.0, cfg_zero_star=True, use_zero_init=True, zero_steps=1)
    expected = uncond * alpha + 5.0 * (cond - uncond * alpha)
    assert torch.equal(guidance.combine(cond, uncond, 1, 0), expected)
    assert torch.equal(guidance.combine(cond, uncond, 0, 2), expected)  # after the zero-init steps
    for i in (0, 1):  # stage 0, i <= zero_steps: zero
        assert torch.count_nonzero(guidance.combine(cond, uncond, 0, i)) == 0
    plain = Guidance(5.0)
    assert torch.equal(plain.combine(cond, uncond, 0, 0), uncond + 5.0 * (cond - uncond))
