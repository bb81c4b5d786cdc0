"""The training harness: the ``cdat-fast`` command line and what it runs.

Apart from the library (tuners, curvature, estimators, ``nn``, ``sharding``,
kernels), which never imports it: models (:mod:`~cdat_fast.harness.models`),
data sets (:mod:`~cdat_fast.harness.data`), losses, the optimizer
configurations of the CLI (:mod:`~cdat_fast.harness.optimizers`), jitted
training runs (:mod:`~cdat_fast.harness.train`), checkpoints, plots and the
CLI itself (:mod:`~cdat_fast.harness.cli`). It imports matplotlib, orbax,
scikit-learn and tqdm where it needs them.
"""
