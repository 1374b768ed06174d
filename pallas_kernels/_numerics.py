"""Numerical comparison shared by the kernels' test helpers."""

from __future__ import annotations

import numpy as np


def relative_error(out, ref) -> float:
  """``||out - ref|| / ||ref||`` in float64 (``||out||`` when ``ref`` is all zeros); non-finite gives inf.

  >>> relative_error(np.array([1.0, 2.0]), np.array([1.0, 2.0]))
  0.0
  """
  out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
  if not np.isfinite(out).all():
    return float("inf")
  den = np.linalg.norm(ref)
  num = np.linalg.norm(out - ref)
  return float(num / den) if den > 0 else float(num)
