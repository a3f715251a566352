"""A float64 reference of the projected-Adam update, written from the papers' equations
(GaLore Alg. 1, LDAdam/SubTrack++'s moment transport, Fira's recovery scaling and limiter),
independently of slimopt's code: both orientations spelled out, loops where the papers sum.

It takes the sequence of bases from the caller (the random draws are tested separately, by their
defining properties) and checks everything else.
"""
from __future__ import annotations

import math

import torch


def reference_transport(M, V, C, bc1=1.0, bc2=1.0):
    """LDAdam's transport, element by element, on the bias-corrected moments
    ``Mh = M / bc1``, ``Vh = V / bc2``:

        Mh'_ij = sum_q C_iq Mh_qj
        Vh'_ij = | sum_q C_iq^2 (Vh_qj - Mh_qj^2) + Mh'_ij^2 |

    and back to raw EMAs: ``M' = bc1 Mh'``, ``V' = bc2 Vh'``."""
    r, k = M.shape
    M2 = torch.zeros_like(M)
    V2 = torch.zeros_like(V)
    for i in range(r):
        for j in range(k):
            mean = sum(C[i, q] * M[q, j] / bc1 for q in range(r))
            var = sum(C[i, q] ** 2 * (V[q, j] / bc2 - (M[q, j] / bc1) ** 2) for q in range(r))
            M2[i, j] = bc1 * mean
            V2[i, j] = bc2 * abs(var + mean ** 2)
    return M2, V2


def reference_run(W0, grad_fn, bases, steps, *, lr, betas, eps, weight_decay, scale,
                  update_interval, transport, recovery, residual="orthogonal", limiter=1.01):
    """Run ``steps`` updates of W0 (m x n) with gradient ``grad_fn(W)`` and ``bases[t]``, the basis
    used at step t (m x r when m < n, else n x r: a square matrix is projected on the right, as
    in galore-torch and Fira). Returns the final W (float64).

    Written in Fira's form: ``W <- (1 - lr wd) W - eta_t (scale S N + Lambda)`` with the bias
    correction folded into ``eta_t = lr sqrt(1 - b2^t) / (1 - b1^t)``, ``N`` the uncorrected Adam
    direction ``M / (sqrt(V) + eps sqrt(1 - b2^t))`` (AdamW's eps, on the corrected sqrt(v)),
    and the limiter on the uncorrected ``Lambda``: if ``||Lambda_t|| > zeta (||Lambda_{t-1}|| +
    1e-8)`` it is scaled down to that norm, which is kept for the next step."""
    b1, b2 = betas
    W = W0.detach().clone().double()
    m, n = W.shape
    left = m < n
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
            M, V = reference_transport(M, V, S.T @ S_prev, 1 - b1 ** t, 1 - b2 ** t)
        # moments live as r x k in both orientations here (k = the non-projected side)
        R = (S.T @ G) if left else (G @ S).T
        M = b1 * M + (1 - b1) * R
        V = b2 * V + (1 - b2) * R * R
        step = t + 1
        eta = lr * math.sqrt(1 - b2 ** step) / (1 - b1 ** step)
        N = M / (V.sqrt() + eps * math.sqrt(1 - b2 ** step))
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
            if prev_norm is not None and norm > limiter * (prev_norm + 1e-8):
                lam = lam * (limiter * (prev_norm + 1e-8) / norm)
            prev_norm = lam.norm().item()
            update = update + lam
        W = W * (1 - lr * weight_decay) - eta * update
        S_prev = S
    return W


def principal_angles(A, B):
    s = torch.linalg.svdvals(A.double().T @ B.double()).clamp(-1.0, 1.0)
    return torch.arccos(s)


def geodesic_distance(A, B):
    return math.sqrt(float((principal_angles(A, B) ** 2).sum()))
