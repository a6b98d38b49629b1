"""rackboot.uboot"""
