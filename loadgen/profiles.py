"""Load profiles for `task loadgen`: what a run offers, phase by phase, and when.

A profile is a list of phases, each with a duration and an offered rate (0 = idle) and
the share of high- and low-priority jobs; arrivals are Poisson (exponential gaps) or
fixed-rate, and never wait for answers (open loop). The built-in ones are below; a
user's own is a YAML file of the same shape:

    name: my-spike
    description: what it offers and why
    model: echo
    arrivals: poisson            # or fixed
    phases:
      - {name: idle, duration_s: 10, rate_per_s: 0}
      - {name: spike, duration_s: 30, rate_per_s: 200, high_share: 0.1}
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from wire.envelope import Priority

Arrivals = Literal["poisson", "fixed"]


class InvalidProfile(ValueError):
    """A profile file that cannot be used; the message names the field."""


@dataclass(frozen=True)
class Phase:
    name: str
    duration_s: float
    rate_per_s: float
    high_share: float = 0.0
    low_share: float = 0.0


@dataclass(frozen=True)
class Arrival:
    at_s: float  # from the start of the run
    priority: Priority
    phase: str


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    phases: tuple[Phase, ...]
    model: str = "echo"
    arrivals: Arrivals = "poisson"

    @property
    def duration_s(self) -> float:
        return sum(phase.duration_s for phase in self.phases)

    def schedule(self, max_jobs: int, max_duration_s: float, seed: int = 1) -> list[Arrival]:
        """Every arrival of the run, in time order, cut at `max_jobs` and `max_duration_s`."""
        chooser = random.Random(seed)
        arrivals: list[Arrival] = []
        phase_start_s = 0.0
        for phase in self.phases:
            at_s, count = phase_start_s, 0
            end_s = min(phase_start_s + phase.duration_s, max_duration_s)
            while phase.rate_per_s > 0:
                count += 1
                if self.arrivals == "poisson":
                    at_s += chooser.expovariate(phase.rate_per_s)
                else:  # computed, not summed, so rounding does not add an arrival
                    at_s = phase_start_s + count / phase.rate_per_s
                if at_s >= end_s or len(arrivals) >= max_jobs:
                    break
                arrivals.append(Arrival(at_s, _priority(chooser.random(), phase), phase.name))
            phase_start_s += phase.duration_s
        return arrivals


def _priority(draw: float, phase: Phase) -> Priority:
    if draw < phase.high_share:
        return "high"
    if draw < phase.high_share + phase.low_share:
        return "low"
    return "normal"


STEADY_RATE_PER_S = 20.0

BUILT_IN: dict[str, Profile] = {
    profile.name: profile
    for profile in (
        Profile(
            "steady",
            f"{STEADY_RATE_PER_S:.0f} echo jobs/s for 60 s: the baseline the others multiply",
            (Phase("steady", 60, STEADY_RATE_PER_S),),
        ),
        Profile(
            "spike",
            "idle 15 s, 10x steady for 30 s, idle 20 s, a second spike of 30 s: the first spike "
            "meets whatever replicas the idle left (none from a cold start), the second a warm one",
            (
                Phase("idle", 15, 0),
                Phase("spike-1", 30, 10 * STEADY_RATE_PER_S),
                Phase("lull", 20, 0),
                Phase("spike-2", 30, 10 * STEADY_RATE_PER_S),
            ),
        ),
        Profile(
            "spike-short",
            "the spike profile in under a minute, for the test suite: idle 3 s, 100/s for 6 s, "
            "idle 4 s, 100/s for 6 s",
            (Phase("idle", 3, 0), Phase("spike-1", 6, 100), Phase("lull", 4, 0), Phase("spike-2", 6, 100)),
        ),
        Profile(
            "ramp",
            "from 10 to 400 jobs/s in eight steps of 10 s: where acceptance or latency gives",
            tuple(Phase(f"ramp-{rate}", 10, rate) for rate in (10, 25, 50, 100, 150, 200, 300, 400)),
        ),
        Profile(
            "priority-flood",
            "a low-priority flood of 300 jobs/s for 40 s with a trickle of 2 % high-priority jobs, "
            "after 20 s of the high-priority trickle alone (its idle latency) and 15 s of warm-up",
            (
                Phase("warm-up", 15, 5),
                Phase("trickle", 20, 5, high_share=1.0),
                Phase("flood", 40, 300, high_share=0.02, low_share=0.98),
            ),
        ),
        Profile(
            "soak",
            f"{STEADY_RATE_PER_S:.0f} jobs/s for 10 minutes: leaks, drift, slow growth",
            (Phase("soak", 600, STEADY_RATE_PER_S),),
        ),
    )
}


def load_profile(name_or_path: str) -> Profile:
    """A built-in profile by name, or a user's YAML file by path."""
    if name_or_path in BUILT_IN:
        return BUILT_IN[name_or_path]
    path = Path(name_or_path)
    if not path.is_file():
        raise InvalidProfile(f"{name_or_path!r} is neither a built-in profile {sorted(BUILT_IN)} nor a file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise InvalidProfile(f"{path}: not YAML: {exc}") from exc
    return _profile_from(raw, str(path))


def _profile_from(raw: Any, where: str) -> Profile:
    if not isinstance(raw, dict):
        raise InvalidProfile(f"{where}: expected a mapping with name, description and phases")
    arrivals = raw.get("arrivals", "poisson")
    if arrivals not in ("poisson", "fixed"):
        raise InvalidProfile(f"{where}: arrivals={arrivals!r}; expected poisson or fixed")
    phases_raw = raw.get("phases")
    if not isinstance(phases_raw, list) or not phases_raw:
        raise InvalidProfile(f"{where}: phases must be a non-empty list")
    phases = tuple(_phase_from(item, f"{where}: phases[{i}]") for i, item in enumerate(phases_raw))
    return Profile(
        str(raw.get("name", Path(where).stem)),
        str(raw.get("description", "")),
        phases,
        model=str(raw.get("model", "echo")),
        arrivals=arrivals,
    )


def _phase_from(raw: Any, where: str) -> Phase:
    if not isinstance(raw, dict):
        raise InvalidProfile(f"{where}: expected a mapping")
    try:
        phase = Phase(
            str(raw.get("name", "phase")),
            float(raw["duration_s"]),
            float(raw.get("rate_per_s", 0)),
            float(raw.get("high_share", 0)),
            float(raw.get("low_share", 0)),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidProfile(f"{where}: {exc!r}; expected duration_s and rate_per_s as numbers") from exc
    if phase.duration_s <= 0 or phase.rate_per_s < 0:
        raise InvalidProfile(f"{where}: duration_s must be > 0 and rate_per_s >= 0")
    if not 0 <= phase.high_share + phase.low_share <= 1 or min(phase.high_share, phase.low_share) < 0:
        raise InvalidProfile(f"{where}: high_share + low_share must lie within 0..1")
    return phase
