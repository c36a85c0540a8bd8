"""MLflow models-from-code entry point of the pyfunc (``tasks.serving.pyfunc.save_pyfunc``).

MLflow executes this file when it loads the model (``mlflow.pyfunc.load_model``,
``mlflow models serve``), after putting the shipped ``tasks`` package on ``sys.path``: the model
is defined by code, not a pickled object, so loading does not depend on cloudpickle or on the
Python that saved it, and registration logs no pickling warning.
"""

import mlflow

from tasks.serving.pyfunc import DamageSegModel

mlflow.models.set_model(DamageSegModel())
