"""CLI command modules. Each module has ``register(app)`` and owns its commands.

Heavy imports (torch, ultralytics, prefect, mlflow) happen inside command bodies, after
``flows.common.setup`` has pointed every library at the state directory.
"""

COMMAND_MODULES = [
    "flows.commands.pipeline",  # run, train
    "flows.commands.data",  # data synth, data import
    "flows.commands.validate",  # validate (data gate)
    "flows.commands.evaluate",  # evaluate, sweep
    "flows.commands.export",  # export, predict
    "flows.commands.compress",  # distill, prune, quantize, compress
    "flows.commands.registry",  # registry list/approve/reject/rollback/history
    "flows.commands.explain",  # explain
    "flows.commands.schedule",  # schedule (serve / register the Prefect deployments)
    "flows.commands.serve",  # serve (MLflow scoring server), ui (MLflow + Prefect UIs)
    "flows.commands.scale",  # tune (recipe search on Ray Tune)
]
