"""rackboot.initramfs"""
