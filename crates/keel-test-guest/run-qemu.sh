#!/bin/sh
# Build keel-test-guest and run one scenario under QEMU microvm.
#   crates/keel-test-guest/run-qemu.sh SCENARIO [extra qemu args...]
# Prints the serial output; exits 0 on PASS (QEMU status 1 from
# isa-debug-exit value 0), non-zero otherwise.
# Environment: QEMU (default qemu-system-x86_64), SMP (default 2),
# MEM (default 128), TIMEOUT seconds (default 60), CARGO_TARGET_DIR.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
if [ $# -lt 1 ]; then
    echo "usage: $0 SCENARIO [extra qemu args...]" >&2
    exit 2
fi
scenario=$1
shift
target=${CARGO_TARGET_DIR:-$here/target}
cargo build --quiet --release --manifest-path "$here/Cargo.toml" --target-dir "$target"
guest=$target/release/keel-test-guest
status=0
timeout "${TIMEOUT:-60}" "${QEMU:-qemu-system-x86_64}" -enable-kvm -M microvm -cpu kvm64 \
    -m "${MEM:-128}" -smp "${SMP:-2}" -display none -no-reboot -nodefaults \
    -serial stdio -device isa-debug-exit,iobase=0xf4,iosize=4 \
    -kernel "$guest" -append "keel.test=$scenario" "$@" </dev/null || status=$?
if [ "$status" -eq 1 ]; then
    exit 0
fi
echo "run-qemu.sh: QEMU exited with status $status (1 = PASS, 3 = FAIL, 124 = timeout)" >&2
exit 1
