#!/usr/bin/env bash
# Debian root filesystems for testing the CPU backend on other architectures and on other
# distributions' g++ and glibc (make test-distro, make test-arch).
#
#   tools/rootfs.sh ARCH SUITE            make (or reuse) the rootfs, print its path
#   tools/rootfs.sh ARCH SUITE install    ... and install this working tree into a venv in it
#   tools/rootfs.sh ARCH SUITE run CMD... ... and run CMD in it (in /src, the venv on PATH)
#   tools/rootfs.sh ARCH SUITE test ARGS  install, then pytest ARGS in it, timed
#   tools/rootfs.sh ARCH SUITE check      exit 0 if this can work here, else say why (exit 3)
#
# ARCH: amd64, arm64, riscv64 (riscv64 is in Debian from trixie, 13, on). Foreign
# architectures run under qemu-user through binfmt_misc, registered with the F flag so the
# static interpreter is opened once, outside the chroot. Root filesystems are cached in
# $KUBECASH_ROOTFS_DIR (default ~/.cache/kubecash-rootfs): reused when present (delete one to
# remake it). Needs root, mmdebstrap, and qemu-user-static for foreign architectures.
set -euo pipefail

usage() { echo "usage: $0 amd64|arm64|riscv64 SUITE [install | run CMD... | check]" >&2; exit 2; }
[ $# -ge 2 ] || usage
ARCH=$1 SUITE=$2; shift 2
ACTION=${1:-path}; [ $# -gt 0 ] && shift
case $ARCH in
    amd64) QEMU=x86_64 ;; arm64) QEMU=aarch64 ;; riscv64) QEMU=riscv64 ;;
    *) echo "rootfs: unknown architecture '$ARCH' (amd64, arm64, riscv64)" >&2; exit 2 ;;
esac
case $ARCH-$SUITE in
    riscv64-bullseye|riscv64-bookworm)
        echo "rootfs: Debian has riscv64 from trixie (13) on, not in $SUITE" >&2; exit 2 ;;
esac
HERE=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${KUBECASH_ROOTFS_DIR:-$HOME/.cache/kubecash-rootfs}
ROOT=$CACHE/$SUITE-$ARCH
HOST_ARCH=$(dpkg --print-architecture 2>/dev/null || echo unknown)
MIRROR=${KUBECASH_DEBIAN_MIRROR:-http://deb.debian.org/debian}

# Debian's packages for what the project needs (pip then finds them in the venv, which sees
# system site-packages): building pyzmq or numpy from source under qemu would take an hour.
PKGS=ca-certificates,python3,python3-venv,python3-dev,python3-pip,g++,make,binutils,procps,strace
PKGS=$PKGS,python3-zmq,python3-msgpack,python3-numpy,python3-psutil,python3-pytest,python3-hypothesis
PKGS=$PKGS,python3-prometheus-client,python3-zstandard,python3-jsonschema,python3-setuptools,python3-wheel
PKGS=$PKGS,mount    # the confinement tests mount tenant file systems (not Essential: not in variant apt)
# make test-systemd boots the native rootfs's systemd in podman (tests/test_systemd.py)
[ "$ARCH" = "$HOST_ARCH" ] && PKGS=$PKGS,systemd,systemd-sysv

# Why this cannot work here, or nothing (exit status 0 when it can).
why_not() {
    [ "$(id -u)" = 0 ] || { echo "not root (mmdebstrap and chroot need root)"; return; }
    if [ ! -x "$ROOT/usr/bin/python3" ]; then
        command -v mmdebstrap >/dev/null || { echo "no mmdebstrap (apt-get install mmdebstrap)"; return; }
    fi
    [ "$ARCH" = "$HOST_ARCH" ] && return 0
    [ "$HOST_ARCH" = amd64 ] || { echo "host is $HOST_ARCH: only amd64 hosts are set up here"; return; }
    command -v "qemu-$QEMU-static" >/dev/null \
        || { echo "no qemu-$QEMU-static (apt-get install qemu-user-static)"; return; }
    local bf=/proc/sys/fs/binfmt_misc
    if [ ! -e $bf/register ]; then
        mount -t binfmt_misc binfmt_misc $bf 2>/dev/null \
            || { echo "binfmt_misc is not mounted and cannot be mounted here"; return; }
    fi
    if [ ! -e "$bf/qemu-$QEMU" ]; then
        # qemu's ELF magic and mask for the architecture; F: the interpreter is opened now,
        # so it need not exist inside the chroot.
        local magic mask='\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff'
        case $ARCH in
            arm64) magic='\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00' ;;
            riscv64) magic='\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xf3\x00' ;;
        esac
        printf '%s' ":qemu-$QEMU:M::$magic:$mask:$(command -v "qemu-$QEMU-static"):F" \
            > $bf/register 2>/dev/null || { echo "cannot register qemu-$QEMU with binfmt_misc"; return; }
    fi
    grep -q '^enabled' "$bf/qemu-$QEMU" || { echo "binfmt_misc entry qemu-$QEMU is disabled"; return; }
    grep -q '^flags:.*F' "$bf/qemu-$QEMU" \
        || { echo "binfmt_misc entry qemu-$QEMU lacks the F flag (the interpreter is not in the chroot)"; return; }
    return 0
}

make_rootfs() {
    if [ -x "$ROOT/usr/bin/python3" ] && [ -e "$ROOT/.kubecash-rootfs" ]; then
        # made with another package list: add what is missing (cheaper than remaking it)
        if [ "$(cat "$ROOT/.kubecash-rootfs")" != "$PKGS" ]; then
            echo "rootfs: adding packages to $ROOT" >&2
            enter /bin/sh -ec 'apt-get update -qq && apt-get install -y -qq --no-install-recommends "$@"' \
                sh $(echo "$PKGS" | tr , ' ') >&2
            echo "$PKGS" > "$ROOT/.kubecash-rootfs"
        fi
        return 0
    fi
    mkdir -p "$CACHE"
    rm -rf "$ROOT.tmp"
    echo "rootfs: making $ROOT (mmdebstrap $SUITE $ARCH)" >&2
    mmdebstrap --quiet --variant=apt --architectures="$ARCH" --include="$PKGS" \
        "$SUITE" "$ROOT.tmp" "$MIRROR" >&2
    echo "$PKGS" > "$ROOT.tmp/.kubecash-rootfs"
    rm -rf "$ROOT"
    mv "$ROOT.tmp" "$ROOT"
}

# CMD in the rootfs, in a mount namespace of its own (what it mounts goes when it ends):
# the rootfs bound onto itself (a root broker's views remount / private: / must be a mount
# point, as in any container), /proc, /sys, /dev, fresh /dev/shm and /tmp, the host's DNS.
enter() {
    cp -L /etc/resolv.conf "$ROOT/etc/resolv.conf" 2>/dev/null || true
    # The host's CA bundle too: where TLS to the registries is intercepted, it holds the CA.
    local cert=
    if [ -r /etc/ssl/certs/ca-certificates.crt ]; then
        cp -L /etc/ssl/certs/ca-certificates.crt "$ROOT/etc/ssl/host-ca-certificates.crt"
        cert=PIP_CERT=/etc/ssl/host-ca-certificates.crt
    fi
    unshare --mount --propagation private -- /bin/sh -ec '
        r=$1; shift
        mount --bind "$r" "$r"
        mount -t proc proc "$r/proc"
        mount -t sysfs sysfs "$r/sys" 2>/dev/null || mount --rbind /sys "$r/sys"
        mount --rbind /dev "$r/dev"
        mount -t tmpfs -o mode=1777 shm "$r/dev/shm"
        mount -t tmpfs -o mode=1777 tmp "$r/tmp"
        exec chroot "$r" "$@"' sh "$ROOT" \
        /usr/bin/env -i HOME=/root LANG=C.UTF-8 TERM=dumb PATH=/opt/venv/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_DEFAULT_TIMEOUT=180 $cert ${CI:+CI=$CI} "$@"
}

# The working tree (tracked and untracked, not ignored) into /src, and the project into
# /opt/venv (system site-packages: Debian's numpy, pyzmq... in it). Redone each time: the
# tree may have changed; pip reuses what is already installed.
install_tree() {
    rm -rf "$ROOT/src"
    mkdir -p "$ROOT/src"
    (cd "$HERE" && git ls-files -z --cached --others --exclude-standard \
        | xargs -0 -r sh -c 'for f; do [ -e "$f" ] && printf "%s\0" "$f"; done' sh \
        | tar --null -T - -cf -) | tar -xf - -C "$ROOT/src"
    enter /bin/sh -ec '
        [ -x /opt/venv/bin/python ] || python3 -m venv --system-site-packages /opt/venv
        cd /src
        # [broker] and what the tests import; not [test]: cuda-python (which test_ptx.py uses
        # to make PTX) and numba-cuda have no riscv64 builds.
        pip install --quiet --no-build-isolation -e ".[broker]" "pytest>=7" "hypothesis>=6" \
            "jsonschema>=4.18" "cuda-python>=13,<14; platform_machine != \"riscv64\""
        python -c "import kubecash.broker, kubecash.client; print(\"rootfs: kubecash installed\")"' >&2
}

case $ACTION in
    check) r=$(why_not) || true; if [ -n "$r" ]; then echo "$r"; exit 3; fi ;;
    path|install|run|test)
        r=$(why_not) || true
        [ -z "$r" ] || { echo "rootfs: cannot make or enter a $ARCH rootfs here: $r" >&2; exit 3; }
        make_rootfs
        case $ACTION in
            path) echo "$ROOT" ;;
            install) install_tree ;;
            run) [ $# -gt 0 ] || usage; enter /bin/sh -ec 'cd /src; exec "$@"' sh "$@" ;;
            test)
                install_tree
                t0=$(date +%s)
                rc=0
                enter /bin/sh -ec 'cd /src; exec python -m pytest -q -rs -p no:cacheprovider "$@"' sh "$@" || rc=$?
                echo "rootfs: $SUITE $ARCH: pytest exited $rc after $(( $(date +%s) - t0 )) s" >&2
                exit $rc ;;
        esac ;;
    *) usage ;;
esac
