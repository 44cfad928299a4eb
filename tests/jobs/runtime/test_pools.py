"""The one pool sizer of infer, eval and the clip cache (`ray_jobs.runtime.pools`): what it counts
on a real Ray, and the sizes it gives. A node the GCS still lists after its loss is the multi-node
case, in tests/jobs/test_start_after_node_loss.py."""

from __future__ import annotations

import math

import pytest

from ray_jobs.runtime import pools
from ray_jobs.runtime.pools import Capacity, Pools, size_pools
from tests.cluster_harness import free_ports


def test_live_capacity_of_the_session_ray_is_its_one_node(ray_session):
    gpus = ray_session.cluster_resources().get("GPU", 0.0)
    assert pools.live_capacity() == Capacity(cpus=4.0, gpus=gpus, nodes=1, unanswered=0)


def test_a_node_answers_when_its_raylet_listens_and_not_when_nothing_does(ray_session):
    node = ray_session.nodes()[0]
    assert pools._answers(node)
    assert not pools._answers({**node, "NodeManagerPort": free_ports(1)[0]})


def test_sizes_follow_the_one_reserve_rule():
    # Infer on 4 CPUs without GPUs: one CPU model actor, one CPU of reserve for the read tasks
    # (four of a quarter CPU), two decode actors.
    assert size_pools(Capacity(4, 0, 1), small_stages=1, model_actors=None) == Pools(4, 2, 1, 0.0)
    # The cache fill on the same CPUs: reads and encodes reserve one CPU each.
    assert size_pools(Capacity(4, 0, 1), small_stages=2) == Pools(4, 2)
    # 64 CPUs and 8 GPUs: four CPUs of reserve (16 read tasks), a model actor per GPU.
    assert size_pools(Capacity(64, 8, 9), small_stages=1, model_actors=None) == Pools(16, 52, 8, 1.0)
    assert size_pools(Capacity(64, 8, 9), small_stages=1, model_actors=None, gpus_per_model_actor=0.5) == \
        Pools(16, 44, 16, 0.5)
    # Two-CPU decode actors: half as many.
    assert size_pools(Capacity(64, 0, 8), small_stages=2, decode_cpus=2.0) == Pools(16, 28)
    # The cluster: 6 CPUs counted by the GCS, 4 alive. Sized from the 4, the fill's two
    # decode actors leave two CPUs to its reads and encodes; sized from the 6 they took all four.
    assert size_pools(Capacity(4, 0, 2), small_stages=2).decoders == 2
    assert size_pools(Capacity(6, 0, 3), small_stages=2).decoders == 4


@pytest.mark.parametrize("small_stages, model_actors", [(1, 1), (1, 3), (2, 0)])
@pytest.mark.parametrize("decode_cpus", [0.5, 1.0, 2.0])
def test_the_actors_never_take_the_small_tasks_cpus(small_stages, model_actors, decode_cpus):
    # From the smallest cluster that holds one decode actor beside the rest, up.
    for cpus in range(small_stages + model_actors + math.ceil(decode_cpus), 300):
        sizes = size_pools(Capacity(cpus, 0, 1), small_stages=small_stages, model_actors=model_actors,
                           decode_cpus=decode_cpus)
        actors = sizes.decoders * decode_cpus + sizes.model_actors * pools.MODEL_ACTOR_CPUS
        small = small_stages * sizes.small_tasks * pools.SMALL_TASK_CPUS
        assert actors + small <= cpus, (cpus, sizes)
        assert cpus - actors - small < decode_cpus, (cpus, sizes)  # and the decoders take the rest
