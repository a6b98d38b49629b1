#!/bin/sh
# rackboot-mark-good: the system rackboot booted says it works. Until it runs, its slot
# is on trial; after the plan's tries run out unconfirmed, rackboot boots the previous
# slot. Run it once the services that matter are up (a systemd unit, an rc script).
# It writes one sector the updater reads at the next boot; nothing else on the card.
set -eu
booted=${RACKBOOT_BOOTED:-/run/rackboot/booted}
if [ ! -r "$booted" ]; then
    echo "rackboot-mark-good: $booted is missing: this system was not booted by rackboot" >&2
    exit 1
fi
. "$booted"
printf 'rackboot-good %s %s\n' "$slot" "$sha256" |
    dd of="$disk" bs=512 seek=$((confirm_offset / 512)) conv=sync,notrunc,fsync 2>/dev/null
echo "rackboot-mark-good: slot $slot ($image v$version) confirmed"
