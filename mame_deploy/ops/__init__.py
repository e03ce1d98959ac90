"""Operators the models call. The selective scan lives in ``selective_scan``."""

from .selective_scan import discretize, selective_scan, selective_scan_ref

__all__ = ["discretize", "selective_scan", "selective_scan_ref"]
