"""rackboot.qemu"""
