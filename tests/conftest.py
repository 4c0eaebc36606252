"""Fresh random inputs for every test and every run: each test seeds torch from a session seed (printed in
the header; set ATTN_KERNELS_SEED to replay a run) mixed with the test's id."""
import os
import random
import sys
import zlib

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # `import harness` (prefill_model, state_model, gate_fixtures) from the test modules

SESSION_SEED = int(os.environ.get("ATTN_KERNELS_SEED", random.SystemRandom().randrange(2**31)))


def pytest_report_header(config):
    import attn_kernels

    cuda = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    return [f"attn_kernels: seed {SESSION_SEED} (ATTN_KERNELS_SEED), CUDA device: {cuda}, "
            f"kernels built: {attn_kernels.kernels_available()}"]


@pytest.fixture(autouse=True)
def _seed(request):
    torch.manual_seed(SESSION_SEED ^ zlib.crc32(request.node.nodeid.encode()))
