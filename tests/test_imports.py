"""``import slimopt`` needs only torch: numpy and scipy are used by the offline coefficient fitter
and the tests, never by the package at import time."""
import subprocess
import sys

HIDE = "import sys; sys.modules.update(numpy=None, scipy=None); "


def _python(code):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)


def test_import_slimopt_without_numpy_or_scipy():
    # torch itself warns that it cannot initialize NumPy; the import must still succeed
    proc = _python(HIDE + "import slimopt; slimopt.ROOT; print('ok')")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "ok"


def test_root_adaptive_coefficients_without_numpy_or_scipy():
    """ROOT's default ``coefficients="adaptive"`` reads the runtime table, not the fitter."""
    code = HIDE + ("import torch, slimopt\n"
                   "w = torch.nn.Parameter(torch.randn(64, 160))\n"
                   "opt = slimopt.ROOT([w], lr=0.01)\n"
                   "w.grad = torch.randn(64, 160)\n"
                   "opt.step()\n"
                   "assert torch.isfinite(w).all()\n"
                   "print('ok')")
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "ok"


def test_the_fitter_is_where_numpy_is_needed():
    proc = _python(HIDE + "import slimopt.kernels.fit_ns_coefficients")
    assert proc.returncode != 0
    assert "numpy" in proc.stderr

