# The demo's signed post-install hook. The worker's updater runs it as root in the
# initramfs after the new slot verified and before it is committed; a non-zero exit
# leaves the slot uncommitted. A rack would check hardware or migrate data here.
set -eu
# s_magic of an ext4 superblock: 0x53 0xef at byte 1080 of the partition
magic=$(dd if="$RACKBOOT_SLOT_DEVICE" bs=2 skip=540 count=1 2>/dev/null | od -An -tx1 | tr -d ' \n')
if [ "$magic" != 53ef ]; then
    echo "$RACKBOOT_SLOT_DEVICE holds no ext4 filesystem (magic '$magic')" >&2
    exit 1
fi
echo "$RACKBOOT_IMAGE v$RACKBOOT_VERSION in slot $RACKBOOT_SLOT: ext4 superblock found on $RACKBOOT_SLOT_DEVICE"
