"""Test setup: 8 fake CPU devices, set before anything imports jax."""

import os

os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Subprocess runs of experiments/train.py keep out of the home directory's compile cache.
os.environ.setdefault("JAXREC_COMPILE_CACHE", "")
