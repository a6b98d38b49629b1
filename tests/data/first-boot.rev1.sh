#!/bin/sh
# golden first-boot hook: says whose first boot it is
echo first boot of $RACKBOOT_HOSTNAME
