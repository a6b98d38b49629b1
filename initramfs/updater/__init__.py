"""The worker-side updater: stdlib-only, runs on the target's python3.11-minimal.

On the worker it is the top-level package ``updater`` (PYTHONPATH=/usr/lib/rackboot);
on the host it is ``rackboot.initramfs.updater``. Imports inside stay relative.
"""
