"""Collectives costed by topology: NVLink in a node, one NIC per device between nodes, the ring
NCCL runs (one per NIC) or its tree for all-reduce, and overlap of the 'data' collectives."""
import pytest

from passes.cost_model import collective_time, estimate_step_time, on_data_axis, topology
from passes.hardware import HardwareProfile, get_profile
from passes.hlo_stats import Collective, HloStats, Kernel
from passes.plan import Plan

GIB = 2**30
# Round figures: 8 per node, links 400 GB/s, NICs 50 GB/s, no efficiencies.
NODE8 = HardwareProfile(name="node8", memory_bytes=80 * 10**9, peak_flops={"f32": 1e12, "bf16": 1e15},
                        memory_bandwidth=2e12, link_bandwidth=400e9, link_latency=0.0, devices_per_node=8,
                        inter_node_bandwidth=50e9)


def test_topology_counts_members_per_node_and_nodes():
  assert topology(Collective("all-gather", 1, 16), 8) == (8, 2)
  assert topology(Collective("all-gather", 1, 4), 8) == (4, 1)
  assert topology(Collective("all-gather", 1, 8, groups=((0, 8, 16, 24, 32, 40, 48, 56),)), 8) == (1, 8)
  assert topology(Collective("all-gather", 1, 4, groups=((0, 1, 8, 9),)), 8) == (2, 2)


def test_ring_over_two_nodes_of_8_pays_the_nic_on_one_hop_in_8():
  b = GIB
  one_node = collective_time(Collective("all-gather", b, 8), NODE8)
  two_nodes = collective_time(Collective("all-gather", b, 16), NODE8)
  assert one_node == pytest.approx(7 / 8 * b / 400e9)
  # 8 rings, one per NIC: each device sends 1/8 of its traffic over its 50 GB/s NIC (the
  # bound: 1/(8 x 50e9) > 7/(8 x 400e9)), not all of it.
  assert two_nodes == pytest.approx(15 / 16 * b / (8 * 50e9))
  assert one_node < two_nodes < 1.25 * one_node
  # Charging the whole group at one NIC, the old model, would be 8x this.
  assert 15 / 16 * b / 50e9 > 7 * two_nodes


def test_ring_with_one_device_per_node_runs_on_the_nics_alone():
  c = Collective("all-gather", GIB, 8, groups=(tuple(range(0, 64, 8)),))
  assert collective_time(c, NODE8) == pytest.approx(7 / 8 * GIB / 50e9)
  rs = Collective("reduce-scatter", GIB // 8, 8, groups=(tuple(range(0, 64, 8)),))
  assert collective_time(rs, NODE8) == pytest.approx(7 / 8 * GIB / 50e9)


def test_all_reduce_across_nodes_takes_the_faster_of_ring_and_tree():
  b = GIB
  # the tree's phases (NVLink in the node, each device's 1/8 share over its NIC) are pipelined
  tree = lambda nic: max(2 * 7 / 8 * b / 400e9, 2 * (1 / 2) * (b / 8) / nic)
  ring = lambda nic: 2 * 15 / 16 * b / (8 * nic)
  for nic in (50e9, 12.5e9):
    hw = HardwareProfile(**dict(NODE8.__dict__, inter_node_bandwidth=nic))
    assert collective_time(Collective("all-reduce", b, 16), hw) == pytest.approx(min(tree(nic), ring(nic)))
  assert tree(12.5e9) < ring(12.5e9) and tree(50e9) < ring(50e9)
  # 8 nodes with NICs as fast as NVLink: the ring (NVLink-bound, 7/8 of its traffic in the node)
  # beats the tree, whose in-node phase alone is 2 x 7/8 of B
  fast_nics = HardwareProfile(**dict(NODE8.__dict__, inter_node_bandwidth=400e9))
  ar64 = collective_time(Collective("all-reduce", b, 64), fast_nics)
  assert ar64 == pytest.approx(2 * 63 / 64 * b * 7 / (8 * 400e9))


def test_all_reduce_reproduces_the_nccl_tests_figure_it_cites():
  # nccl-tests all_reduce_perf, 2 GiB over 2 p4de nodes of 8 A100 (4 x 100 Gb/s per node:
  # 6.25 GB/s per GPU): 51.4 ms (aws-samples/awsome-distributed-training, cited in hardware.py)
  p4de = get_profile("a100", inter_node_bandwidth=6.25e9)
  assert collective_time(Collective("all-reduce", 2 * GIB, 16), p4de) == pytest.approx(51.4e-3, rel=0.03)


def test_reduce_scatter_costs_half_an_all_reduce():
  n, shard = 64, GIB // 64
  rs = collective_time(Collective("reduce-scatter", shard, n), NODE8)
  ar = collective_time(Collective("all-reduce", GIB, n), NODE8)
  assert rs == pytest.approx(63 / 64 * GIB / (8 * 50e9)) and ar >= 1.7 * rs


def test_latency_and_efficiencies():
  hw = get_profile("h100")
  assert hw.matmul_rate("bf16") == pytest.approx(989.4e12 * 0.803)
  tiny = Collective("all-gather", 8, 16)
  # 15 steps, 2 of 16 hops cross nodes: the network's latency there, NVLink's elsewhere
  assert collective_time(tiny, hw) == pytest.approx(15 * (14 / 16 * 2.8e-6 + 2 / 16 * 15e-6), rel=1e-3)
  big = Collective("all-gather", GIB, 8)
  assert collective_time(big, hw) == pytest.approx(7 / 8 * GIB / (450e9 * 0.82) + 7 * 2.8e-6)


def test_on_data_axis_reads_the_mesh_coordinates():
  plan = Plan(dp=4, tp=2)
  data = Collective("reduce-scatter", 1, 4, groups=((0, 2, 4, 6), (1, 3, 5, 7)))
  tensor = Collective("all-reduce", 1, 2, groups=((0, 1), (2, 3), (4, 5), (6, 7)))
  assert on_data_axis(data, plan) and not on_data_axis(tensor, plan)
  assert not on_data_axis(Collective("all-reduce", 1, 4, groups=((0, 1, 2, 3), (4, 5, 6, 7))), plan)
  assert on_data_axis(Collective("all-gather", 1, 4), plan)


def test_data_collectives_hide_under_compute_tensor_ones_do_not():
  hw = HardwareProfile(**dict(NODE8.__dict__, overlaps_collectives=True))
  plan = Plan(dp=4, tp=2, bf16=True)
  # a gather per layer of 4 layers: the first one has nothing to hide under
  gather = Collective("all-gather", 10**9, 4, count=4, groups=((0, 2, 4, 6), (1, 3, 5, 7)))
  tp_ar = Collective("all-reduce", 10**9, 2, count=1, groups=((0, 1), (2, 3), (4, 5), (6, 7)))
  t_g, t_ar = collective_time(gather, hw), collective_time(tp_ar, hw)
  compute = HloStats(flops=10**13, kernels=(Kernel(10**13, 0, 1),))  # 10 ms at 1e15
  stats = HloStats(flops=10**13, collectives=(gather, tp_ar), kernels=compute.kernels)
  est = estimate_step_time(stats, plan, hw)
  assert 4 * t_g < 0.01 and est.hidden_s == pytest.approx(3 * t_g)
  assert est.total_s == pytest.approx(0.01 + t_g + t_ar)
  # more data traffic than compute: only the excess shows
  slow = HloStats(flops=10**12, collectives=(gather,), kernels=(Kernel(10**12, 0, 1),))
  assert estimate_step_time(slow, plan, hw).total_s == pytest.approx(max(1e-3, 3 * t_g) + t_g)
  # a profile without overlap (XLA:CPU) charges everything
  assert estimate_step_time(stats, plan, NODE8).total_s == pytest.approx(0.01 + 4 * t_g + t_ar)


def test_flash_attention_replaces_the_chunked_kernels():
  att = (Kernel(4 * 10**12, 10**11, 1),)  # the chunked path: every block computed, scores through memory
  other = (Kernel(10**13, 0, 1),)
  stats = HloStats(flops=14 * 10**12, kernels=other + att, attention=att, attention_causal=True)
  plan = Plan(bf16=True)
  flash = HardwareProfile(**dict(NODE8.__dict__, flash_attention=True, attention_efficiency=0.5))
  plain = estimate_step_time(stats, plan, NODE8)
  assert plain.compute_s == pytest.approx(0.01 + max(4e-3, 1e11 / 2e12))
  # half the FLOPs (causal) at half the peak, no traffic
  assert estimate_step_time(stats, plan, flash).compute_s == pytest.approx(0.01 + 2e12 / 0.5e15)
  full = HloStats(flops=14 * 10**12, kernels=other + att, attention=att, attention_causal=False)
  assert estimate_step_time(full, plan, flash).compute_s == pytest.approx(0.01 + 4e12 / 0.5e15)
