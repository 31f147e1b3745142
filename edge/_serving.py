"""One bundle being served: its runtime, measured profile, cost model and planner, and the
count of requests still running on it (so a rollout can switch to another without failing one).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tandem.edge._link import LinkEstimator
from tandem.edge._planner import CostModel, Planner
from tandem.edge._profiler import ProfileTable, profile_bundle, profile_part
from tandem.edge._runtime import ModelRuntime

__all__ = ["ServingModel", "build_serving_model"]

log = logging.getLogger("tandem.edge")


@dataclass
class ServingModel:
    bundle: Any
    runtime: ModelRuntime
    table: ProfileTable
    cost: CostModel
    planner: Planner
    path: Path
    inflight: int = 0
    cascade: Any = None  # a CascadePlanner (tandem.edge._cascade_planner) for a cascade bundle
    _idle: asyncio.Event | None = field(default=None, repr=False)

    @property
    def digest(self) -> str:
        return self.bundle.digest

    @property
    def name(self) -> str:
        return self.bundle.manifest.model_name

    def acquire(self) -> None:
        self.inflight += 1

    def release(self) -> None:
        self.inflight -= 1
        if self.inflight == 0 and self._idle is not None:
            self._idle.set()

    async def drained(self, timeout_s: float) -> bool:
        """Wait (on the loop) until no request runs on this model; False after ``timeout_s``."""
        if self.inflight == 0:
            return True
        self._idle = asyncio.Event()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
            return True
        except asyncio.TimeoutError:
            return False
        finally:
            self._idle = None

    def close(self) -> None:
        if self.cascade is not None:
            self.cascade.close()
        self.runtime.close()
        self.bundle.close()


def build_serving_model(bundle: Any, path: Path, profile: Any, link: LinkEstimator,
                        config: Any, state_dir: Path | None, *,
                        progress: bool = True) -> ServingModel:
    """Load every part of ``bundle``, profile it (or reuse the stored profile) and make its
    planner. Blocking: run it in a worker thread. Closes the runtime on failure."""
    from tandem.edge._config import parse_shapes

    runtime = ModelRuntime(bundle, profile, backend=config.backend,
                           engine_cache=config.engine_cache or (
                               state_dir / "engines" if state_dir else None),
                           intra_op_threads=config.intra_op_threads)
    try:
        runtime.load()
        table = profile_bundle(runtime, state_dir, warmup=config.profile_warmup,
                               runs=config.profile_runs,
                               shapes=parse_shapes(config.profile_shapes), progress=progress)
        cost = CostModel(bundle.manifest, bundle.digest, table, link, kinds=runtime.parts,
                         cloud_speedup=config.cloud_speedup)
        planner = Planner(cost, link, hysteresis=config.hysteresis,
                          explore_interval_s=config.explore_interval_s)
    except BaseException:
        runtime.close()
        raise
    model = ServingModel(bundle, runtime, table, cost, planner, path)

    def on_switch(part: str, kind: str) -> None:  # in the engine thread
        try:
            timing = profile_part(runtime, table, part, state_dir, warmup=config.profile_warmup,
                                  runs=config.profile_runs)
            log.info("profiled %s on %s: median %.3f ms", part, kind, timing.median_ms)
        except Exception as exc:
            log.warning("could not profile %s on %s: %s", part, kind, exc)
        cost.forget_part(part)

    runtime.on_switch = on_switch
    return model
