"""SimCLR's NT-Xent by hand, and the global-batch gather (SimCLR and MoCo v3) with two gloo processes."""

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from helpers import fully_partitioned_zero3, read_metrics
from train.distributed import all_gather_with_grad, free_port
from train.engine import train
from train.methods import build_method
from train.methods.moco_v3 import moco_v3_loss
from train.methods.simclr import nt_xent_loss


def test_nt_xent_by_hand():
    # first views a, b; second views a', b' (unit vectors); temperature 1
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [-0.6, 0.8]])
    e = math.exp
    # anchor: -positive + log(sum over the three others) with the cosines written out
    expected = [
        -0.6 + math.log(e(0.0) + e(0.6) + e(-0.6)),  # a: b 0, a' .6, b' -.6
        -0.8 + math.log(e(0.0) + e(0.8) + e(0.8)),  # b: a 0, a' .8, b' .8
        -0.6 + math.log(e(0.6) + e(0.8) + e(0.28)),  # a': a .6, b .8, b' .28
        -0.8 + math.log(e(-0.6) + e(0.8) + e(0.28)),  # b': a -.6, b .8, a' .28
    ]
    assert nt_xent_loss(z, z, 1.0).item() == pytest.approx(sum(expected) / 4, rel=1e-6)
    # scale-free (cosine similarities) and the temperature divides them
    assert nt_xent_loss(3 * z, 3 * z, 1.0).item() == pytest.approx(sum(expected) / 4, rel=1e-6)
    at_half = nt_xent_loss(z, z, 0.5).item()
    assert at_half == pytest.approx((-1.2 + math.log(e(0.0) + e(1.2) + e(-1.2))
                                     - 1.6 + math.log(1 + 2 * e(1.6))
                                     - 1.2 + math.log(e(1.2) + e(1.6) + e(0.56))
                                     - 1.6 + math.log(e(-1.2) + e(1.6) + e(0.56))) / 4, rel=1e-6)


def test_moco_v3_loss_by_hand():
    q = torch.tensor([[2.0, 0.0], [0.0, 1.0]])  # normalised inside
    k = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    t = 0.5
    row0 = -2.0 + math.log(math.exp(2.0) + math.exp(1.2))  # cosines (1, .6) / .5, positive key 0
    row1 = -1.6 + math.log(math.exp(0.0) + math.exp(1.6))  # cosines (0, .8) / .5, positive key 1
    assert moco_v3_loss(q, k, t).item() == pytest.approx((row0 + row1) / 2 * 2 * t, rel=1e-6)
    # on rank 1 of 2 (one query each) the positive is the second key
    assert moco_v3_loss(q[1:], k, t, rank=1).item() == pytest.approx(row1 * 2 * t, rel=1e-6)


def _two_rank_worker(rank: int, world: int, port: int) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)  # same tensors on both ranks; each takes its share
        b, d = 3, 5
        views = torch.randn(world, 2, b, d)  # (rank, view, image, dim)
        keys = torch.randn(world, b, d)

        # SimCLR: the rank's 2B embeddings, negatives from both ranks, gradients across the gather
        z = views[rank].flatten(0, 1).clone().requires_grad_(True)
        loss = nt_xent_loss(z, all_gather_with_grad(z), 0.3, rank)
        loss.backward()
        # reference: one process, the whole batch (first views of all images, then all second views)
        full = torch.cat([views[:, 0].flatten(0, 1), views[:, 1].flatten(0, 1)]).requires_grad_(True)
        ref = nt_xent_loss(full, full, 0.3)
        ref.backward()
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        assert torch.allclose(mean_loss / world, ref.detach(), rtol=1e-5), (mean_loss / world, ref)
        # DeepSpeed averages gradients over ranks: grad / world must be the full-batch gradient of this rank's rows
        mine = torch.cat([full.grad[rank * b:(rank + 1) * b], full.grad[(world + rank) * b:(world + rank + 1) * b]])
        assert torch.allclose(z.grad / world, mine, rtol=1e-4, atol=1e-6), (z.grad / world - mine).abs().max()

        # MoCo v3: this rank's queries against the keys of the global batch
        q = views[rank, 0].clone().requires_grad_(True)
        loss = moco_v3_loss(q, all_gather_with_grad(keys[rank]), 0.2, rank)
        loss.backward()
        full_q = views[:, 0].flatten(0, 1).clone().requires_grad_(True)
        ref = moco_v3_loss(full_q, keys.flatten(0, 1), 0.2)
        ref.backward()
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        assert torch.allclose(mean_loss / world, ref.detach(), rtol=1e-5)
        assert torch.allclose(q.grad / world, full_q.grad[rank * b:(rank + 1) * b], rtol=1e-4, atol=1e-6)
    finally:
        dist.destroy_process_group()


def test_global_batch_losses_and_gradients_across_two_gloo_ranks():
    mp.spawn(_two_rank_worker, args=(2, free_port()), nprocs=2, join=True)


def test_single_process_gather_is_identity():
    x = torch.randn(4, 3)
    assert all_gather_with_grad(x) is x


@pytest.mark.e2e
def test_simclr_zero3_matches_zero1(make_cfg, tmp_path):
    zero1 = make_cfg("method.name=simclr", "train.steps=4", name="zero1")
    train(zero1, build_method)
    zero3 = make_cfg("method.name=simclr", "train.steps=4", f"train.deepspeed={fully_partitioned_zero3(tmp_path)}",
                     name="zero3")
    train(zero3, build_method)
    ref, rows = read_metrics(zero1.output_dir), read_metrics(zero3.output_dir)
    assert sorted(rows) == [1, 2, 3, 4]
    assert [rows[s]["train/loss"] for s in rows] == pytest.approx([ref[s]["train/loss"] for s in rows], rel=1e-4)
