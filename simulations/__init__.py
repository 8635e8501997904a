"""Simulations of fedmf on Flower: the ``ServerApp``, the Ray simulation runner, grids,
result files, plots and the ``fedmf simulate | compare | report`` commands.

Modules: :mod:`~simulations.server_app` (``app``), :mod:`~simulations.runner`,
:mod:`~simulations.compare`, :mod:`~simulations.results`, :mod:`~simulations.plots`,
:mod:`~simulations.cli`.  Importing the package is cheap (no Flower, torch or Ray).
"""
