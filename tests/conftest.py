"""Test configuration: 8 simulated CPU devices, deterministic hypothesis, GPU/TPU markers."""

import os

# Must happen before jax is imported anywhere: the sharding tests need 8 CPU devices.
_flag = "--xla_force_host_platform_device_count=8"
if _flag not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()

import jax  # noqa: E402
import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

jax.config.update("jax_enable_x64", False)

settings.register_profile(
    "ci",
    deadline=None,
    derandomize=True,
    max_examples=25,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def _has_platform(name):
  try:
    return len(jax.devices(name)) > 0
  except RuntimeError:
    return False


def pytest_collection_modifyitems(config, items):
  del config
  has_gpu = _has_platform("gpu")
  has_tpu = _has_platform("tpu")
  for item in items:
    if "gpu" in item.keywords and not has_gpu:
      item.add_marker(pytest.mark.skip(reason="needs an NVIDIA GPU (run on the GPU machine)"))
    if "tpu" in item.keywords and not has_tpu:
      item.add_marker(pytest.mark.skip(reason="needs a TPU"))
