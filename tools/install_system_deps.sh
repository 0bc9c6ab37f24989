#!/usr/bin/env bash
# System packages the project needs (Debian): ffmpeg libraries for PyAV are bundled in its wheel, so this is
# only what pip cannot provide. Installs what is missing when run as root; otherwise says what to install.
set -euo pipefail
need=()
command -v bwrap >/dev/null 2>&1 || need+=(bubblewrap)      # Thyme sandbox isolation (network/mount namespaces)
command -v chromium >/dev/null 2>&1 || need+=(chromium)       # web demo test: Playwright drives Debian's Chromium
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing system packages: ${need[*]}"
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
else
  echo "missing system packages: ${need[*]} (install them with your package manager; some tests will be skipped)" >&2
fi
