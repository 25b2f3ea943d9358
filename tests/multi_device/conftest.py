"""Settings of the multi-device suite (run by tests/multi_device_test.py)."""

import jax

jax.config.update('jax_default_matmul_precision', 'highest')
