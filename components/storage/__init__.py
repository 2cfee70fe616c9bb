"""Storage: S3 URIs and transfers (``components.storage.s3``) and the ``storage`` params shared by stages.

This module stays free of boto3 so that reading params does not import an AWS SDK.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DvcRemoteParams:
    """``storage.dvc_remote`` in params.yaml: the DVC remote ``python -m pipelines.dvc_remote`` configures."""

    name: str = "storage"
    url: str | None = None  # e.g. s3://bucket/dvc-cache; null: no remote configured

    def validate(self) -> None:
        if not self.name or not self.name.strip():
            raise ValueError("name: must not be empty")
