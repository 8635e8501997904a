"""fedmf clients: federated data (flwr-datasets), models, local training and the Flower
``ClientApp`` (``clients.client_app:app``).

Server-side entry points live in :mod:`clients.task`: ``get_model(run_config)``,
``get_initial_arrays(run_config)`` and ``central_evaluate_fn(run_config)``.
"""
