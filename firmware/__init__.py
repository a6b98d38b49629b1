"""rackboot.firmware"""
