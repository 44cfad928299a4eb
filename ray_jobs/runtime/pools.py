"""How many CPUs each stage of a job holds, sized from the Ray nodes that are alive now.

Infer, eval and the clip cache's fill run one shape of pipeline: small tasks that read the inputs
(and, for the cache, encode the decoded clips), a fixed pool of decode actors, and for infer and
eval a pool of model actors. Decoding is the bottleneck, so the decode pool gets every CPU the
other stages leave, all from the start (a fixed pool starts every actor at once; an autoscaling
one ramps up over minutes). A fixed pool sized for more CPUs than the cluster has takes every
live CPU and leaves the reads it waits on none: the job stalls (`error: stalled`). So the sizes
here come from what is alive, and always leave the small tasks their CPUs:

- a small task holds SMALL_TASK_CPUS; each small-task stage (read; encode) has a reserve of one
  CPU in CPUS_PER_RESERVED_CPU, at least one, that no actor takes;
- a model actor holds MODEL_ACTOR_CPUS (and its GPU share, when there are GPUs);
- the decode actors share the rest.

What is alive: not `ray.cluster_resources()` nor `ray.nodes()` alone. Both are the GCS's view,
and the GCS counts a node that is gone until its health checks have failed several times in a row
(on Ray 2.60, 5 checks 3 s apart: a lost node counted for about 15 s, `Alive` flipping at the same
moment as the totals). A job started in that window, as a rerun right after a spot loss is, sized
its pool for CPUs that were gone: with 6 CPUs counted and 4 alive, four one-CPU decode actors took
all 4 and the reads never ran. Here a node counts when the GCS lists it alive *and* its raylet
accepts a connection within PROBE_TIMEOUT_S: a lost raylet's port refuses at once when its machine
is still there, and does not answer when the machine is gone. Nodes are probed in parallel, so
lost machines cost a job's start about PROBE_TIMEOUT_S, not that much each. A node's total
resources count, not
what is free this moment: a job that starts while the previous one's actors are still being torn
down must not size its pools for the leftovers.
"""

from __future__ import annotations

import math
import socket
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

SMALL_TASK_CPUS = 0.25  # a read task, an encode task: they move bytes, decoding is the CPU's work
CPUS_PER_RESERVED_CPU = 16
MODEL_ACTOR_CPUS = 1
PROBE_TIMEOUT_S = 2.0
_PROBES_AT_ONCE = 64


@dataclass(frozen=True)
class Capacity:
    """What the live nodes hold, summed, and how many nodes the GCS lists that did not answer."""

    cpus: float
    gpus: float
    nodes: int
    unanswered: int = 0

    def describe(self) -> str:
        text = f"{self.cpus:g} CPUs, {self.gpus:g} GPUs on {self.nodes} live nodes"
        if self.unanswered:
            text += f" ({self.unanswered} more listed by Ray did not answer: lost, not counted)"
        return text


@dataclass(frozen=True)
class Pools:
    """The stages' sizes (module docstring)."""

    small_tasks: int  # tasks of SMALL_TASK_CPUS at once in each small-task stage's reserve
    decoders: int  # decode actors
    model_actors: int = 0
    gpus_per_model_actor: float = 0.0


def live_capacity() -> Capacity:
    """The CPUs and GPUs of the nodes that Ray lists alive and whose raylet answers now."""
    import ray

    listed = [n for n in ray.nodes() if n["Alive"] and (n["Resources"].get("CPU") or n["Resources"].get("GPU"))]
    if not listed:
        return Capacity(0.0, 0.0, 0)
    with ThreadPoolExecutor(min(len(listed), _PROBES_AT_ONCE)) as pool:
        answered = list(pool.map(_answers, listed))
    live = [n for n, ok in zip(listed, answered) if ok]
    return Capacity(cpus=sum(n["Resources"].get("CPU", 0.0) for n in live),
                    gpus=sum(n["Resources"].get("GPU", 0.0) for n in live),
                    nodes=len(live), unanswered=len(listed) - len(live))


def size_pools(capacity: Capacity, *, small_stages: int, decode_cpus: float = 1.0, model_actors: int | None = 0,
               gpus_per_model_actor: float | None = None) -> Pools:
    """The pools of a job with `small_stages` small-task stages and decode actors of `decode_cpus`
    CPUs, beside `model_actors` model actors: 0 for none, None for one per GPU share (one CPU actor
    without GPUs). `gpus_per_model_actor` None means 1 when the live nodes have GPUs, else 0."""
    per_actor = gpus_per_model_actor if gpus_per_model_actor is not None else (1.0 if capacity.gpus else 0.0)
    if model_actors is None:
        model_actors = max(1, int(capacity.gpus // per_actor)) if per_actor else 1
    reserve = max(1, int(capacity.cpus) // CPUS_PER_RESERVED_CPU)
    free = capacity.cpus - small_stages * reserve - model_actors * MODEL_ACTOR_CPUS
    return Pools(small_tasks=int(reserve / SMALL_TASK_CPUS), decoders=max(1, math.floor(free / decode_cpus)),
                 model_actors=model_actors, gpus_per_model_actor=per_actor if model_actors else 0.0)


def _answers(node: dict) -> bool:
    try:
        with socket.create_connection((node["NodeManagerAddress"], node["NodeManagerPort"]), PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False
