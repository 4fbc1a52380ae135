"""kill -9 of one site's server in the middle of a job, ``fedsyft up --site`` again, and
``train --resume``: the same model as an uninterrupted run, every round computed once."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest

from datasites.deploy import processes
from datasites.governance.audit import load_entries, verify
from fed_tasks.interface import SiteUnreachableError

from .test_http_federation import _spec, approve_everywhere, in_process, scientist


def _kill(member) -> None:
    pid = int((member.directory / "server.pid").read_text())
    os.kill(pid, signal.SIGKILL)
    processes._reap(pid)


def _executions(member, job_id: str, action: str) -> list[dict]:
    return [e for e in load_entries(member.directory, action="function_executed")
            if (e.get("objects") or {}).get("job_id") == job_id
            and (e.get("params") or {}).get("action") == action]


def _run_killed(deployed, spec, tmp_path):
    """Train ``spec``, SIGKILL the second site after round 2, restart it, resume."""
    fed = scientist(deployed)
    approve_everywhere(deployed, fed.submit(spec))
    victim = deployed.site[1]
    checkpoint = tmp_path / "checkpoint.json"

    def kill_after_round_two(rnd: int, loss: float) -> None:
        if rnd == 2:
            _kill(victim)

    trainer = fed.trainer(spec, progress=False, on_round=kill_after_round_two)
    with pytest.raises(SiteUnreachableError, match=victim.name):
        trainer.fit(checkpoint=checkpoint)
    assert not processes.state(victim).up
    processes.start(victim)  # what `fedsyft up --site NAME` does
    again = scientist(deployed)  # a new session: the old one's server is gone
    resumed = again.trainer(spec, progress=False)
    result = resumed.fit(checkpoint=checkpoint, resume=True)
    return victim, resumed, result


def test_a_killed_site_restarts_and_the_job_resumes_to_the_same_model(
        deployed, partitions, schema, tmp_path):
    spec = _spec(schema, "plain", rounds=4, seed=11)
    victim, resumed, result = _run_killed(deployed, spec, tmp_path)
    expected = in_process(spec, partitions, [s.name for s in deployed.site]).fit()
    assert result.rounds_completed == 4
    np.testing.assert_allclose(result.weights, expected.weights, atol=1e-6)
    for member in deployed.site:  # each site computed each round exactly once
        assert len(_executions(member, spec.job_id, "fit")) == 4, member.name
    assert verify(victim.directory).ok
    starts = load_entries(victim.directory, action="server_started")
    assert starts[-1]["params"]["previous_stop"] == "unclean"
    assert resumed.evaluate(result)  # the approval and its counters survived the kill


def test_no_round_is_charged_twice_after_a_kill(deployed, schema, tmp_path):
    spec = _spec(schema, "plain", rounds=4, seed=12).model_copy(
        # per-row DP-SGD: client-level noise would swamp 3 sites' signal, which the sites'
        # default policy refuses (fed_tasks/dp_usefulness.py)
        update={"dp_epsilon": 8.0, "dp_delta": 1e-5, "dp_clip": 1.0, "dp_sgd": True,
                "trim": 0.0})
    spec = type(spec).model_validate(spec.model_dump())
    victim, _, result = _run_killed(deployed, spec, tmp_path)
    assert result.rounds_completed == 4
    for member in deployed.site:
        charges = [e for e in load_entries(member.directory, action="budget_charged")
                   if (e.get("objects") or {}).get("job_id") == spec.job_id]
        assert [e["params"]["round"] for e in charges] == [1, 2, 3, 4], member.name


class _ScientistCrashed(Exception):
    """The data scientist's process dies (here: in the middle of a round's bookkeeping)."""


def test_a_secure_sum_job_resumes_in_a_new_trainer(deployed, partitions, schema, tmp_path):
    """secagg: the trainer dies after the sites answered round 3 (round 2's sum just opened),
    a new process resumes from the checkpoint: the session continues (its public state is in
    the checkpoint, each site's side in its directory), round 3 is answered from the sites'
    saved replies, and the model equals an uninterrupted run's."""
    spec = _spec(schema, "secagg", rounds=4, seed=13)
    fed = scientist(deployed)
    approve_everywhere(deployed, fed.submit(spec))
    checkpoint = tmp_path / "checkpoint.json"

    def crash(rnd: int, loss: float) -> None:
        if rnd == 2:
            raise _ScientistCrashed

    with pytest.raises(_ScientistCrashed):
        fed.trainer(spec, progress=False, on_round=crash).fit(checkpoint=checkpoint)
    result = scientist(deployed).trainer(spec, progress=False).fit(checkpoint=checkpoint,
                                                                  resume=True)
    expected = in_process(spec, partitions, [s.name for s in deployed.site]).fit()
    assert result.rounds_completed == 4
    np.testing.assert_allclose(result.weights, expected.weights, atol=1e-4)
    for member in deployed.site:  # round 3 was computed once, and answered twice
        assert len(_executions(member, spec.job_id, "fit")) == 4, member.name
