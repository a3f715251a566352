"""Why GrassJump trails its siblings: the size of Fira's recovery term against the in-subspace
Adam step, for a random (GrassJump), a walking (GrassWalk) and an SVD (GaLore + recovery) basis.

A synthetic gradient with a decaying spectrum (sigma_i ~ 1/i, the tiny preset's MLP shape 128 x
352, rank 32, plus a little noise), 50 steps, basis changes every 10. A uniform random subspace
holds about r/d of an unstructured gradient's energy and little of a structured one's, so the
residual outside it (which the recovery term rescales by Adam's per-column factor) is most of the
gradient and the recovery term dominates the step.

    python benchmarks/recovery_share.py
"""
import torch

import slimopt
from slimopt.optimizers.core import subspace_adam


def measure(cls, options, base, rank):
    """``(ratios, captured)`` per step: ||Lambda|| / ||scale S N|| and the share of the gradient's
    energy inside the basis."""
    ratios, captured = [], []
    original = subspace_adam.recovery_term

    def spy(grad, basis, projected, direction, previous, **kw):
        lam, norm = original(grad, basis, projected, direction, previous, **kw)
        ratios.append(float(lam.norm() / (kw["scale"] * (basis @ direction).norm())))
        return lam, norm
    subspace_adam.recovery_term = spy
    try:
        p = torch.nn.Parameter(torch.zeros(base.shape))
        opt = cls([("w", p)], lr=1e-3, rank=rank, update_interval=10, **options)
        g = torch.Generator().manual_seed(1)
        for _ in range(50):
            p.grad = base + 0.05 * torch.randn(base.shape, generator=g) / base.shape[0] ** 0.5
            opt.step()
            S = opt.current_basis(p)
            captured.append(float((S.T @ p.grad).norm() ** 2 / p.grad.norm() ** 2))
    finally:
        subspace_adam.recovery_term = original
    return ratios, captured


def main():
    torch.manual_seed(0)
    d, k, r = 128, 352, 32
    u, _ = torch.linalg.qr(torch.randn(d, d))
    v, _ = torch.linalg.qr(torch.randn(k, d))
    base = (u * (1.0 / torch.arange(1, d + 1))) @ v.T
    print("| basis | ||Lambda|| / ||scale S N|| at step 1 | mean | gradient energy inside S |")
    print("|---|---|---|---|")
    for cls, options in [(slimopt.GrassJump, {}), (slimopt.GrassWalk, {}),
                         (slimopt.GaLore, dict(recovery=True))]:
        ratios, captured = measure(cls, options, base, r)
        print(f"| {cls.__name__} | {ratios[0]:.2f} | {sum(ratios) / len(ratios):.2f} | "
              f"{sum(captured) / len(captured):.3f} |")


if __name__ == "__main__":
    main()
