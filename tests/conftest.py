"""Shared fixtures, one module per area; each is re-exported here so every test can name them."""

from tests.minio import minio_bucket, minio_server
from tests.mlflow_server import mlflow_server
from tests.s3server import s3_bucket, s3_fault_proxy, s3_server

__all__ = ["minio_bucket", "minio_server", "mlflow_server", "s3_bucket", "s3_fault_proxy", "s3_server"]
