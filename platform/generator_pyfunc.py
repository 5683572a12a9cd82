"""Legacy MLflow loader module of registered generators; the code is `tracking.model_format`.

Model versions registered by the previous release record `loader_module:
advflow.platform.generator_pyfunc` in their MLmodel file, and MLflow imports that name to load
them (`mlflow.pyfunc.load_model`, `mlflow models serve`). This shim keeps those versions loadable;
new versions record `advflow.platform.tracking.model_format`. Keep it as long as such versions are
served; it re-exports the loader hook only.
"""

from advflow.platform.tracking.model_format import _load_pyfunc

__all__ = ["_load_pyfunc"]
