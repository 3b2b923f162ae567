"""kubetune: Kubernetes-native fine-tuning and model compression.

The top-level package is the torch-free core shared by the operator and the runtimes:
API types (:mod:`kubetune.api`), the run plan (:mod:`kubetune.plan`), object storage
(:mod:`kubetune.storage`) and the command line (:mod:`kubetune.cli`).
"""

__version__ = "0.1.0"
