"""A float64 reference of the projected-Adam update, written from the papers' equations
(GaLore Alg. 1, LDAdam/SubTrack++'s moment transport, Fira's recovery scaling and limiter),
independently of slimopt's code: both orientations spelled out, loops where the papers sum.

It takes the sequence of bases from the caller (the random draws are tested separately, by their
defining properties) and checks everything else.
"""
from __future__ import annotations

import math

import torch


def reference_transport(M, V, C):
    """Element by element: M'_ij = sum_k C_ik M_kj; V'_ij = |sum_k C_ik^2 (V_kj - M_kj^2) + M'_ij^2|."""
    r, k = M.shape
    M2 = torch.zeros_like(M)
    V2 = torch.zeros_like(V)
    for i in range(r):
        for j in range(k):
            M2[i, j] = sum(C[i, q] * M[q, j] for q in range(r))
            V2[i, j] = abs(sum(C[i, q] ** 2 * (V[q, j] - M[q, j] ** 2) for q in range(r))
                           + M2[i, j] ** 2)
    return M2, V2


def reference_run(W0, grad_fn, bases, steps, *, lr, betas, eps, weight_decay, scale,
                  update_interval, transport, recovery, residual="orthogonal", limiter=1.01):
    """Run ``steps`` updates of W0 (m x n) with gradient ``grad_fn(W)`` and ``bases[t]``, the basis
    used at step t (m x r when m <= n, else n x r). Returns the final W (float64)."""
    b1, b2 = betas
    W = W0.detach().clone().double()
    m, n = W.shape
    left = m <= n
    M = V = S_prev = None
    prev_norm = None
    for t in range(steps):
        G = grad_fn(W).double()
        S = bases[t].double()
        r = S.shape[1]
        if M is None:
            M = torch.zeros(r, n if left else m, dtype=torch.float64)
            V = torch.zeros_like(M)
        if t > 0 and t % update_interval == 0 and transport:
            M, V = reference_transport(M, V, S.T @ S_prev)
        # moments live as r x k in both orientations here (k = the non-projected side)
        R = (S.T @ G) if left else (G @ S).T
        M = b1 * M + (1 - b1) * R
        V = b2 * V + (1 - b2) * R * R
        step = t + 1
        N = (M / (1 - b1 ** step)) / ((V / (1 - b2 ** step)).sqrt() + eps)
        low_rank = S @ N if left else (S @ N).T
        update = scale * low_rank
        if recovery:
            proj = S @ R if left else (S @ R).T
            res = G - (1.0 if residual == "orthogonal" else scale) * proj
            lam = torch.zeros_like(G)
            for j in range(R.shape[1]):
                phi = N[:, j].norm() / (R[:, j].norm() + 1e-8)
                if left:
                    lam[:, j] = phi * res[:, j]
                else:
                    lam[j, :] = phi * res[j, :]
            norm = lam.norm().item()
            if prev_norm is not None and prev_norm > 0 and norm > limiter * prev_norm:
                lam = lam * (limiter * prev_norm / norm)
            prev_norm = lam.norm().item()
            update = update + lam
        W = W * (1 - lr * weight_decay) - lr * update
        S_prev = S
    return W


def principal_angles(A, B):
    s = torch.linalg.svdvals(A.double().T @ B.double()).clamp(-1.0, 1.0)
    return torch.arccos(s)


def geodesic_distance(A, B):
    return math.sqrt(float((principal_angles(A, B) ** 2).sum()))
