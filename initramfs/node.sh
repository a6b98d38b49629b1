# rackboot node.sh, sourced by /init: the node's own settings applied to the root in
# /newroot just before switch_root, without changing a byte of the slot. The updater's
# decision names them (updater/node.py): hostname and machine-id go into an overlay's upper
# layer, or for rw/ro mounts are files on /run's tmpfs bind-mounted over the image's;
# persisted directories are bind mounts from the data partition; the first-boot hook runs
# chrooted into the new root, once per node and version (a stamp on the data partition).
# Nothing here stops a boot: what cannot be applied is logged and the slot boots as is.

NODE_RUN=/run/rackboot/node  # the files bind-mounted over an rw/ro root's
data_dir=""  # the data partition's mount point, once mounted (mount_data sets it for overlay:data)

node_data() {  # mount the data partition at /run/rackboot/data unless it is; "format": a blank one too
    [ -n "$data_dir" ] && return 0
    [ -n "$data_device" ] || return 1
    if [ -n "$data_blank" ]; then
        [ "$1" = format ] || return 1
        log "formatting the data partition $data_device"
        /sbin/mke2fs -q -t ext4 -L rackboot-data "$data_device" || { log "cannot format $data_device"; return 1; }
        data_blank=""
    fi
    mkdir -p /run/rackboot/data
    mount -t ext4 "$data_device" /run/rackboot/data || { log "cannot mount the data partition $data_device"; return 1; }
    data_dir=/run/rackboot/data
}

node_settings() {  # with a plan: keep its settings on the card; without: take the card's copy
    if [ -n "$planned" ]; then
        # A name is worth a blank data partition's formatting too: else a blank card's first
        # boot kept none, and every boot without the master after it came up unnamed
        want=""; [ -n "$hostname$persist$first_boot" ] && want=format
        node_data $want || return 0
        mkdir -p "$data_dir/rackboot"
        # names and paths have no quotes or spaces in them (formats.py checks both)
        printf "hostname='%s'\npersist='%s'\n" "$hostname" "$persist" > "$data_dir/rackboot/node.env.tmp" &&
            mv "$data_dir/rackboot/node.env.tmp" "$data_dir/rackboot/node.env"
    elif node_data && [ -r "$data_dir/rackboot/node.env" ]; then
        . "$data_dir/rackboot/node.env"
        log "no plan this boot: the node's settings as the card keeps them (hostname ${hostname:-unset})"
    fi
}

node_place() {  # node_place NAME PATH: $NODE_RUN/NAME becomes PATH in the new root
    case "$mount" in
        ro+overlay:*)  # the upper layer takes it; rm first: never write through an image's symlink
            rm -f "/newroot$2" && cp "$NODE_RUN/$1" "/newroot$2" ;;
        *)
            if [ -f "/newroot$2" ] && [ ! -L "/newroot$2" ]; then
                mount --bind "$NODE_RUN/$1" "/newroot$2"
            else
                log "$2 is not a plain file in slot $slot and a $mount root takes no new file: left as the image has it"
            fi ;;
    esac
}

node_identity() {
    mkdir -p "$NODE_RUN" /newroot/etc 2>/dev/null
    if [ -n "$hostname" ]; then
        hostname "$hostname"  # the kernel's name carries into the booted system whatever its files say
        echo "$hostname" > "$NODE_RUN/hostname"
        # Debian's convention: the host's own name on 127.0.1.1, the rest of the image's file kept
        { grep -v '^127\.0\.1\.1[[:space:]]' /newroot/etc/hosts 2>/dev/null ||
              [ -e /newroot/etc/hosts ] || printf '127.0.0.1\tlocalhost\n'
          printf '127.0.1.1\t%s\n' "$hostname"; } > "$NODE_RUN/hosts"
        node_place hostname /etc/hostname
        node_place hosts /etc/hosts
    fi
    # systemd's convention: an image that wants an id has the file, possibly empty
    if [ -n "$machine_id" ] && { [ -e /newroot/etc/machine-id ] || [ -L /newroot/etc/machine-id ]; }; then
        echo "$machine_id" > "$NODE_RUN/machine-id"
        node_place machine-id /etc/machine-id
    fi
}

node_persist() {  # each persisted directory from data:/persist/<path>, seeded once from the image
    [ -n "$persist" ] || return 0
    [ -n "$data_dir" ] || { log "persist: no data partition; $persist are not kept this boot"; return 0; }
    for path in $persist; do
        keep="$data_dir/persist$path"
        if [ ! -d "$keep" ]; then  # first time: what the image has there, as a fresh install would
            rm -rf "$keep.new" && mkdir -p "$keep.new" &&
                { [ ! -d "/newroot$path" ] || cp -a "/newroot$path/." "$keep.new/"; } &&
                mv "$keep.new" "$keep" || { log "persist: cannot make $keep"; continue; }
        fi
        [ -d "/newroot$path" ] || mkdir -p "/newroot$path" 2>/dev/null ||
            { log "persist: $path is not in slot $slot and a $mount root cannot get it: not kept"; continue; }
        mount --bind "$keep" "/newroot$path" || log "persist: cannot bind $keep on $path"
    done
}

node_first_boot() {  # the signed first-boot hook, chrooted, with the root's kernel filesystems
    [ -n "$first_boot" ] || return 0
    if [ -n "$data_dir" ] && [ -e "$data_dir/rackboot/first-boot/$image-v$version" ]; then  # no Python to start
        log "first-boot hook of $image v$version ran on this node before; not again"
        return 0
    fi
    for dir in run proc sys dev; do
        [ -d "/newroot/$dir" ] || { log "first-boot: the new root has no /$dir to run its hook with"; return 0; }
    done
    mount -t tmpfs -o mode=0755 tmpfs /newroot/run && mount -t proc proc /newroot/proc &&
        mount -t sysfs sysfs /newroot/sys && mount --bind /dev /newroot/dev &&
        env PYTHONPATH=/usr/lib/rackboot PYTHONDONTWRITEBYTECODE=1 /usr/bin/python3 -m updater.node first-boot \
            --decision-file /run/rackboot/decision --root /newroot --state-dir "$data_dir" --master "$master" \
            --disk "$RACKBOOT_DISK"
    for dir in dev sys proc run; do umount "/newroot/$dir" 2>/dev/null; done
    return 0
}

apply_node() {
    [ -n "$node" ] || return 0  # no identity (no network interface): nothing of the node's own
    node_settings
    node_persist
    node_identity
    node_first_boot
    return 0
}
