"""Attention that writes and reads K/V through block tables (implements model's AttentionContext).

The tokens of one engine stage are flattened into one row (1, N, d), so every projection and MLP
is a single matmul. Attention then splits them into *groups* (the tokens one sequence brings to
this stage): single-token decode groups come first and run as one batched, masked SDPA; prefill
chunks run one SDPA each. K/V rows are gathered with one index per layer from the pool.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from parcae_serve.model.parcae import sdpa
from parcae_serve.server.engine.kv_cache import BlockTable, KVCache, copy_rows


@dataclass
class AttentionGroup:
    table: BlockTable
    positions: Tensor  # (n,) ascending token positions, CPU long
    slot: int = 0  # recurrent loop slot (ignored by prelude / coda layers)


class PagedAttention:
    def __init__(
        self, cache: KVCache, groups: list[AttentionGroup], recurrent: bool, n_prelude: int
    ) -> None:
        self.cache, self.recurrent, self.n_prelude = cache, recurrent, n_prelude
        device = cache.outer_k.device
        rows = [self._rows(g) for g in groups]
        positions = [g.positions.tolist() for g in groups]
        write: list[int] = []  # built from Python lists: one tensor, not one index op per group
        for g, pos in zip(groups, positions, strict=True):
            table_rows = g.table.rec_rows[g.slot] if recurrent else g.table.outer_rows
            write.extend(table_rows[p] for p in pos)
        self.write_rows = torch.tensor(write, device=device)
        n_dec = 0
        while n_dec < len(groups) and len(positions[n_dec]) == 1:
            n_dec += 1
        self.n_dec = n_dec
        if n_dec:
            lengths = torch.tensor([pos[0] + 1 for pos in positions[:n_dec]])
            # every row's index back to back, then one gather of (B, L) windows into it
            flat = torch.cat(rows[:n_dec])
            starts = torch.tensor([0, *[len(r) for r in rows[: n_dec - 1]]]).cumsum(0)
            keys = torch.arange(int(lengths.max()))
            window = (starts[:, None] + keys[None, :]).clamp_max(len(flat) - 1)
            self.dec_rows = flat[window].to(device)  # past a row's length: masked out below
            self.dec_mask = (keys[None, :] < lengths[:, None])[:, None, None, :].to(device)
        self.prefill = []
        offset = n_dec
        for r, g in zip(rows[n_dec:], groups[n_dec:], strict=True):
            n, length = len(g.positions), int(g.positions[-1]) + 1
            mask = torch.arange(length)[None, :] <= g.positions[:, None]
            self.prefill.append((offset, n, r[:length].to(device), mask.to(device)))
            offset += n

    def _rows(self, group: AttentionGroup) -> Tensor:
        if self.recurrent:
            return group.table.rec_index()[group.slot]
        return group.table.outer_index()

    def _pool(self, key: tuple) -> tuple[Tensor, Tensor]:
        part, i = key[0], key[1]
        if part == "core_block":
            return self.cache.rec_k[i], self.cache.rec_v[i]
        layer = i if part == "prelude" else self.n_prelude + i
        return self.cache.outer_k[layer], self.cache.outer_v[layer]

    def attend(self, key: tuple, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        pool_k, pool_v = self._pool(key)
        # 2-D views (row, heads*hd): index_copy_/index_select there are several times faster
        # than advanced indexing on the 3-D pool
        flat_k, flat_v = pool_k.flatten(1), pool_v.flatten(1)
        heads, hd = pool_k.shape[1:]
        # the pool may store K/V in another dtype (--kv-cache-dtype): written rounded to it,
        # read back in the model's
        new_k, new_v = (t[0].transpose(0, 1).reshape(-1, heads * hd) for t in (k, v))
        copy_rows(flat_k, self.write_rows, new_k)
        copy_rows(flat_v, self.write_rows, new_v)
        outs = []
        if self.n_dec:
            B, L = self.dec_rows.shape
            idx = self.dec_rows.view(-1)
            qd = q[0, :, : self.n_dec].transpose(0, 1).unsqueeze(2)  # (B, H, 1, hd)
            kd = flat_k.index_select(0, idx).view(B, L, heads, hd).transpose(1, 2).to(q.dtype)
            vd = flat_v.index_select(0, idx).view(B, L, heads, hd).transpose(1, 2).to(q.dtype)
            od = sdpa(qd, kd, vd, mask=self.dec_mask)
            outs.append(od.squeeze(2).transpose(0, 1).unsqueeze(0))
        for offset, n, rows, mask in self.prefill:
            qp = q[:, :, offset : offset + n]
            kp = flat_k.index_select(0, rows).view(-1, heads, hd).transpose(0, 1)[None].to(q.dtype)
            vp = flat_v.index_select(0, rows).view(-1, heads, hd).transpose(0, 1)[None].to(q.dtype)
            outs.append(sdpa(qp, kp, vp, mask=mask))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
