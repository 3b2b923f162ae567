"""kubetune: Kubernetes-native fine-tuning and model compression.

The top-level package is the torch-free core shared by the operator and the runtimes:
API types (:mod:`kubetune.api`), the run contract (:mod:`kubetune.run`), object storage
(:mod:`kubetune.storage`) and the command line (:mod:`kubetune.cli`).
"""

__version__ = "0.1.0"

# In a source checkout, operator/ and trainer/ sit beside this folder and are mapped to
# kubetune.operator / kubetune.trainer only by the installed package (see docs/architecture.md). When the
# repository root is on sys.path (``python -m pytest``, ``python -c`` from the root) this folder
# shadows the installed package, so extend the search path with the installed copy's location.
from pkgutil import extend_path

__path__ = extend_path(__path__, __name__)
