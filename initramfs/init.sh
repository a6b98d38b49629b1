#!/bin/sh
# rackboot /init: the smallest shim that gets the updater running.
# Mount the kernel filesystems, load modules in the order the builder computed, bring
# up the network, then either report and power off (probe) or run the updater and
# switch_root into the slot it chose. Settings come from /etc/rackboot/init.conf.
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
/bin/busybox mkdir -p /proc /sys /dev /run /tmp /mnt /newroot /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
# /run is a tmpfs that moves into the new root, as dracut does: it carries
# /run/rackboot/booted to rackboot-mark-good in the booted system.
mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /run
mkdir -p /run/rackboot
. /etc/rackboot/init.conf
. /etc/rackboot/node.sh  # apply_node: hostname, machine-id, persisted paths, first-boot hook

log() { echo "rackboot: $*"; }

param() {  # value of rackboot.$1= on the kernel command line, else $2
    for word in $(cat /proc/cmdline); do
        case "$word" in "rackboot.$1="*) echo "${word#*=}"; return ;; esac
    done
    echo "$2"
}

load_modules() {
    while read -r module; do
        [ -n "$module" ] || continue
        insmod "/$module" 2>/tmp/insmod.err || {
            grep -q 'File exists' /tmp/insmod.err || log "cannot load $module: $(cat /tmp/insmod.err)"
        }
    done < /etc/rackboot/modules.order
}

first_interface() {  # the first non-loopback interface, waiting up to 10 s for it
    tries=0
    while [ $tries -lt 100 ]; do
        for dev in /sys/class/net/*; do
            name=${dev##*/}
            [ "$name" = lo ] || [ ! -e "$dev" ] || { echo "$name"; return 0; }
        done
        tries=$((tries + 1)); sleep 0.1
    done
    return 1
}

network_up() {
    ip link set lo up
    iface=$(first_interface) || { log "no network interface"; return 1; }
    ip link set "$iface" up
    udhcpc -i "$iface" -n -q -t 10 -T 1 -s /etc/rackboot/udhcpc.script >/tmp/udhcpc.log 2>&1 ||
        { log "no DHCP answer on $iface"; return 1; }
    . /run/rackboot/net.env
    log "network up: $iface $ip/$mask via ${router:-none}"
}

# Nobody need be at the console: the wait between tries ends by itself, and a shell is
# opened only for a person who asks for it with Enter. That shell ends by itself too:
# someone who walks away from it must not keep the worker from retrying.
RESCUE_SHELL_SECONDS=900

rescue_wait() {  # the network stays up; retry after $2 s, or when a shell opened meanwhile exits
    log "rescue: $1; retrying in $2 s (press Enter for a shell)"
    if [ -t 0 ]; then
        read -r -t "$2" _ && rescue_shell  # no line within $2 s (or end of input): retry
    else
        sleep "$2"  # no console to read: read would return at once
    fi
}

rescue_shell() {
    log "rescue shell: 'exit' retries now; it is closed after $RESCUE_SHELL_SECONDS s"
    # An interactive shell ignores SIGTERM, so a plain `timeout sh` waits for someone to
    # type exit. This one gets SIGKILL, which it cannot ignore; in a session of its own
    # (setsid: no controlling tty, no job control), everything it started goes with it.
    # busybox timeout execs its command, so $! is the shell and its process group.
    timeout -s KILL "$RESCUE_SHELL_SECONDS" setsid sh -i </dev/console >/dev/console 2>&1 &
    shell=$!
    wait "$shell"
    kill -KILL -"$shell" 2>/dev/null
    stty sane 2>/dev/null  # killed at its prompt, the shell's line editor leaves the tty raw
    return 0
}

run_updater() {
    master=$(param master "$RACKBOOT_MASTER")
    sources=$(param sources "$RACKBOOT_SOURCES")  # asked after the master (updater/sources.py)
    env PYTHONPATH=/usr/lib/rackboot PYTHONDONTWRITEBYTECODE=1 \
        /usr/bin/python3 -m updater --disk "$RACKBOOT_DISK" --master "$master" --sources "$sources" \
        --offline-mount "$RACKBOOT_MOUNT" --decision-file /run/rackboot/decision \
        --watchdog-stall "${RACKBOOT_WATCHDOG:-0}"
}

mount_data() {  # the overlay's upper layer on the data partition, formatted on first use
    [ -n "$data_device" ] || return 1
    if [ -n "$data_blank" ]; then
        log "formatting the data partition $data_device"
        # by path: busybox sh prefers its own applets, and its mke2fs makes only ext2
        /sbin/mke2fs -q -t ext4 -L rackboot-data "$data_device" || { log "cannot format $data_device"; return 1; }
    fi
    mount -t ext4 "$data_device" /run/rackboot/upper && { data_dir=/run/rackboot/upper; return 0; }
    log "cannot mount the data partition $data_device; the overlay goes on tmpfs"
    return 1
}

unmount_slot() {  # what a failed switch_to_slot left mounted, so the next try starts clean
    data_dir=""
    for point in /newroot /run/rackboot/upper /run/rackboot/lower /run/rackboot/data; do
        umount "$point" 2>/dev/null
    done
    return 0
}

switch_to_slot() {
    . /run/rackboot/decision
    if [ "$action" = poweroff ]; then  # the one line rackboot qemu reads the reason from
        log "nothing to boot, powering off: $error"
        sync; poweroff -f
        return 1
    fi
    log "booting slot $slot ($action) from $device mounted $mount"
    unmount_slot
    case "$mount" in
        rw) mount -t ext4 -o rw "$device" /newroot ;;
        ro) mount -t ext4 -o ro "$device" /newroot ;;
        ro+overlay:*)
            mkdir -p /run/rackboot/lower /run/rackboot/upper
            mount -t ext4 -o ro "$device" /run/rackboot/lower
            if [ "$mount" != "ro+overlay:data" ] || ! mount_data; then
                mount -t tmpfs -o mode=0755 tmpfs /run/rackboot/upper
            fi
            mkdir -p /run/rackboot/upper/upper /run/rackboot/upper/work
            mount -t overlay overlay -o "lowerdir=/run/rackboot/lower,upperdir=/run/rackboot/upper/upper,workdir=/run/rackboot/upper/work" /newroot
            ;;
    esac || { unmount_slot; return 1; }
    # switch_root cannot come back: an init it fails to run panics the kernel
    [ -e "/newroot${init:-/sbin/init}" ] || [ -L "/newroot${init:-/sbin/init}" ] ||
        { log "slot $slot has no ${init:-/sbin/init}"; unmount_slot; return 1; }
    apply_node  # the node's own settings; the slot's bytes stay as they are
    { cat /run/rackboot/decision; echo "disk='$RACKBOOT_DISK'"; } > /run/rackboot/booted
    mount --move /proc /newroot/proc 2>/dev/null; mount --move /sys /newroot/sys 2>/dev/null
    mount --move /dev /newroot/dev 2>/dev/null
    mount --move /run /newroot/run 2>/dev/null || log "the new root has no /run: rackboot-mark-good will not find its slot"
    exec switch_root /newroot "${init:-/sbin/init}"
}

load_modules
action=$(param action "$RACKBOOT_ACTION")
if [ "$action" = probe ]; then
    network_up
    log "probe done, powering off"
    sync; poweroff -f
fi
network_up || log "continuing offline"
delay=5
while true; do
    if run_updater; then
        switch_to_slot  # does not return on success
        why="cannot mount the chosen slot"
    else
        why="updater failed"
    fi
    rescue_wait "$why" "$delay"
    [ "$delay" -lt 300 ] && delay=$((delay * 2))
    network_up || true
done
