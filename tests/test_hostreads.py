"""The host-read counter (``mlipd.testing.HostReads``) names every op that would make a
CUDA stream wait for the host, and nothing else."""

from __future__ import annotations

import torch

from mlipd.testing import HostReads


def test_each_data_dependent_read_is_named_and_counted():
    t = torch.arange(6.0)
    mask = t > 2
    with HostReads() as reads:
        torch.nonzero(mask)
        torch.where(mask)  # one argument: nonzero
        t[mask]
        u = t.clone()
        u[mask] = 0.0
        t.masked_select(mask)
        torch.unique(t)
        torch.repeat_interleave(torch.tensor([1, 2]))
        int(t.sum())
        bool(mask.any())
        t.tolist()
        torch.bincount(torch.tensor([0, 2]))
        torch.nn.functional.one_hot(torch.tensor([0, 2]))  # its width is max + 1
    assert reads.counts == {"nonzero": 2, "index[bool mask]": 1, "index_put[bool mask]": 1,
                            "masked_select": 1, "unique": 1, "item": 4, "tolist": 1,
                            "repeat_interleave without output_size": 1, "bincount": 1,
                            }, reads.report()
    assert all(site.startswith("tests/test_hostreads.py") or "hostreads" in site
               or site == "?" for sites in reads.where.values() for site in sites)


def test_fixed_shape_ops_are_not_reads():
    t = torch.arange(6.0, requires_grad=True)
    idx = torch.tensor([0, 3, 5])
    mask = t.detach() > 2
    with HostReads() as reads:
        y = t[idx] * 2.0
        z = torch.where(mask, t, torch.zeros_like(t))  # three arguments: no read
        w = torch.zeros(4).index_add(0, torch.tensor([0, 1, 1]), t[:3])
        r = torch.repeat_interleave(t, torch.tensor([1, 1, 2, 1, 1, 1]), output_size=7)
        (y.sum() + z.sum() + w.sum() + r.sum()).backward()
        torch.nonzero_static(mask, size=6)
        torch.nn.functional.one_hot(idx, 6)  # range checked on the device on CUDA
    assert reads.total == 0, reads.report()
