# Sourced by scripts/fuzz-smoke and scripts/fuzz-campaign: sets `fuzz` to the cargo-fuzz
# command (nightly if installed, else stable with RUSTC_BOOTSTRAP=1) and `toolchain` to the
# toolchain it builds with, and makes the per-target corpus directories.
if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  fuzz=(cargo +nightly fuzz)
  toolchain=nightly
else
  export RUSTC_BOOTSTRAP=1
  fuzz=(cargo fuzz)
  toolchain=stable
fi

# The directories a target reads its inputs from, the writable one first: corpus/T (ignored,
# grows while fuzzing), seeds/T (the committed, minimised corpus of the last campaign) and
# regressions/T (every input that ever crashed the target; each must now pass).
fuzz_dirs() {
  local t="$1" d
  for d in corpus seeds regressions; do
    mkdir -p "$d/$t"
    printf '%s\n' "$d/$t"
  done
}
