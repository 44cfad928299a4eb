"""Connecting a job to Ray: the cluster in RAY_ADDRESS, or a fresh local one.

`ray.init()` with no address silently attaches to whatever `ray start` cluster it finds on the
machine; a job run on a laptop must instead start its own (the embedded default), so the address
is always spelled out. Under `ray job submit` RAY_ADDRESS is set by Ray itself.
"""

from __future__ import annotations

import os


def ensure_ray(num_cpus: int | None = None, *, min_cpus: int = 0):
    """Connect to RAY_ADDRESS if set, otherwise start a local Ray bound to loopback.

    Unless `num_cpus` says exactly, the local Ray gets the machine's cores but never fewer than 4
    logical CPUs, nor fewer than `min_cpus` (what a job's stages hold at once): every job is a
    pipeline of stages that each hold a CPU (read tasks, decode actors, model actors or Ray Train
    workers), and with fewer CPUs than stages the last stage never gets one and the job waits.
    """
    import ray

    if ray.is_initialized():
        return ray
    address = os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address, configure_logging=False)
    else:
        ray.init(
            address="local",
            num_cpus=num_cpus or max(4, min_cpus, os.cpu_count() or 1),
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            configure_logging=False,
        )
    return ray
