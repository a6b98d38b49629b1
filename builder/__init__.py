"""rackboot: boot artefacts, images and the master for racks of Pi-class workers."""

__version__ = "0.1.0"
