"""Hypothesis settings shared by the fuzz suite (``test_fuzz_*``).

Two profiles:

* ``pyvmm-ci`` (the default): 50 examples per property, derandomized so that a CI
  run is reproducible and cannot fail by chance on a case an earlier run never
  tried; no deadline (the loaders' first call imports modules and maps RAM);
* ``pyvmm-long``, chosen with ``PYVMM_FUZZ=long``: 2,000 examples per property
  (``PYVMM_FUZZ_EXAMPLES=N`` sets another count), random seeds.

Hypothesis keeps an example database and caches under ``.hypothesis`` in the
working directory; here the database is off and its home directory is a
temporary one, so running the suite leaves nothing in the tree.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

from hypothesis import HealthCheck, settings
from hypothesis.configuration import set_hypothesis_home_dir

_HOME = tempfile.mkdtemp(prefix="pyvmm-hypothesis-")
atexit.register(shutil.rmtree, _HOME, ignore_errors=True)
set_hypothesis_home_dir(_HOME)

#: Examples per property in the long campaign.
LONG_EXAMPLES = int(os.environ.get("PYVMM_FUZZ_EXAMPLES", "2000"))

_COMMON = {
    "deadline": None,
    "database": None,
    # Images are built from seeds and mutated: large inputs and slow first calls are expected.
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
    "print_blob": True,
}

settings.register_profile("pyvmm-ci", max_examples=50, derandomize=True, **_COMMON)  # type: ignore[arg-type]
settings.register_profile("pyvmm-long", max_examples=LONG_EXAMPLES, **_COMMON)  # type: ignore[arg-type]

PROFILE = "pyvmm-long" if os.environ.get("PYVMM_FUZZ", "").lower() == "long" else "pyvmm-ci"
settings.load_profile(PROFILE)
