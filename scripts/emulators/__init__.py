"""Helper modules of the lane-level kernel emulators scripts/emulate_*.py (the simulated machines
and the kernels they run); the entry scripts import them from here. Nothing here is run by itself."""
