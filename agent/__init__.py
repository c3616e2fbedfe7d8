"""gpu-router: route each job of a GPU workload to the GPU or the CPU before it runs.

The package is imported as ``gpu_router``; the folder is ``agent/`` (pyproject maps it).
Modules on the wrapper's hot path import nothing beyond os, sys, fcntl, marshal, time and _socket.
"""

__version__ = "0.1.0"
