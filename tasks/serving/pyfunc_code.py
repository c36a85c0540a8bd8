"""MLflow models-from-code entry point of the pyfunc (``damage.tasks.serving.pyfunc.save_pyfunc``).

MLflow executes this file when it loads the model (``mlflow.pyfunc.load_model``,
``mlflow models serve``), from the model's folder, after putting the model's ``code/`` folder (the
shipped ``damage_serving`` package: ``damage.tasks.serving.pyfunc.shipped_files``) first on ``sys.path``: the model is
defined by code, not a pickled object, so loading does not depend on cloudpickle or on the Python
that saved it, and registration logs no pickling warning. MLflow also executes it once when
saving, from the repo, where no shipped package lies beside it: then the repo's ``tasks`` serves.
"""

import sys
from pathlib import Path

import mlflow

_SHIPPED = "damage_serving"  # damage.tasks.serving.pyfunc.SHIPPED_PACKAGE (not imported: this must run without tasks)

if (Path(__file__).parent / "code" / _SHIPPED).is_dir():
    # A model loaded earlier in this process brought its own copy: import this model's (MLflow has
    # just put its code folder first on sys.path).
    for _name in [m for m in sys.modules if m == _SHIPPED or m.startswith(_SHIPPED + ".")]:
        del sys.modules[_name]
    from damage_serving.serving.pyfunc_model import DamageSegModel
else:
    from damage.tasks.serving.pyfunc_model import DamageSegModel

mlflow.models.set_model(DamageSegModel())
