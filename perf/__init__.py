"""The perf suite (pytest-benchmark, see README.md here), its regression gate and its report.

A regular package: the test modules, the conftest and the scripts import each other as ``perf.<module>``
(``python -m pytest perf`` from the repository root imports them as such), and the scripts run as
``python -m perf.gate``, ``python -m perf.noise_study``, ``python -m perf.report``,
``python -m perf.machine``.

    machine.py   GPU identity: slug (baseline folder name), machine_info
    cost.py      the cost model: bytes, FLOPs, floor (3.0 TB/s, 700 TFLOP/s), extra_info, % of floor
    clock.py     the clock pytest-benchmark reads (--benchmark-timer): device time from CUDA events
    measure.py   timing one benchmark: spin kernel, eager rounds, CUDA-graph capture and replay, rotation
    slowdown.py  ATTN_KERNELS_PERF_SLOWDOWN, the deliberate slow-down that proves the gate
    impls.py     the implementation record (Impl) each test_perf_<op>.py lists, and bench() that times one
    gate.py, noise_study.py              the regression gate, the noise study
    runs.py      reading stored runs (baselines) for the report and the plots
    report.py    perf/REPORT.md and the README's generated blocks (python -m perf.report)
    figures.py   the plots in perf/plots/<gpu>/
    drift.py     the decode-state drift table: written by the drift test, rendered into the README
    training.py  the training check's loss curves (tests/test_based_training.py): data, plot, report section
"""
