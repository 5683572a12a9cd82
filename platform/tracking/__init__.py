"""advflow's MLflow side: runs, metrics, the registry.

Importing the package sets up the MLflow credentials named by ADVFLOW_MLFLOW_CREDENTIALS_FILE
(``credentials.ensure_mlflow_credentials``): every advflow module that talks to MLflow is in this
package or imports from it, so this is the one place that runs before the first request in a Ray
job's driver, its Train workers and its trials, none of which run in the user's shell.
"""

from advflow.platform.tracking.credentials import CredentialsError, ensure_mlflow_credentials

try:
    ensure_mlflow_credentials()
except CredentialsError as _err:  # importing must not fail; MLflow then answers 401, and this says why
    from advflow.platform.log import get_logger

    get_logger(__name__).warning("%s", _err)
