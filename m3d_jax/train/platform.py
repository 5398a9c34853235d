"""Device selection from a config, applied before JAX starts its backends (the training entry point and
the benchmarks share it)."""

from __future__ import annotations

import os


def select_platform(config) -> None:
    """`cpu_devices` > 0: simulate that many CPU devices (XLA reads the flag when the CPU backend starts);
    `platform`: restrict JAX to it (e.g. "cpu"). Call before any JAX computation."""
    if config.get("cpu_devices"):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={config.cpu_devices}").strip()
    if config.get("platform"):
        import jax

        jax.config.update("jax_platforms", config.platform)
