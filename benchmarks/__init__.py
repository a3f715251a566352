"""slimopt's benchmarks: ``python -m benchmarks {memory,steptime,convergence,all} [--quick]``.

Each suite writes its raw numbers (JSON), a markdown table and a PNG plot under
``benchmarks/results/<device>/``, stamped with the command, the commit and the machine
(``benchmarks.report``). The older standalone scripts (``kernels.py``, ``finetune_lora.py``) run
on their own.
"""
