"""Error-compensating rounding on a fixed grid (GPTQ: Frantar et al. 2022, "OBQ with lazy batch updates").

Round-to-nearest rounds every weight on its own. GPTQ rounds the input columns of W [out, in] one at a
time, in natural order, and after each column moves the not-yet-rounded columns so that the layer's
output error over the calibration inputs, trace(dW H dW^T) with H = X^T X, stays least: column j's
rounding error e_j is spread onto the later columns along row j of the upper Cholesky factor U of H^-1
(W[:, j+1:] -= e_j / U[j, j] * U[j, j+1:]). Updates within a block of columns are made at once per
column, and the block's accumulated errors reach the later columns in one matmul (the lazy batch).

Afterwards `refit_scales` re-solves each group's scale for the codes chosen (the same objective, now
linear in the scales: one small least-squares system per row).

The grid is fixed beforehand, per (row, group), as round-to-nearest would choose it (AWQ's scale folding
and clip search decide it): static groups. So the columns may be rounded in any order -- act-order, by
decreasing H diagonal, is the default of the AWQ search -- and the codes, scales and zeros are still the
AutoAWQ GEMM format's (each column on its natural group's grid; no g_idx).
"""

from __future__ import annotations

import torch

from ..errors import TinychatError

DAMP = 0.01        # H + DAMP * mean(diag H) * I, as GPTQ: keeps the Cholesky factorisation well posed
BLOCK_COLUMNS = 128


def inverse_cholesky(gram: torch.Tensor, damp: float = DAMP) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, dead): U upper triangular with U^T U = (H + damp * mean(diag H) I)^-1, in fp64, and the input
    channels that never fired (diag H == 0; their weights do not matter and are rounded as they are)."""
    h = gram.double().clone()
    diag = h.diagonal()
    dead = diag == 0
    diag[dead] = 1.0
    diag.add_(damp * float(diag.mean()))
    try:
        lower = torch.linalg.cholesky(h)
        # H^-1 = L^-T L^-1 (torch.cholesky_inverse is the same maths, and 30x slower with MKL on a CPU).
        linv = torch.linalg.solve_triangular(lower, torch.eye(len(h), dtype=h.dtype, device=h.device), upper=False)
        return torch.linalg.cholesky(linv.t() @ linv, upper=True), dead
    except torch.linalg.LinAlgError:
        raise TinychatError("GPTQ: the calibration inputs' Gram matrix is not positive definite even after "
                            "dampening; use --rounding rtn or more calibration text") from None


def gptq_round(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, gram: torch.Tensor, bits: int,
               group_size: int, damp: float = DAMP, block: int = BLOCK_COLUMNS,
               dtype: torch.dtype = torch.float32, act_order: bool = False) -> torch.Tensor:
    """Codes uint8 [out, in] for w [out, in] on the grid (scales, zeros [out, in/g]; W ~= (q - z) * s),
    minimising trace(dW H dW^T) column by column for H = gram [in, in].

    act_order: round the columns in order of decreasing H diagonal (the inputs with the most energy
    first, while the most columns are left to absorb their error). The grid stays the natural groups'
    (static groups), so the codes fit the same format."""
    rows, cols = w.shape
    if cols % group_size or tuple(scales.shape) != (rows, cols // group_size) or scales.shape != zeros.shape:
        raise TinychatError(f"GPTQ: grid {tuple(scales.shape)} does not fit weight {tuple(w.shape)} "
                            f"with group size {group_size}")
    maxq = float((1 << bits) - 1)
    order = torch.argsort(gram.diagonal(), descending=True, stable=True) if act_order else None
    if order is not None:
        gram = gram[order][:, order]
    u, dead = inverse_cholesky(gram, damp)
    u = u.to(dtype)
    # Transposed ([in, out]): a column is a contiguous row, and the per-column update touches contiguous
    # memory (on a strided view torch's addr_ is a hundred times slower). The grid per column.
    work = w.t().to(dtype)
    s = scales.t().to(dtype).repeat_interleave(group_size, dim=0)
    z = zeros.t().to(dtype).repeat_interleave(group_size, dim=0)
    if order is not None:
        work, s, z = work[order], s[order], z[order]
    work, s, z = work.contiguous(), s.contiguous(), z.contiguous()
    work[dead] = 0
    codes = torch.empty(cols, rows, dtype=torch.uint8, device=w.device)
    _round_columns(work, codes, u, s, z, maxq, block)
    if order is not None:
        codes = codes[torch.argsort(order)]
    return codes.t().contiguous()


class _one_thread:
    """One CPU thread for the per-column steps: their ops are a few thousand elements each, and a second
    thread mostly waits at barriers -- 15x slower than one thread when the cores have other work."""

    def __init__(self, device: torch.device):
        self.cpu = device.type == "cpu"

    def __enter__(self):
        if self.cpu:
            self.threads = torch.get_num_threads()
            torch.set_num_threads(1)

    def __exit__(self, *exc):
        if self.cpu:
            torch.set_num_threads(self.threads)


def _round_columns(work, codes, u, s, z, maxq: float, block: int) -> None:
    """GPTQ's loop over work [in, out] (transposed weights) with the grid s, z [in, out], in place."""
    cols, rows = work.shape
    dtype = work.dtype
    for lo in range(0, cols, block):
        hi = min(lo + block, cols)
        chunk = work[lo:hi]  # contiguous rows: updated in place
        err = torch.empty(hi - lo, rows, dtype=dtype, device=work.device)
        with _one_thread(work.device):
            for i in range(hi - lo):
                j = lo + i
                col = chunk[i]
                q = torch.round(col / s[j]).add_(z[j]).clamp_(0, maxq)
                codes[j] = q.to(torch.uint8)
                e = (col - (q - z[j]) * s[j]) / u[j, j]
                err[i] = e
                chunk[i:].addr_(u[lo + i, lo + i:hi], e, alpha=-1)
        if hi < cols:
            work[hi:].addmm_(u[lo:hi, hi:].t(), err, alpha=-1)


def output_error(w: torch.Tensor, wq: torch.Tensor, gram: torch.Tensor) -> float:
    """trace(dW H dW^T): the squared output error of the linear over the inputs H = X^T X sums."""
    d = (w - wq).double()
    return float(((d @ gram.double()) * d).sum())


def refit_scales(w: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 gram: torch.Tensor, group_size: int, chunk_elements: int = 1 << 26) -> torch.Tensor:
    """Scales [out, in/g] re-solved for the codes GPTQ chose: What = (q - z) * s is linear in each row's
    scales, so with codes and zeros fixed the output error trace((W - What) H (W - What)^T) -- GPTQ's own
    objective -- is least at the solution of one [in/g, in/g] system per row. GPTQ fixed the grid before
    rounding; this moves it to where the rounded codes are best used. A row keeps its old scales where the
    solution is not positive or not better."""
    out_f, in_f = w.shape
    ng = in_f // group_size
    h = gram.float()
    new = scales.float().clone()
    rows = max(1, chunk_elements // (ng * in_f))  # bounds the [ng, rows, in] temporary
    for lo in range(0, out_f, rows):
        hi = min(out_f, lo + rows)
        wr, old = w[lo:hi].float(), scales[lo:hi].float()
        a = codes[lo:hi].float() - zeros[lo:hi].float().repeat_interleave(group_size, dim=1)  # What = a * s
        # M_r[g, k] = a_rg^T H_gk a_rk: per group g, Y_g = A_g H_g: ([rows, g] @ [g, in]), then summed by k
        y = torch.bmm(a.view(hi - lo, ng, group_size).transpose(0, 1), h.view(ng, group_size, in_f))
        m = (y * a).view(ng, hi - lo, ng, group_size).sum(-1).permute(1, 0, 2).double()  # [rows, ng, ng]
        rhs = (a * (wr @ h)).view(hi - lo, ng, group_size).sum(-1).double()
        # A tiny ridge towards the old scales keeps groups whose codes all equal the zero point solvable.
        ridge = 1e-6 * m.diagonal(dim1=1, dim2=2).mean(-1, keepdim=True).clamp(min=1e-30)
        m = m + ridge[:, :, None] * torch.eye(ng, dtype=torch.float64, device=w.device)
        sol = torch.linalg.solve(m, rhs + ridge * old.double()).float()
        sol = torch.where(torch.isfinite(sol) & (sol > 0), sol, old)

        def row_error(s: torch.Tensor) -> torch.Tensor:
            d = wr - a * s.repeat_interleave(group_size, dim=1)
            return ((d @ h) * d).sum(-1)
        better = row_error(sol) < row_error(old)
        new[lo:hi] = torch.where(better[:, None], sol, old)
    return new
