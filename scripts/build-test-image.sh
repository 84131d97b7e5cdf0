#!/usr/bin/env bash
# Builds a tiny busybox root filesystem for container tests and packs it three ways:
#   OUT_DIR/busybox.tar, OUT_DIR/busybox.tar.gz, OUT_DIR/busybox.tar.zst
# The tree: bin/busybox (Debian's busybox-static) with a relative symlink per applet, sbin/ with a few
# links, usr/bin, etc/{passwd,group,hosts}, tmp (1777), root, and empty dev, proc, sys.
# The archives are deterministic (sorted names, mtime 0, numeric owner 0). Prints their paths.
# Needs root only to apt-get install busybox-static or zstd when they are missing.
set -euo pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: $0 OUT_DIR" >&2
    exit 2
fi
out_dir=$1
mkdir -p "$out_dir"
out_dir=$(cd "$out_dir" && pwd)

apt_install() {
    if [[ $(id -u) -ne 0 ]]; then
        echo "build-test-image: $* missing and not root: cannot apt-get install it" >&2
        return 1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null 2>&1 || {
        apt-get update -qq >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
    }
}

busybox=/bin/busybox
if [[ ! -x $busybox ]]; then
    apt_install busybox-static
fi
# It must be static: the tree has no libc.
if command -v file >/dev/null && ! file -L "$busybox" | grep -q 'statically linked'; then
    echo "build-test-image: $busybox is not statically linked (install busybox-static)" >&2
    exit 1
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root=$work/rootfs
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,etc,root,dev,proc,sys,tmp}
chmod 0755 "$root" "$root"/{bin,sbin,usr,usr/bin,usr/sbin,etc,dev,proc,sys}
chmod 0700 "$root/root"
chmod 1777 "$root/tmp"

install -m 0755 "$busybox" "$root/bin/busybox"
while read -r applet; do
    [[ -n $applet && $applet != busybox ]] || continue
    ln -s busybox "$root/bin/$applet"
done < <("$busybox" --list | sort -u)
for applet in ip udhcpc ifconfig route init halt poweroff reboot; do
    if [[ -L $root/bin/$applet ]]; then
        ln -s ../bin/busybox "$root/sbin/$applet"
    fi
done

cat >"$root/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
EOF
cat >"$root/etc/group" <<'EOF'
root:x:0:
nogroup:x:65534:
EOF
cat >"$root/etc/hosts" <<'EOF'
127.0.0.1	localhost
::1	localhost ip6-localhost ip6-loopback
EOF
chmod 0644 "$root"/etc/{passwd,group,hosts}

tar_opts=(--sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner --format=gnu -C "$root")
tar "${tar_opts[@]}" -cf "$out_dir/busybox.tar" .
gzip -n -9 -c "$out_dir/busybox.tar" >"$out_dir/busybox.tar.gz"
echo "$out_dir/busybox.tar"
echo "$out_dir/busybox.tar.gz"

if ! command -v zstd >/dev/null; then
    apt_install zstd || true
fi
if command -v zstd >/dev/null; then
    zstd -q -f -19 "$out_dir/busybox.tar" -o "$out_dir/busybox.tar.zst"
    echo "$out_dir/busybox.tar.zst"
else
    echo "build-test-image: zstd is missing: skipped busybox.tar.zst" >&2
fi
