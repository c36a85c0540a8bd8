"""CLI command modules. Each module has ``register(app)`` and owns its commands.

Heavy imports (torch, ultralytics, prefect, mlflow) happen inside command bodies, after
``damage.flows.common.setup`` has pointed every library at the state directory.
"""

COMMAND_MODULES = [
    "damage.flows.commands.pipeline",  # run, train
    "damage.flows.commands.data",  # data synth, data import
    "damage.flows.commands.validate",  # validate (data gate)
    "damage.flows.commands.evaluate",  # evaluate, sweep
    "damage.flows.commands.export",  # export, predict
    "damage.flows.commands.compress",  # distill, prune, quantize, compress
    "damage.flows.commands.registry",  # registry list/approve/reject/rollback/history
    "damage.flows.commands.explain",  # explain
    "damage.flows.commands.schedule",  # schedule (serve / register the Prefect deployments)
    "damage.flows.commands.serve",  # serve (MLflow scoring server), ui (MLflow + Prefect UIs)
    "damage.flows.commands.scale",  # tune (recipe search on Ray Tune)
]
