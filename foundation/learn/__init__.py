"""Committees and active learning: ``CommitteeModel`` (K models, mean + uncertainty), calibration of the
uncertainty, and ``foundation learn`` (the DP-GEN-style loop in ``run``)."""
from .committee import CommitteeConfig, CommitteeModel

__all__ = ["CommitteeConfig", "CommitteeModel"]
