"""The Base / Mid scheduler's schedule cache (runtime/flow_scheduler.py) is a bounded LRU: a server that sees
many distinct step counts keeps at most SCHEDULE_CACHE_SIZE schedules, the most recently used ones, and a
schedule dropped and made again equals the first (diffusers' HeliosScheduler is checked in test_samplers)."""

import torch

from helios_deploy.checkpoints.tiny import BASE_SCHEDULER_CONFIG, MID_SCHEDULER_CONFIG
from helios_deploy.runtime.flow_scheduler import SCHEDULE_CACHE_SIZE, FlowScheduler


def test_schedule_cache_is_a_bounded_lru():
    for config, make in ((MID_SCHEDULER_CONFIG, lambda s, n: s.stage_schedule(n, 0, 0.5)),
                         (BASE_SCHEDULER_CONFIG, lambda s, n: s.chunk_schedule(n, 0.5))):
        sched = FlowScheduler(config)
        first = make(sched, 1)
        timesteps = first.timesteps.clone()
        for n in range(2, 3 * SCHEDULE_CACHE_SIZE):
            make(sched, n)
            assert make(sched, 1) is first  # used on every round: the most recent, never dropped
        assert len(sched._schedules) == SCHEDULE_CACHE_SIZE
        assert make(sched, 2 * SCHEDULE_CACHE_SIZE) is make(sched, 2 * SCHEDULE_CACHE_SIZE)  # still held
        dropped_once = make(sched, 2)  # dropped long ago: made again, equal
        fresh = make(FlowScheduler(config), 2)
        assert torch.equal(dropped_once.timesteps, fresh.timesteps) and torch.equal(dropped_once.sigmas, fresh.sigmas)
        assert torch.equal(first.timesteps, timesteps) and len(sched._schedules) == SCHEDULE_CACHE_SIZE
