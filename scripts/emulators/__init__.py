"""Helper modules of the lane-level kernel emulators scripts/emulate_*.py: gpu.py, the simulated GPU
they all run on; per emulator, a machine module (its launches, buffers and reporting, built on gpu.py)
and the kernels it transcribes. Nothing here is run by itself."""
