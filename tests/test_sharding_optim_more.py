"""The other sparsejax.optim transformations under a device mesh.

Same checks as tests/test_sharding_optim.py (equal to one device,
shardings kept, no all-gather of a whole array), one layout per method.
"""

import pytest

from test_sharding_optim import check_sharded_training

CASES = [("one_shot", "tensor"), ("static", "fsdp"), ("set", "tensor"),
         ("ste", "fsdp"), ("mdgf", "tensor"), ("sdgf", "fsdp"),
         ("gradient_masking", "tensor")]


@pytest.mark.parametrize("method, mode", CASES)
def test_sharded_training_equals_single_device(method, mode):
  check_sharded_training(method, mode)
