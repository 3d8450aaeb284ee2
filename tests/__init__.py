"""The test suite. Set here, before anything loads torch's OpenMP runtime: xdist runs two
workers on a 2-core CI machine, and each worker's kernels on every core made their OpenMP teams
spin against each other (a calibration run took 106 s beside other tests, 32 s alone). Servers
the tests start inherit it too; a test or server that sets its own thread count still wins."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
